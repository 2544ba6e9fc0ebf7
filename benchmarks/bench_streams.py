"""Benchmark of one stream worker on the local stack (issue 6, item 6); prints figures, asserts nothing.

    python benchmarks/bench_streams.py --model DIR     # DIR from `onetower model export --base minilm --out DIR`

1. the encoder's raw capacity on MovieLens user texts (users/s), in this process;
2. (a) MovieLens-100k replayed at full speed through a worker: events/s for state updates alone
   (``--no-refresh``) and with the refresher, and the encoder calls saved by debouncing;
3. (b) a steady engagement rate over random users at half the capacity: freshness p50/p95/p99;
4. (c) the highest of a few steady rates at which freshness p99 stays <= 5 s;
5. (d) the pipeline's encode throughput (users/s while draining) as a fraction of the raw one, and the
   share of the drain's wall time spent inside the encoder (independent of other load on the machine);
6. the time from producing a new item to finding it by a filtered ANN search.
Freshness percentiles are interpolated from the worker's freshness histogram (bucket edges 0.05 s ...).
Each run uses fresh prefixes and removes its keys, topics and collections afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from models.texts import user_texts
from indexer.filters import Condition
from indexer.milvus import MilvusStore
from models.encoder import Encoder
from onetower.prefixes import isolated, purge
from core.settings import Settings
from streams.events import EngagementEvent, ItemEvent
from streams.movielens import events_from_wheel, recbole_wheel
from streams.producer import EventProducer
from streams.state import StateStore


def fresh_settings(base: Settings) -> Settings:
    return isolated(base, "b")


def cleanup(s: Settings) -> None:
    purge(s)


class Worker:
    def __init__(self, s: Settings, model: Path, refresh: bool, log: Path) -> None:
        env = {**os.environ, "ONETOWER_TOPIC_PREFIX": s.topic_prefix, "ONETOWER_REDIS_KEY_PREFIX": s.redis_key_prefix,
               "ONETOWER_MILVUS_PREFIX": s.milvus_prefix, "ONETOWER_WORKER_METRICS_PORT": "0"}
        flag = ["--model", str(model)] if refresh else ["--no-refresh"]
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", "from onetower.cli import app; app()", "worker", *flag],
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
        while not (found := re.findall(r'"metrics_port": (\d+)', log.read_text())):
            if self.proc.poll() is not None:
                raise SystemExit(f"worker exited:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        self.port = int(found[-1])

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        for attempt in range(5):
            try:
                text = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
                return {(smp.name, frozenset(smp.labels.items())): smp.value
                        for fam in text_string_to_metric_families(text) for smp in fam.samples}
            except requests.ConnectionError:
                time.sleep(1)
        raise SystemExit("worker metrics unreachable")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def total(m: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= ls)


def freshness_quantiles(before: dict, after: dict, kind: str, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of the observations between two scrapes, interpolated inside histogram buckets."""
    edges = sorted({float(dict(ls)["le"]) for (n, ls) in after if n == "onetower_freshness_seconds_bucket"})
    cum = [total(after, "onetower_freshness_seconds_bucket", kind=kind, le=_le(e))
           - total(before, "onetower_freshness_seconds_bucket", kind=kind, le=_le(e)) for e in edges]
    n = cum[-1]
    out = []
    for q in qs:
        rank = q * n
        prev_edge, prev_cum = 0.0, 0.0
        for edge, c in zip(edges, cum):
            if c >= rank:
                out.append(prev_edge if edge == float("inf") else prev_edge + (edge - prev_edge) * (rank - prev_cum) / max(c - prev_cum, 1e-9))
                break
            prev_edge, prev_cum = edge, c
    return out


def _le(edge: float) -> str:
    return "+Inf" if edge == float("inf") else repr(edge)


def wait(what: str, check, timeout: float = 1800.0, every: float = 0.5) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out: {what}")
        time.sleep(every)
    return time.monotonic()


