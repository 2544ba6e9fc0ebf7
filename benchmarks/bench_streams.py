"""Benchmark of one stream worker on the local stack (issue 6, item 6); prints figures, asserts nothing.

    python benchmarks/bench_streams.py --model DIR     # DIR from `onetower model export --base minilm --out DIR`
    python benchmarks/bench_streams.py --model DIR --mode live-recall          # issue 13: scoring off/on, interleaved
    python benchmarks/bench_streams.py --model SMOLLM2_DIR --mode incremental  # issue 12: full vs incremental users
    python benchmarks/bench_streams.py --model SMOLLM2_DIR --mode incremental --incremental all  # and users + items

Workload (``--workload``, stated in the output): ``sessions`` (default) replays MovieLens' arrival
pattern at a steady total rate: sessions (a user's engagements split at 30 min gaps in
MovieLens-100k) start as a Poisson process over random MovieLens users, each with a length and
within-session gaps drawn from MovieLens' own (half of its gaps are 0-1 s, the rest 20 s to minutes),
stationary from the window's start (sessions already under way then are in progress). ``random``:
each engagement picks a random user (the former workload). Items (``--items``): ``popularity``
(default) draws them in proportion to their MovieLens engagements, never one the user engaged with
before (a MovieLens user rates a film once); ``uniform`` draws any item of the catalogue alike.

1. the encoder's raw capacity on MovieLens user texts (users/s), in this process;
2. (a) MovieLens-100k replayed at full speed through a worker: events/s for state updates alone
   (``--no-refresh``) and with the refresher, and the encoder calls saved by debouncing;
3. (b) a steady engagement rate over random users at half the capacity: freshness p50/p95/p99;
4. (c) the highest of a few steady rates at which freshness p99 stays <= 5 s;
5. (d) the pipeline's encode throughput (users/s while draining) as a fraction of the raw one, and the
   share of the drain's wall time spent inside the encoder (independent of other load on the machine);
6. the time from producing a new item to finding it by a filtered ANN search.
``--mode live-recall`` (issue 13): state and index seeded in-process, then freshness at half the raw
capacity with live recall scoring off (sample rate 0), at the default rate and at 1.0, a fresh worker
per arm, the arms interleaved over ``--rounds`` rounds so that the machine's load hits all alike.
``--mode incremental`` (issue 12): state seeded in-process (no item index: users' freshness only),
then per path (full re-encode, incremental users, incremental users and items: ``--incremental``) one
worker through ascending rates until a run fails (freshness p99 over 5 s, or users, items or counter
checks still queued ``--drain-max-s`` after its last event), ``--refine`` more runs bisecting
(geometrically) between the last rate that passed and the first that failed (capacity = the highest
rate that passed), then half the full path's capacity and half the path's own; the incremental
encoder's cache hits, misses by reason and bytes against the bound. Before each run an incremental
path's worker encodes the users of the sessions under way at its start (unmeasured; ``--no-prime`` to
skip), so that its cache is in the state a worker running all along would have: only a session that
starts in the run, or a user the cache's bound evicted, meets it cold. ``--ceiling`` adds a path: the
full one with a tiny random LLaMA of the same tokenizer, whose encodes cost next to nothing, so its
capacity is what the rest of the pipeline (Kafka, faust, Redis, Milvus, the producer) leaves on
this machine: no encoder can raise a path's capacity above it.
Freshness percentiles are interpolated from the worker's freshness histogram (bucket edges 0.05 s ...).
Each run uses fresh prefixes and removes its keys, topics and collections afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
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
    def __init__(self, s: Settings, model: Path, refresh: bool, log: Path, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "ONETOWER_TOPIC_PREFIX": s.topic_prefix, "ONETOWER_REDIS_KEY_PREFIX": s.redis_key_prefix,
               "ONETOWER_MILVUS_PREFIX": s.milvus_prefix, "ONETOWER_WORKER_METRICS_PORT": "0", **(env or {})}
        self.cache_bytes_max = 0.0  # highest onetower_incremental_cache_bytes seen by any scrape
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
                m = {(smp.name, frozenset(smp.labels.items())): smp.value
                     for fam in text_string_to_metric_families(text) for smp in fam.samples}
                self.cache_bytes_max = max(self.cache_bytes_max, total(m, "onetower_incremental_cache_bytes"))
                return m
            except requests.ConnectionError:
                time.sleep(1)
        raise SystemExit("worker metrics unreachable")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def total(m: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= ls)


def increase(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much a counter (summed over the series ``labels`` select) rose between two scrapes."""
    return total(after, name, **labels) - total(before, name, **labels)


