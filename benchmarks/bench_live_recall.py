"""Benchmark of live recall scoring (issue 13) on the local stack; prints figures, asserts nothing.

    python benchmarks/bench_live_recall.py --model DIR [--engagements 5000] [--repeats 0: the cost only]

Freshness with scoring off and on is measured by ``bench_streams.py --mode live-recall``.

1. cost per engagement, in this process: the snapshot taken on the event path before a batch is
   applied (one Redis pipeline per batch), and the scoring done off the event path (the user
   vectors read, an ANN top-100 search through the candidates code, the popularity rank, the Redis
   window writes), p50/p99;
2. effect on a worker's event throughput: the same engagements applied by a ``--no-refresh`` worker
   at sample rates 0, 0.1 and 1.0 under the default ``live_recall_max_per_s`` (events/s from the first send until every event is applied), the
   rates interleaved over ``--repeats`` rounds and the median kept (the machine is shared: runs vary).

MovieLens-100k: every item and user, and the first ``--history`` engagements, are applied and indexed
with the model; the next ``--engagements`` ones are scored. Fresh prefixes, removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_streams import Worker, total, wait  # noqa: E402

from indexer.live_recall import LiveRecall  # noqa: E402
from indexer.reindex import Reindexer  # noqa: E402
from indexer.milvus import MilvusStore  # noqa: E402
from models.encoder import Encoder  # noqa: E402
from onetower.prefixes import isolated, purge  # noqa: E402
from core.settings import Settings  # noqa: E402
from streams.events import EngagementEvent, Event  # noqa: E402
from streams.movielens import events_from_wheel, recbole_wheel  # noqa: E402
from streams.producer import EventProducer  # noqa: E402
from streams.state import StateStore  # noqa: E402

BATCH = 50  # engagements per snapshot, about what a sampled agent batch holds
RATES = (0.0, 0.1, 1.0)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def cost_per_engagement(s: Settings, probes: list[EngagementEvent]) -> None:
    unbounded = s.model_copy(update={"live_recall_sample_rate": 1.0, "live_recall_max_per_s": 1e9})
    scorer = LiveRecall(unbounded, MilvusStore(s), StateStore.from_settings(s))
    scorer.versions()
    snap_ms, score_ms = [], []
    for start in range(0, len(probes), BATCH):
        batch = probes[start:start + BATCH]
        t0 = time.perf_counter()
        taken = scorer.snapshot(batch)
        snap_ms.append((time.perf_counter() - t0) * 1000 / len(batch))
        for probe in taken:
            t0 = time.perf_counter()
            scorer.score([probe])
            score_ms.append((time.perf_counter() - t0) * 1000)
    print(f"snapshot on the event path: {statistics.median(snap_ms):.3f} ms per engagement (batches of {BATCH}; "
          f"p99 {pct(snap_ms, 0.99):.3f})")
    print(f"ranking off the event path: p50 {statistics.median(score_ms):.2f} ms, p99 {pct(score_ms, 0.99):.2f} ms per "
          f"engagement ({len(score_ms)} scored)")


def throughput(base: Settings, setup: list[Event], probes: list[EngagementEvent], model: Path, rate: float,
               logdir: Path) -> float:
    """Engagements/s a --no-refresh worker applies at this sample rate (fresh topics and state, the shared index)."""
    s = isolated(base, "blr", milvus_prefix=base.milvus_prefix)
    try:
        StateStore.from_settings(s).apply_many(setup)
        os.environ["ONETOWER_LIVE_RECALL_SAMPLE_RATE"] = str(rate)
        w = Worker(s, model, refresh=False, log=logdir / f"worker-{rate}.log")
        try:
            wait("partitions assigned", lambda: any(n == "onetower_consumer_lag" for n, _ in w.metrics()))
            start = time.monotonic()
            with EventProducer(s) as producer:
                producer.send_many(probes)
            end = wait("engagements applied", every=0.5,  # a scrape costs the worker CPU too
                       check=lambda: total(w.metrics(), "onetower_events_total", topic="engagements", outcome="applied") >= len(probes))
            scored = total(w.metrics(), "onetower_live_recall_scored_total")
            dropped = total(w.metrics(), "onetower_live_recall_skipped_total", reason="backlog")
        finally:
            w.stop()
        eps = len(probes) / (end - start)
        print(f"sample rate {rate}: {eps:,.0f} engagements/s applied ({scored:.0f} scored by then, "
              f"{dropped:.0f} samples dropped: scoring backlog full)")
        return eps
    finally:
        purge(s.model_copy(update={"milvus_prefix": isolated(base).milvus_prefix}))  # keeps the shared index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--history", type=int, default=3000)
    ap.add_argument("--engagements", type=int, default=40000)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the throughput runs (0: the cost per engagement only)")
    args = ap.parse_args()

    base = isolated(Settings(), "blr")
    events = events_from_wheel(recbole_wheel(base))
    engagements = events["engagements"]
    setup = events["items"] + events["users"] + engagements[:args.history]
    probes = engagements[args.history:args.history + args.engagements]
    store = StateStore.from_settings(base)
    try:
        store.apply_many(setup)
        started = time.monotonic()
        Reindexer(base, Encoder.load(args.model), store=store).run(args.model)
        print(f"indexed {len(events['items'])} items and {len(events['users'])} users in {time.monotonic() - started:.0f}s")
        print(f"load average 1/5/15 min before scoring: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
        cost_per_engagement(base, probes[:1000])
        print(f"load average 1/5/15 min after scoring: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.repeats == 0:  # the cost alone
            return
        logdir = Path(tempfile.mkdtemp(prefix="bench-live-recall-"))
        runs: dict[float, list[float]] = {}
        for _ in range(args.repeats):
            for rate in RATES:
                runs.setdefault(rate, []).append(throughput(base, setup, probes, args.model, rate, logdir))
        figures = {rate: statistics.median(eps) for rate, eps in runs.items()}
        for rate in (0.1, 1.0):
            print(f"median throughput at sample rate {rate}: {figures[rate]:,.0f} engagements/s, "
                  f"{figures[rate] / figures[0.0]:.0%} of unscored ({figures[0.0]:,.0f})")
    finally:
        purge(base)


if __name__ == "__main__":
    main()