def steady(s: Settings, rate: float, seconds: float, users: list[str], items: list[str], seed: int) -> int:
    """Send engagements now-stamped at ``rate``/s over random users for ``seconds``; returns how many."""
    rng = random.Random(seed)
    sent = 0
    with EventProducer(s, linger_ms=5) as producer:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            due = int(elapsed * rate) - sent
            for _ in range(due):
                producer.send(EngagementEvent(user_id=rng.choice(users), item_id=rng.choice(items)))
            sent += max(due, 0)
            producer.flush()
            time.sleep(0.02)
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="MiniLM artifact (onetower model export --base minilm --out DIR)")
    ap.add_argument("--steady-s", type=float, default=40.0, help="seconds per steady-rate run")
    args = ap.parse_args()
    base = Settings()
    logdir = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    rows: list[tuple[str, str]] = []

    def report(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name:<62} {value}", flush=True)

    by_kind = events_from_wheel(recbole_wheel(base))
    events = [ev for rows in by_kind.values() for ev in rows]  # kind by kind, in the application order
    ml_users = [ev.user_id for ev in by_kind["users"]]
    ml_items = [ev.item_id for ev in by_kind["items"]]
    dirtying = len(by_kind["users"]) + len(by_kind["items"]) + len(by_kind["engagements"])
    report("MovieLens events (items, users, impressions, engagements)", f"{len(events):,}")

    # 1. raw encoder capacity on MovieLens user texts (state applied directly, in this process)
    s0 = fresh_settings(base)
    try:
        store = StateStore.from_settings(s0)
        t = time.perf_counter()
        for start in range(0, len(events), 2000):
            store.apply_many(events[start:start + 2000])
        report("state apply in-process, no Kafka (events/s)", f"{len(events) / (time.perf_counter() - t):,.0f}")
        encoder = Encoder.load(args.model)
        sample = random.Random(0).sample(ml_users, 128)
        texts = [x for x in user_texts(store, sample, tokenizer=encoder.tokenizer, max_tokens=encoder.max_seq_length) if x]
        encoder.encode(texts[:16])
        t = time.perf_counter()
        encoder.encode(texts)
        raw = len(texts) / (time.perf_counter() - t)
        tokens = sum(min(n, encoder.max_seq_length) for n in encoder.count_tokens(texts)) / len(texts)
        report("raw encoder capacity, MovieLens user texts (users/s)", f"{raw:.1f}  ({tokens:.0f} tokens/user)")
        del encoder
    finally:
        cleanup(s0)

    # 2a. state updates alone: the whole data set waiting in Kafka, one worker without refresher
    s1 = fresh_settings(base)
    try:
        with EventProducer(s1) as producer:
            producer.send_many(events)
        w = Worker(s1, args.model, refresh=False, log=logdir / "state.log")
        wait("first events", lambda: total(w.metrics(), "onetower_events_total") > 0, every=0.1)
        t0 = time.monotonic()
        t1 = wait("all events", lambda: total(w.metrics(), "onetower_events_total") >= len(events))
        report("(a) replay, state updates alone, one worker (events/s)", f"{len(events) / (t1 - t0):,.0f}")
        w.stop()
    finally:
        cleanup(s1)

    # 2a. with the refresher: events/s, debounce savings; 5(d) drain throughput
    s2 = fresh_settings(base)
    try:
        with EventProducer(s2) as producer:
            producer.send_many(events)
        w = Worker(s2, args.model, refresh=True, log=logdir / "full.log")
        store = StateStore.from_settings(s2)
        wait("first events", lambda: total(w.metrics(), "onetower_events_total") > 0, every=0.1)
        t0 = time.monotonic()
        t1 = wait("all events", lambda: total(w.metrics(), "onetower_events_total") >= len(events))
        m1 = w.metrics()
        report("(a) replay with refresher, one worker (events/s)", f"{len(events) / (t1 - t0):,.0f}")
        t2 = wait("drained", lambda: store.dirty_count("users") + store.dirty_count("items") == 0, every=0.25)
        m2 = w.metrics()
        encoded = total(m2, "onetower_encoded_total")
        report("(a) entity changes (user, item, engagement events)", f"{dirtying:,}")
        report("(a) entities encoded (users + items)", f"{encoded:,.0f}  (users {total(m2, 'onetower_encoded_total', kind='users'):,.0f})")
        report("(a) encoder calls saved by debouncing", f"{1 - encoded / dirtying:.1%}")
        drained_users = total(m2, "onetower_encoded_total", kind="users") - total(m1, "onetower_encoded_total", kind="users")
        pipeline = drained_users / (t2 - t1) if t2 > t1 else float("nan")
        report("(d) pipeline encode throughput while draining (users/s)", f"{pipeline:.1f}  ({drained_users:.0f} users in {t2 - t1:.1f} s)")
        report("(d) pipeline / raw encoder throughput", f"{pipeline / raw:.0%}")
        busy = (total(m2, "onetower_encode_seconds_sum") - total(m1, "onetower_encode_seconds_sum")) / (t2 - t1)
        report("(d) share of the drain's wall time spent inside the encoder", f"{busy:.0%}")

        # 3/4. steady rates over random MovieLens users, now-stamped
        results: dict[float, list[float]] = {}
        for factor in (0.5, 1.0, 2.0):
            rate = raw * factor
            before = w.metrics()
            sent = steady(s2, rate, args.steady_s, ml_users, ml_items, seed=int(factor * 10))
            wait("steady events applied", lambda: total(w.metrics(), "onetower_events_total", topic="engagements")
                 - total(before, "onetower_events_total", topic="engagements") >= sent)
            wait("drained", lambda: store.dirty_count("users") == 0, every=0.25)
            results[factor] = freshness_quantiles(before, w.metrics(), "users", (0.5, 0.95, 0.99))
            p50, p95, p99 = results[factor]
            name = "(b) " if factor == 0.5 else "(c) "
            report(f"{name}steady {rate:.1f} engagements/s ({factor:g} x capacity): freshness p50/p95/p99 (s)",
                   f"{p50:.2f} / {p95:.2f} / {p99:.2f}")
        ok = [f for f, q in results.items() if q[2] <= 5.0]
        report("(c) highest tried rate with freshness p99 <= 5 s (engagements/s)",
               f"{raw * max(ok):.1f} ({max(ok):g} x capacity)" if ok else "none of those tried")

        # 6. a new item: produced -> found by a filtered ANN search in the worker's version
        index = MilvusStore(s2)
        version = Encoder.load(args.model).version
        probe = index.get_vectors("items", version, [ml_items[0]], strong=True)[ml_items[0]]
        t = time.monotonic()
        with EventProducer(s2, linger_ms=0) as producer:
            producer.send(ItemEvent(item_id="bench-new-item", features={"title": "A new film", "genres": "drama"}))
        wait("new item searchable", lambda: any(h.id == "bench-new-item" for h in index.search_items(
            probe, 10, filter=Condition(field="title", op="==", value="A new film"), version=version)), every=0.05)
        report("new item: produced -> found by filtered ANN search (s)", f"{time.monotonic() - t:.2f}")
        w.stop()
    finally:
        cleanup(s2)
    print(f"\nworker logs: {logdir}  ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