def freshness_quantiles(before: dict, after: dict, kind: str, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of the observations between two scrapes, interpolated inside histogram buckets."""
    edges = sorted({float(dict(ls)["le"]) for (n, ls) in after if n == "onetower_freshness_seconds_bucket"})
    cum = [increase(before, after, "onetower_freshness_seconds_bucket", kind=kind, le=_le(e)) for e in edges]
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


SESSION_GAP_S = 1800.0  # a user's engagements further apart than this are two sessions


@dataclass(frozen=True)
class Workload:
    """How steady engagements pick their users: ``sessions`` (MovieLens' lengths and gaps) or ``random``."""

    kind: str
    users: list[str]
    items: list[str]
    lengths: list[int]  # MovieLens session lengths (engagements)
    gaps: list[float]  # MovieLens gaps between a session's consecutive engagements (s)
    item_draw: str  # "popularity" or "uniform"
    cum_weights: list[int]  # per item of ``items``: the MovieLens engagements of it and those before it
    seen: dict[str, set[str]]  # user -> items engaged with (MovieLens, then every engagement scheduled)

    @classmethod
    def from_movielens(cls, kind: str, engagements: list[EngagementEvent], users: list[str], items: list[str],
                       item_draw: str = "popularity") -> "Workload":
        by_user: dict[str, list[float]] = {}
        seen: dict[str, set[str]] = {}
        for ev in engagements:
            by_user.setdefault(ev.user_id, []).append(ev.ts.timestamp())
            seen.setdefault(ev.user_id, set()).add(ev.item_id)
        counts = Counter(ev.item_id for ev in engagements)
        lengths, gaps = [], []
        for times in by_user.values():
            times.sort()
            n = 1
            for a, b in zip(times, times[1:]):
                if b - a > SESSION_GAP_S:
                    lengths.append(n)
                    n = 1
                else:
                    gaps.append(b - a)
                    n += 1
            lengths.append(n)
        return cls(kind, users, items, lengths, gaps, item_draw, list(itertools.accumulate(counts[i] for i in items)), seen)

    def item(self, rng: random.Random, user: str) -> str:
        """An item for ``user``'s next engagement (see ``--items``), remembered as seen."""
        if self.item_draw == "uniform":
            return rng.choice(self.items)
        seen = self.seen.setdefault(user, set())
        for _ in range(100):  # a user who engaged with nearly every popular item keeps the 100th draw
            item = rng.choices(self.items, cum_weights=self.cum_weights)[0]
            if item not in seen:
                break
        seen.add(item)
        return item

    def describe(self) -> str:
        items = (f"items by MovieLens popularity over {len(self.items)}, none the user engaged with before"
                 if self.item_draw == "popularity" else f"items uniform over {len(self.items)}")
        if self.kind == "random":
            return f"random: each engagement a uniform random user of {len(self.users)}; {items}"
        g = statistics.quantiles(self.gaps, n=4)
        return (f"sessions: MovieLens' {len(self.lengths)} sessions (split at {SESSION_GAP_S / 60:.0f} min gaps), length mean "
                f"{statistics.mean(self.lengths):.1f} / median {statistics.median(self.lengths):.0f}, within-session gaps "
                f"p25/p50/p75 {g[0]:.0f}/{g[1]:.0f}/{g[2]:.0f} s (mean {statistics.mean(self.gaps):.0f} s); Poisson session "
                f"starts over {len(self.users)} users, stationary; {items}")

    def schedule(self, rate: float, seconds: float, seed: int) -> Schedule:
        """(send time from the window's start, user, item) for ``seconds`` at ``rate`` engagements/s on average,
        and the users whose sessions were under way when it starts."""
        rng = random.Random(seed)
        out: list[tuple[float, str, str]] = []
        if self.kind == "random":
            t = 0.0
            while (t := t + rng.expovariate(rate)) < seconds:
                user = rng.choice(self.users)
                out.append((t, user, self.item(rng, user)))
            return Schedule(out, [])
        # Sessions start at rate / mean length from far enough back that the window sees the stationary mix.
        starts_per_s = rate / statistics.mean(self.lengths)
        horizon = 4 * SESSION_GAP_S
        t = -horizon
        under_way: dict[str, float] = {}  # user -> their session's last engagement before the start
        while (t := t + rng.expovariate(starts_per_s)) < seconds:
            user, at, last = rng.choice(self.users), t, None
            for n in range(rng.choice(self.lengths)):
                if n:
                    at += rng.choice(self.gaps)
                if at >= seconds:
                    break
                if at < 0:
                    last = at
                else:
                    out.append((at, user, self.item(rng, user)))
                    if last is not None:
                        under_way[user] = max(last, under_way.get(user, last))
        return Schedule(sorted(out), sorted(under_way, key=under_way.__getitem__))


@dataclass(frozen=True)
class Schedule:
    """A steady run's engagements, and the users of the sessions under way at its start (their last
    engagement before it, oldest first): a worker that had been running would have just encoded them."""

    events: list[tuple[float, str, str]]
    under_way: list[str]


def steady(s: Settings, rate: float, seconds: float, workload: Workload, seed: int, lead_s: float = 0.0,
           at_lead=None, at_start=None) -> list[tuple[float, str, str]]:
    """Send engagements now-stamped at ``rate``/s on average for ``lead_s + seconds`` (``workload``'s pattern,
    one process throughout, so sessions under way at the lead's end go on), calling ``at_start`` with the
    users of the sessions under way at the lead's start first and ``at_lead`` when the lead ends; returns
    those sent after it."""
    schedule = workload.schedule(rate, lead_s + seconds, seed)
    if at_start is not None:
        at_start(schedule.under_way)
    plan = schedule.events
    sent = 0
    with EventProducer(s, linger_ms=5) as producer:
        start = time.monotonic()
        while sent < len(plan):
            elapsed = time.monotonic() - start
            if at_lead is not None and elapsed >= lead_s:
                at_lead()
                at_lead = None
            while sent < len(plan) and plan[sent][0] <= elapsed:
                producer.send(EngagementEvent(user_id=plan[sent][1], item_id=plan[sent][2]))
                sent += 1
            producer.flush()
            time.sleep(0.02)
        while time.monotonic() - start < lead_s + seconds:
            time.sleep(0.05)
    return [row for row in plan if row[0] >= lead_s]


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def seed_state(s: Settings, events: list, model: Path | None) -> StateStore:
    """Apply MovieLens in-process; with ``model``, index it (the active version, for live recall); no dirty marks left."""
    store = StateStore.from_settings(s)
    events = recent(events)
    for start in range(0, len(events), 2000):
        store.apply_many(events[start:start + 2000])
    tables = store.refresh_percentile_tables()
    for _ in range(5):  # settle the bucket checks the seeding queued, so no item waits to be re-encoded
        store.check_buckets(limit=10_000, tables=tables)
    if model is not None:
        from indexer.reindex import Reindexer
        Reindexer(s, Encoder.load(model), store=store).run(model)
    clear_dirty(store)
    return store


def recent(events: list) -> list:
    """MovieLens' seven months of event times mapped, in order, onto the last 7 days: the 1 h / 24 h / 7 d
    popularity counters are then live, as in a running system (with 1997 times they are all zero, and
    every engagement would move its item's bucket and cost an item re-encode)."""
    stamps = [ev.ts.timestamp() for ev in events]
    t0, t1 = min(stamps), max(stamps)
    end = time.time() - 60
    span = 7 * 24 * 3600 - 120
    return [ev.model_copy(update={"ts": datetime.fromtimestamp(end - span + (t - t0) / max(t1 - t0, 1) * span, timezone.utc)})
            for ev, t in zip(events, stamps)]


def clear_dirty(store: StateStore) -> None:
    for kind in ("items", "users"):
        while (lease := store.pop_dirty(kind, 10_000, int(time.time() * 1000) + 60_000)).ids:
            store.ack_dirty(kind, lease)


def raw_capacity(store: StateStore, model: Path, users: list[str], n: int) -> tuple[float, float]:
    """Users/s the model's ONNX encoder makes of ``n`` MovieLens user texts in this process, and tokens a user."""
    encoder = Encoder.load(model)
    sample = random.Random(0).sample(users, n)
    texts = [x for x in user_texts(store, sample, tokenizer=encoder.tokenizer, max_tokens=encoder.max_seq_length, history_block=encoder.history_block) if x]
    encoder.encode(texts[:4])
    t = time.perf_counter()
    encoder.encode(texts)
    raw = len(texts) / (time.perf_counter() - t)
    tokens = sum(min(x, encoder.max_seq_length) for x in encoder.count_tokens(texts)) / len(texts)
    return raw, tokens


@dataclass
class Run:
    rate: float
    sent: int
    encodes: float
    q: list[float]  # freshness p50/p95/p99 (s)
    drained: bool
    inc: dict[str, float]
    item_encodes: float = 0.0
    item_q: tuple[float, ...] = ()  # items' freshness p50/p95/p99 (s): their newest event to their vector
    primed: int = 0  # users of the sessions under way, encoded before the lead (``measure``'s ``prime``)
    encoder_s: tuple[float, float] = (0.0, 0.0)  # seconds in the encoder for users, for items, over the window

    @property
    def ok(self) -> bool:
        return self.drained and self.q[2] <= 5.0

    def line(self) -> str:
        p50, p95, p99 = self.q
        tail = "" if self.drained else "  NOT DRAINED within the limit: p99 > 5 s"
        items = f"; items {' / '.join(f'{x:.2f}' for x in self.item_q)}" if self.item_q else ""
        primed = f", {self.primed} under-way users primed" if self.primed else ""
        users_s, items_s = self.encoder_s
        return (f"{p50:.2f} / {p95:.2f} / {p99:.2f}{items}  ({self.sent} engagements, {self.encodes:.0f} user encodes, "
                f"{self.item_encodes:.0f} item encodes{primed}; encoder {users_s:.1f} s users + {items_s:.1f} s items = "
                f"{1000 * (users_s + items_s) / max(self.sent, 1):.0f} ms an engagement){tail}")


INC_METRICS = ("onetower_incremental_hits_total", "onetower_incremental_tokens_computed_total",
               "onetower_incremental_tokens_full_total")


def measure(w: Worker, s: Settings, store: StateStore, rate: float, args: argparse.Namespace, workload: Workload,
            seed: int, prime: bool = False) -> Run:
    """One steady run on a running worker: ``--lead-s`` at the rate unmeasured (the sessions the window
    starts in are under way: their users were seen), then send, wait until applied and drained (at most
    ``--drain-max-s``): no user or item queued, no item's counters waiting for their bucket check.

    ``prime``: first, unmeasured, the worker re-encodes the users of the sessions under way at the lead's
    start, in the order of their last engagement before it, as a worker that had been running would have
    done after those engagements. An incremental path's cache then holds them (within its bound) as in
    its steady state; without it every such session's next engagement meets a cold cache."""
    snapshot: list[dict] = []
    primed: list[str] = []

    def warm(users: list[str]) -> None:
        now = int(time.time() * 1000) - 60_000  # settled: past the debounce, oldest first
        store.mark_dirty("users", {u: now + i for i, u in enumerate(users)})
        wait("under-way sessions encoded", lambda: store.dirty_count("users") == 0, timeout=3600, every=0.5)
        primed.extend(users)

    plan = steady(s, rate, args.steady_s, workload, seed, args.lead_s, lambda: snapshot.append(w.metrics()),
                  warm if prime else None)
    before = snapshot[0] if snapshot else w.metrics()
    wait("steady events applied", lambda: increase(before, w.metrics(), "onetower_events_total", topic="engagements") >= len(plan))
    drained = True
    try:
        wait("drained", lambda: store.dirty_count("users") + store.dirty_count("items") + store.unchecked_count() == 0,
             timeout=args.drain_max_s, every=0.5)
    except SystemExit:
        drained = False
    after = w.metrics()
    inc = {n: increase(before, after, n) for n in INC_METRICS}
    for reason in ("absent", "diverged", "version"):
        inc[f"miss_{reason}"] = increase(before, after, "onetower_incremental_misses_total", reason=reason)
    inc["cache_bytes"] = total(after, "onetower_incremental_cache_bytes")
    inc["cache_users"] = total(after, "onetower_incremental_cache_users")
    encodes = increase(before, after, "onetower_encoded_total", kind="users")
    item_encodes = increase(before, after, "onetower_encoded_total", kind="items")
    run = Run(rate, len(plan), encodes, freshness_quantiles(before, after, "users", (0.5, 0.95, 0.99)), drained, inc,
              item_encodes, tuple(freshness_quantiles(before, after, "items", (0.5, 0.95, 0.99))) if item_encodes else (),
              len(primed), tuple(increase(before, after, "onetower_encode_seconds_sum", kind=kind) for kind in ("users", "items")))
    if not drained:  # leave nothing for the next run
        clear_dirty(store)
        time.sleep(2 * s.refresh_debounce_s)
    return run


def ready(w: Worker, s: Settings, store: StateStore, args: argparse.Namespace, workload: Workload) -> None:
    """Wait for a fresh worker's refresher and partitions, then ``--warmup-s`` of the workload at a low rate,
    unmeasured (a fresh worker's first encodes are slow)."""
    wait("refresher started", lambda: "refresher started" in w.log.read_text(), timeout=600)
    wait("partitions assigned", lambda: any(n == "onetower_consumer_lag" for n, _ in w.metrics()))
    if args.warmup_s > 0:
        steady(s, min(1.0, *(args.rates or [1.0])), args.warmup_s, workload, seed=random.randrange(10**9))
        try:
            wait("warm-up drained", lambda: store.dirty_count("users") + store.dirty_count("items") == 0,
                 timeout=3 * args.drain_max_s, every=0.5)
        except SystemExit:  # a slow first encode (torch's first batches): start from an empty queue anyway
            clear_dirty(store)


def live_recall_mode(args: argparse.Namespace, base: Settings, by_kind: dict, workload: Workload, logdir: Path,
                     report) -> None:
    """Issue 13: freshness at half capacity, live recall scoring off / default rate / 1.0, interleaved."""
    events = [ev for rows in by_kind.values() for ev in rows]
    users = [ev.user_id for ev in by_kind["users"]]
    s = fresh_settings(base)
    try:
        started = time.monotonic()
        store = seed_state(s, events, args.model)
        report("seeded and indexed (items, users) in", f"{time.monotonic() - started:.0f} s")
        raw, tokens = raw_capacity(store, args.model, users, args.raw_users)
        rate = args.rate or raw / 2
        report("raw encoder capacity, MovieLens user texts (users/s)", f"{raw:.1f}  ({tokens:.0f} tokens/user)")
        arms = (0.0, base.live_recall_sample_rate, 1.0)
        runs: dict[float, list[Run]] = {a: [] for a in arms}
        scored: dict[float, float] = {a: 0.0 for a in arms}
        skipped: dict[float, dict[str, float]] = {a: {} for a in arms}
        cost: dict[float, list[float]] = {a: [0.0, 0.0] for a in arms}  # ranking seconds, engagements ranked (in the worker)
        for rnd in range(args.rounds):
            for arm in (arms if rnd % 2 == 0 else arms[::-1]):  # off, on, on', then on', on, off...
                w = Worker(s, args.model, refresh=True, log=logdir / f"lr-{arm}-{rnd}.log",
                           env={"ONETOWER_LIVE_RECALL_SAMPLE_RATE": str(arm)})
                try:
                    ready(w, s, store, args, workload)
                    # fresh engagements per arm: the state carries over, a repeated (user, item) would be "seen"
                    run = measure(w, s, store, rate, args, workload, seed=100 * rnd + arms.index(arm))
                    m = w.metrics()
                    scored[arm] += total(m, "onetower_live_recall_scored_total")
                    cost[arm][0] += total(m, "onetower_live_recall_seconds_sum")
                    cost[arm][1] += total(m, "onetower_live_recall_seconds_count")
                    for (n, ls), v in m.items():
                        if n == "onetower_live_recall_skipped_total":
                            skipped[arm][dict(ls)["reason"]] = skipped[arm].get(dict(ls)["reason"], 0) + v
                finally:
                    w.stop()
                runs[arm].append(run)
                report(f"round {rnd + 1}, sample rate {arm:g}: freshness p50/p95/p99 (s)", f"{run.line()}  load {load()}")
        med = {a: [statistics.median(r.q[i] for r in runs[a]) for i in range(3)] for a in arms}
        report(f"steady rate (half the raw capacity), {args.rounds} rounds", f"{rate:.1f} engagements/s")
        for arm in arms:
            ratio = "" if arm == 0 else "  ratio to off p50/p95/p99 " + " / ".join(
                f"{med[arm][i] / med[0.0][i]:.2f}" for i in range(3))
            report(f"median freshness p50/p95/p99 (s), sample rate {arm:g}",
                   " / ".join(f"{x:.2f}" for x in med[arm]) + f"  ({scored[arm]:.0f} scored, skipped "
                   f"{ {k: int(v) for k, v in skipped[arm].items()} }){ratio}")
            if cost[arm][1]:
                report(f"  ranking in the worker, rate {arm:g} (ms an engagement: popularity + ANN; vector reads and Redis writes per batch not included)",
                       f"{1000 * cost[arm][0] / cost[arm][1]:.1f}  ({cost[arm][0] / (args.rounds * args.steady_s):.1%} of one core "
                       f"over the steady windows)")
    finally:
        cleanup(s)


PATHS = {"full": ("0", "0"), "incremental": ("1", "0"), "incremental+items": ("1", "1"), "ceiling": ("0", "0")}  # (users, items)


def incremental_mode(args: argparse.Namespace, base: Settings, by_kind: dict, workload: Workload, logdir: Path,
                     report) -> None:
    """Issue 12: capacity and freshness of the full and the incremental re-encoding paths. Each path starts
    from the same seeded state and draws the same engagements (the counters a path's runs raise would
    otherwise spare the next path bucket moves)."""
    events = [ev for rows in by_kind.values() for ev in rows]
    users = [ev.user_id for ev in by_kind["users"]]
    chosen = {"off": ["full"], "on": ["incremental"], "both": ["full", "incremental"], "items": ["incremental+items"],
              "both-items": ["full", "incremental+items"], "all": ["full", "incremental", "incremental+items"]}[args.incremental]
    chosen += ["ceiling"] if args.ceiling else []
    bound = base.incremental_cache_bytes or (psutil.virtual_memory().total // 8)
    rates = args.rates
    capacity: dict[str, float] = {}
    for path in chosen:
        s = fresh_settings(base)
        try:
            started = time.monotonic()
            store = seed_state(s, events, None)
            report(f"[{path}] state seeded in", f"{time.monotonic() - started:.0f} s")
            if not capacity:
                raw, tokens = raw_capacity(store, args.model, users, args.raw_users)
                report("raw ONNX encoder capacity, MovieLens user texts (users/s)", f"{raw:.2f}  ({tokens:.0f} tokens/user)")
                rates = rates or [raw * f for f in (0.5, 1, 2, 4, 8, 16)]
            model = tiny_artifact(logdir / "tiny") if path == "ceiling" else args.model
            fresh = dataclasses.replace(workload, seen={u: set(items) for u, items in workload.seen.items()})
            capacity[path] = measure_path(path, model, s, store, rates, capacity.get("full", 0.0), args, fresh, logdir, bound, report)
        finally:
            cleanup(s)
    for path in (p for p in capacity if p != "full" and capacity.get("full", 0) > 0):
        report(f"capacity {path} / full", f"{capacity[path] / capacity['full']:.1f}x" + ("" if path == "ceiling" else "  (target >= 5x)"))


def measure_path(path: str, model: Path, s: Settings, store: StateStore, rates: list[float], full_capacity: float,
                 args: argparse.Namespace, workload: Workload, logdir: Path, bound: int, report) -> float:
    """One worker of ``path`` up the ladder of ``rates`` (then ``--refine`` bisections), then at half the full
    path's capacity and half its own; returns its capacity."""
    users_flag, items_flag = PATHS[path]
    w = Worker(s, model, refresh=True, log=logdir / f"inc-{path}.log",
               env={"ONETOWER_INCREMENTAL_USERS": users_flag, "ONETOWER_INCREMENTAL_ITEMS": items_flag,
                    "ONETOWER_LIVE_RECALL_SAMPLE_RATE": "0"})

    def run_at(name: str, rate: float, seed: int) -> Run:
        run = measure(w, s, store, rate, args, workload, seed=seed, prime=args.prime and users_flag == "1")
        report(f"[{path}] {name}{rate:.2f} engagements/s: freshness p50/p95/p99 (s)", f"{run.line()}  load {load()}")
        if users_flag == "1":
            report(f"[{path}]   cache", inc_line(run.inc, bound))
        return run

    try:
        ready(w, s, store, args, workload)
        report(f"[{path}] worker up; load", load())
        best, failed, refined, ladder = 0.0, 0.0, 0, iter(rates)
        for n in itertools.count():
            if not failed:  # up the ladder until a rate fails
                rate = next(ladder, None)
            elif best and refined < args.refine:  # then halve the gap (geometrically)
                rate, refined = (best * failed) ** 0.5, refined + 1
            else:
                rate = None
            if rate is None:
                break
            if run_at("", rate, seed=n).ok:  # the same seeds on every path: the same engagements
                best = rate
            else:
                failed = rate
        report(f"[{path}] capacity: highest rate tried that passed (engagements/s)", f"{best:.2f}")
        if path != "ceiling":
            targets = [("half its own capacity, ", best / 2)]
            if path != "full" and full_capacity:
                targets.insert(0, ("half the full path's capacity, ", full_capacity / 2))
            for n, (name, rate) in enumerate(targets):
                if rate > 0:
                    run_at(name, rate, seed=1000 + n)
        if users_flag == "1":
            report(f"[{path}] cache bytes, highest scraped / bound",
                   f"{w.cache_bytes_max / 2**20:,.0f} MiB / {bound / 2**20:,.0f} MiB "
                   f"({'within' if w.cache_bytes_max <= bound else 'OVER'} the bound)")
        return best
    finally:
        w.stop()


def tiny_artifact(root: Path) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer, exported (the ceiling path's model)."""
    from models.export import export_artifact
    from models.testing import tiny_llama
    from models.tower import build_tower

    base = tiny_llama(root / "llama")
    export_artifact(build_tower(str(base), max_seq_length=256), root / "artifact", base_model=str(base), version="tiny_ceiling")
    return root / "artifact"


def inc_line(inc: dict[str, float], bound: int) -> str:
    hits = inc["onetower_incremental_hits_total"]
    misses = inc["miss_absent"] + inc["miss_diverged"] + inc["miss_version"]
    share = inc["onetower_incremental_tokens_computed_total"] / max(inc["onetower_incremental_tokens_full_total"], 1)
    return (f"hits {hits:.0f}, misses {misses:.0f} (absent {inc['miss_absent']:.0f}, diverged {inc['miss_diverged']:.0f}, "
            f"version {inc['miss_version']:.0f}); tokens computed {share:.0%} of a full encode's; "
            f"{inc['cache_users']:.0f} users, {inc['cache_bytes'] / 2**20:,.0f} MiB (bound {bound / 2**20:,.0f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True,
                    help="artifact (onetower model export --base minilm|smollm2 --out DIR); incremental needs a causal one")
    ap.add_argument("--mode", choices=("all", "live-recall", "incremental"), default="all",
                    help="all: the sections above; live-recall: issue 13; incremental: issue 12")
    ap.add_argument("--workload", choices=("sessions", "random"), default="sessions", help="how steady engagements pick users")
    ap.add_argument("--items", choices=("popularity", "uniform"), default="popularity", help="how steady engagements pick items")
    ap.add_argument("--steady-s", type=float, default=40.0, help="seconds per steady-rate run")
    ap.add_argument("--drain-max-s", type=float, default=60.0,
                    help="a run still draining this long after its last event counts as p99 > 5 s")
    ap.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured seconds at 1 engagement/s after a worker starts")
    ap.add_argument("--lead-s", type=float, default=0.0,
                    help="unmeasured seconds at a run's rate before its window (its sessions' earlier engagements)")
    ap.add_argument("--prime", action=argparse.BooleanOptionalAction, default=True,
                    help="incremental: before each run, an incremental path's worker encodes the users of the sessions "
                         "under way (its steady-state cache; --no-prime: a cache that only the lead-in warms)")
    ap.add_argument("--rounds", type=int, default=2, help="live-recall: rounds of the interleaved arms")
    ap.add_argument("--rate", type=float, default=0.0, help="live-recall: engagements/s [default: half the raw capacity]")
    ap.add_argument("--incremental", choices=("off", "on", "both", "items", "both-items", "all"), default="both",
                    help="incremental: the paths measured (off: full; on: users incremental; items: users and items "
                         "incremental; both: off and on; both-items: off and items; all: the three)")
    ap.add_argument("--rates", type=float, nargs="*", help="incremental: ascending engagements/s [default: raw x 0.5, 1, 2, 4...]")
    ap.add_argument("--refine", type=int, default=1, help="incremental: runs bisecting between the last rate passed and the first failed")
    ap.add_argument("--ceiling", action="store_true", help="incremental: also the full path with a tiny model (the pipeline's ceiling)")
    ap.add_argument("--raw-users", type=int, default=128, help="user texts the raw capacity is measured on")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its workers and cleans up
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
    workload = Workload.from_movielens(args.workload, by_kind["engagements"], ml_users, ml_items, args.items)
    report("started (UTC) / CPUs / load average 1/5/15 min", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} / {os.cpu_count()} / {load()}")
    report("model / mode / steady seconds a run", f"{args.model} / {args.mode} / {args.steady_s:g}")
    report("workload", workload.describe())
    report("MovieLens events (items, users, impressions, engagements)", f"{len(events):,}")
    if args.mode != "all":
        try:
            (live_recall_mode if args.mode == "live-recall" else incremental_mode)(args, base, by_kind, workload, logdir, report)
        finally:
            report("finished (UTC) / load average 1/5/15 min", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} / {load()}")
            print(f"\nworker logs: {logdir}")
        return

    # 1. raw encoder capacity on MovieLens user texts (state applied directly, in this process)
    s0 = fresh_settings(base)
    try:
        store = StateStore.from_settings(s0)
        t = time.perf_counter()
        for start in range(0, len(events), 2000):
            store.apply_many(events[start:start + 2000])
        report("state apply in-process, no Kafka (events/s)", f"{len(events) / (time.perf_counter() - t):,.0f}")
        encoder = Encoder.load(args.model)
        sample = random.Random(0).sample(ml_users, args.raw_users)
        texts = [x for x in user_texts(store, sample, tokenizer=encoder.tokenizer, max_tokens=encoder.max_seq_length, history_block=encoder.history_block) if x]
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
        drained_users = increase(m1, m2, "onetower_encoded_total", kind="users")
        pipeline = drained_users / (t2 - t1) if t2 > t1 else float("nan")
        report("(d) pipeline encode throughput while draining (users/s)", f"{pipeline:.1f}  ({drained_users:.0f} users in {t2 - t1:.1f} s)")
        report("(d) pipeline / raw encoder throughput", f"{pipeline / raw:.0%}")
        busy = increase(m1, m2, "onetower_encode_seconds_sum") / (t2 - t1)
        report("(d) share of the drain's wall time spent inside the encoder", f"{busy:.0%}")

        # 3/4. steady rates over MovieLens users (the workload), now-stamped
        results: dict[float, Run] = {}
        for factor in (0.5, 1.0, 2.0):
            rate = raw * factor
            results[factor] = run = measure(w, s2, store, rate, args, workload, seed=int(factor * 10))
            name = "(b) " if factor == 0.5 else "(c) "
            report(f"{name}steady {rate:.1f} engagements/s ({factor:g} x capacity): freshness p50/p95/p99 (s)", run.line())
        ok = [f for f, run in results.items() if run.ok]
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
    report("finished (UTC) / load average 1/5/15 min", f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} / {load()}")
    print(f"\nworker logs: {logdir}")


if __name__ == "__main__":
    main()
