"""Scale-out figures (issue 14) for docs/SIZING.md; prints figures and writes JSON, asserts nothing.

    python benchmarks/bench_scale.py state              # StateStore.apply_many: events/s of one writer (a worker's apply path)
    python benchmarks/bench_scale.py memory             # Redis bytes per user, per item, per event id (MovieLens replayed)
    python benchmarks/bench_scale.py encoder            # users/s of the served ONNX tower on this CPU (MovieLens user texts)
    python benchmarks/bench_scale.py milvus --n 200000  # insert + HNSW + search QPS at top-100, server memory per vector
    python benchmarks/bench_scale.py ramp               # a feed-shaped stream through Kafka -> workers -> Redis -> refresher
                                                        # -> Milvus at rising rates: lag, freshness p99, CPU per process
    python benchmarks/bench_scale.py plot               # docs/scale_ramp.png from the ramp's JSON

Every part takes fresh prefixes (topics, Redis keys, Milvus collections) and removes them afterwards; the
shared stack is never restarted or flushed. Results go to ``--out`` (default /tmp/onetower-scale/<part>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from core.settings import Settings
from onetower.prefixes import isolated, purge
from streams.events import EngagementEvent, Event, ImpressionEvent, ItemEvent, UserEvent, kind_rank
from streams.producer import EventProducer
from streams.state import StateStore

OUT = Path("/tmp/onetower-scale")
DIM = 512


def write(part: str, result: dict, out: Path | None) -> None:
    path = out or OUT / f"{part}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"part": part, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_avg": os.getloadavg(), "cpus": os.cpu_count(), **result}
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=1, default=str))
    print(f"-> {path}")


# -- a feed-shaped workload ---------------------------------------------------------------------

class Feed:
    """Power-law users and items, sessions: a user opens a session, is shown a few items (impressions),
    engages with some; popular users come back more often, popular items are shown more often."""

    def __init__(self, n_users: int, n_items: int, seed: int = 14, user_alpha: float = 1.1, item_alpha: float = 1.0,
                 session_len: int = 8, engage_p: float = 0.15) -> None:
        self.rng = np.random.default_rng(seed)
        self.n_users, self.n_items = n_users, n_items
        self.user_p = self._zipf(n_users, user_alpha)
        self.item_p = self._zipf(n_items, item_alpha)
        self.session_len, self.engage_p = session_len, engage_p
        self._users = iter(())
        self._items = iter(())

    @staticmethod
    def _zipf(n: int, alpha: float) -> np.ndarray:
        p = 1.0 / np.arange(1, n + 1) ** alpha
        return np.cumsum(p / p.sum())

    def _draw(self, cdf: np.ndarray, k: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, self.rng.random(k)), len(cdf) - 1)

    def sessions(self, n_events: int, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> list[Event]:
        """About ``n_events`` impressions and engagements, session by session, stamped ``now()``."""
        out: list[Event] = []
        users = self._draw(self.user_p, n_events // self.session_len + 1)
        items = self._draw(self.item_p, n_events + self.session_len)
        k = 0
        for u in users:
            ts = now()
            sid = f"s{self.rng.integers(1 << 40)}"
            for _ in range(self.rng.integers(1, 2 * self.session_len)):
                item = f"m{items[k % len(items)]}"
                k += 1
                out.append(ImpressionEvent(user_id=f"u{u}", item_id=item, session_id=sid, ts=ts))
                if self.rng.random() < self.engage_p:
                    out.append(EngagementEvent(user_id=f"u{u}", item_id=item, session_id=sid, ts=ts))
            if len(out) >= n_events:
                break
        return out

    def catalogue(self, ts: datetime) -> list[Event]:
        genres = ["drama", "comedy", "crime", "sci-fi", "documentary", "news", "sports"]
        return [ItemEvent(item_id=f"m{i}", features={"title": f"Post {i}", "genres": genres[i % len(genres)]}, ts=ts)
                for i in range(self.n_items)]

    def profiles(self, n: int, ts: datetime) -> list[Event]:
        jobs = ["writer", "engineer", "student", "artist", "doctor"]
        return [UserEvent(user_id=f"u{u}", features={"age": 18 + u % 60, "occupation": jobs[u % len(jobs)]}, ts=ts)
                for u in range(n)]


# -- state: apply throughput ------------------------------------------------------------------------

def part_state(base: Settings, args: argparse.Namespace) -> dict:
    """One writer applying agent-sized batches (the worker's TAKE_MAX, 500) in one round trip each, as
    ``EventApplier`` does, on a feed over ``--users`` users; and two writers at once (two workers)."""
    feed = Feed(args.users, args.items)
    events = feed.sessions(args.events)
    results = {}
    for writers in (1, 2):
        s = isolated(base, "sc")
        store = StateStore.from_settings(s)
        try:
            store.apply_many(feed.catalogue(datetime.now(timezone.utc) - timedelta(minutes=5)))
            shards = [events[k::writers] for k in range(writers)]
            bar = tqdm(total=len(events), desc=f"apply, {writers} writer(s)", unit="ev")

            def run(shard: list[Event]) -> None:
                own = StateStore.from_settings(s)
                for k in range(0, len(shard), 500):
                    own.apply_many(shard[k:k + 500])
                    bar.update(len(shard[k:k + 500]))

            redis_cpu = cpu_seconds(stack_processes()["redis"])
            t0 = time.perf_counter()
            with ThreadPoolExecutor(writers) as pool:
                list(pool.map(run, shards))
            dt = time.perf_counter() - t0
            redis_cpu = cpu_seconds(stack_processes()["redis"]) - redis_cpu
            bar.close()
            results[f"writers_{writers}"] = {"events": len(events), "seconds": round(dt, 2), "events_per_s": round(len(events) / dt),
                                             "redis_cpu_s": round(redis_cpu, 2)}
            if writers == 1:  # Redis' own CPU per event (other clients of the shared server count too: a floor)
                results["redis_events_per_core_s"] = round(len(events) / max(redis_cpu, 1e-6))
        finally:
            purge(s)
    return {"users": args.users, "items": args.items, **results}


# -- memory: Redis bytes per entity -----------------------------------------------------------------

SHARD_TAG = re.compile(r"^\{s\d+\}")  # the hash tag in front of every sharded key (streams.rules.Keys)


def replayed_movielens(s: Settings) -> tuple[StateStore, dict[str, list[Event]], list[Event]]:
    """MovieLens-100k applied to the state under ``s``'s prefix, in event-time order."""
    from streams.movielens import events_from_wheel, recbole_wheel

    store = StateStore.from_settings(s)
    by_kind = events_from_wheel(recbole_wheel(s))
    events = sorted((e for kind in by_kind.values() for e in kind), key=lambda e: (e.ts, kind_rank(e.kind)))
    for k in tqdm(range(0, len(events), 1000), desc="replay MovieLens", unit="kev"):
        store.apply_many(events[k:k + 1000])
    return store, by_kind, events


def part_memory(base: Settings, args: argparse.Namespace) -> dict:
    """MovieLens-100k replayed into a fresh prefix, then ``MEMORY USAGE`` of every key, grouped per user,
    per item, per idempotency key and for the shared structures."""
    s = isolated(base, "sm")
    try:
        store, by_kind, events = replayed_movielens(s)
        store.refresh_percentile_tables()
        groups: dict[str, int] = {"user": 0, "item": 0, "event_id": 0, "shared": 0}
        n_keys: dict[str, int] = dict.fromkeys(groups, 0)
        keys = list(store.r.scan_iter(match=s.redis_key_prefix + "*", count=10_000))
        pipe = store.r.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        for key, size in zip(keys, tqdm(pipe.execute(), desc="MEMORY USAGE", unit="key")):
            rest = SHARD_TAG.sub("", key.decode()[len(s.redis_key_prefix):])
            group = ("user" if rest.startswith("u:") else "item" if rest.startswith("i:") else
                     "event_id" if rest.startswith(("ev:", "ct:")) else "shared")
            groups[group] += size or 0
            n_keys[group] += 1
        users, items = len(by_kind["users"]), len(by_kind["items"])
        hist = [store.r.zcard(store._u(f"{u}", "h")) for u in range(1, users + 1)]
        return {"events": len(events), "users": users, "items": items, "keys": n_keys, "bytes": groups,
                "bytes_per_user": round(groups["user"] / users), "bytes_per_item": round(groups["item"] / items),
                "bytes_per_event_id": round(groups["event_id"] / max(n_keys["event_id"], 1)),
                "mean_history_len": round(float(np.mean(hist)), 1), "history_len_cap": s.history_len,
                "recent_impressions_cap": s.recent_impressions_len}
    finally:
        purge(s)


# -- encoder: users/s on this CPU ------------------------------------------------------------------

def part_encoder(base: Settings, args: argparse.Namespace) -> dict:
    """The served tower (``models/shipped``, exported once into the state dir) encoding MovieLens user
    texts (profile + history at the token budget), as the refresher batches them; 1 and 2 threads."""
    from models.encoder import Encoder
    from models.texts import user_texts
    from models.tuned import served_artifact

    s = isolated(base, "se")
    try:
        store, _, _ = replayed_movielens(s)
        ids = [str(u) for u in range(1, args.users + 1)]
        texts = [t for t in user_texts(store, ids) if t]
    finally:
        purge(s)
    artifact = served_artifact(s.state_dir / "models")
    out: dict[str, Any] = {"model": str(artifact), "users": len(texts)}
    for threads in (1, 2):
        enc = Encoder.load(artifact, provider="cpu", threads=threads)
        tokens = enc.count_tokens(texts)
        enc.encode(texts[:16])  # warm
        t0 = time.perf_counter()
        enc.encode(texts, show_progress=True)
        dt = time.perf_counter() - t0
        out[f"threads_{threads}"] = {"seconds": round(dt, 2), "users_per_s": round(len(texts) / dt, 1)}
        out["mean_tokens"] = round(float(np.mean(tokens)), 1)
        out["max_seq_length"] = enc.max_seq_length
    return out


# -- milvus: QPS and memory ------------------------------------------------------------------------

def milvus_rss() -> int:
    return sum(p.memory_info().rss for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] and "milvus" in p.info["cmdline"][0] and "standalone" in p.info["cmdline"])


def part_milvus(base: Settings, args: argparse.Namespace) -> dict:
    """``--n`` clustered 512-d unit vectors into one collection (HNSW M=16, efConstruction 200, COSINE,
    the indexer's parameters), flushed, indexed and loaded; search QPS at top-100 (ef 256, Bounded) at
    concurrency 1 and 4; recall@100 against exact search; the server's resident memory before and after."""
    from pymilvus import DataType, MilvusClient

    s = isolated(base, "sv")
    client = MilvusClient(uri=s.milvus_uri, token=s.milvus_token or "")
    name = f"{s.milvus_prefix}scale"
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, DIM)).astype(np.float32)
    out: dict[str, Any] = {"n": args.n, "dim": DIM, "rss_before": milvus_rss()}
    try:
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        client.create_collection(name, schema=schema, consistency_level="Bounded")
        t0 = time.perf_counter()
        sample: list[np.ndarray] = []
        for k in tqdm(range(0, args.n, 10_000), desc="insert", unit="10k"):
            n = min(10_000, args.n - k)
            v = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, DIM)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            sample.append(v)
            client.insert(name, [{"id": f"m{k + j}", "vector": v[j].tolist()} for j in range(n)])
        out["insert_s"] = round(time.perf_counter() - t0, 1)
        vectors = np.concatenate(sample)
        t0 = time.perf_counter()
        client.flush(name)
        params = client.prepare_index_params()
        params.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE", params={"M": 16, "efConstruction": 200})
        client.create_index(name, params)
        bar = tqdm(total=args.n, desc="HNSW build", unit="vec")
        while True:
            info = client.describe_index(name, "vector")
            done = int(info.get("indexed_rows", 0))
            bar.update(done - bar.n)
            if info.get("state") == "Finished" or (done >= args.n and info.get("pending_index_rows", 0) == 0):
                break
            time.sleep(3)
        bar.close()
        out["index_s"] = round(time.perf_counter() - t0, 1)
        rss_indexed = milvus_rss()
        client.load_collection(name)
        time.sleep(5)
        out["rss_loaded"] = milvus_rss()
        out["rss_indexed_unloaded"] = rss_indexed
        queries = centers[rng.integers(0, len(centers), args.queries)] + 0.6 * rng.standard_normal((args.queries, DIM)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        search = {"metric_type": "COSINE", "params": {"ef": 256}}

        def one(q: np.ndarray) -> list:
            return client.search(name, [q.tolist()], limit=100, search_params=search, consistency_level="Bounded")[0]

        for q in queries[:20]:
            one(q)  # warm
        for conc in (1, 4):
            lat: list[float] = []

            def timed(q: np.ndarray) -> list:
                t = time.perf_counter()
                hits = one(q)
                lat.append(time.perf_counter() - t)
                return hits

            t0 = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                results = list(tqdm(pool.map(timed, queries), total=len(queries), desc=f"search k=100, concurrency {conc}"))
            dt = time.perf_counter() - t0
            out[f"concurrency_{conc}"] = {"qps": round(len(queries) / dt, 1), "p50_ms": round(1000 * float(np.percentile(lat, 50)), 1),
                                          "p99_ms": round(1000 * float(np.percentile(lat, 99)), 1)}
        exact = np.argsort(-(queries[:100] @ vectors.T), axis=1)[:, :100]
        got = [{int(h["id"][1:]) for h in r} for r in results[:100]]
        out["recall_at_100"] = round(float(np.mean([len(g & set(e)) / 100 for g, e in zip(got, exact)])), 3)
        out["rss_delta_per_vector"] = round((out["rss_loaded"] - out["rss_before"]) / args.n)
        out["raw_bytes_per_vector"] = DIM * 4
    finally:
        client.drop_collection(name)
        client.close()
    return out


# -- ramp: the real path at rising rates --------------------------------------------------------

def scrape(port: int) -> dict[tuple[str, tuple], float]:
    for attempt in range(5):
        try:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            return {(smp.name, tuple(sorted(smp.labels.items()))): smp.value
                    for fam in text_string_to_metric_families(text) for smp in fam.samples}
        except requests.RequestException:
            time.sleep(1)
    return {}


def metric(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all((k, v2) in lab for k, v2 in labels.items()))


def histogram(samples: dict, name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts by upper edge."""
    out: dict[float, float] = {}
    for (n, lab), v in samples.items():
        d = dict(lab)
        if n == name + "_bucket" and all(d.get(k) == v2 for k, v2 in labels.items()):
            le = float(d["le"])
            out[le] = out.get(le, 0.0) + v
    return dict(sorted(out.items()))


def quantile(cum: dict[float, float], q: float) -> float | None:
    """Interpolated quantile from cumulative buckets (the last finite edge when it lies in +Inf)."""
    if not cum or max(cum.values()) <= 0:
        return None
    total = max(cum.values())
    target, prev_edge, prev_count = q * total, 0.0, 0.0
    for edge, count in cum.items():
        if count >= target:
            if edge == float("inf"):
                return prev_edge
            frac = (target - prev_count) / max(count - prev_count, 1e-9)
            return prev_edge + frac * (edge - prev_edge)
        prev_edge, prev_count = edge, count
    return prev_edge


class Proc:
    def __init__(self, settings: Settings, refresh: bool, log: Path, model: Path | None) -> None:
        env = {**os.environ, "ONETOWER_TOPIC_PREFIX": settings.topic_prefix, "ONETOWER_REDIS_KEY_PREFIX": settings.redis_key_prefix,
               "ONETOWER_MILVUS_PREFIX": settings.milvus_prefix, "ONETOWER_WORKER_METRICS_PORT": "0",
               "ONETOWER_TOPIC_PARTITIONS": str(settings.topic_partitions), "ONETOWER_LIVE_RECALL_SAMPLE_RATE": "0",
               "ONETOWER_REFRESH_DEBOUNCE_S": str(settings.refresh_debounce_s), "OMP_NUM_THREADS": "1"}
        flags = (["--model", str(model)] if model else []) if refresh else ["--no-refresh"]
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", "from onetower.cli import app; app()", "worker", *flags],
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)  # a fresh log: its port only
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 300
        self.port = 0
        while not self.port:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{log.read_text()[-3000:]}")
            found = re.findall(r'"metrics_port": (\d+)', log.read_text())
            self.port = int(found[-1]) if found else 0
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def stack_processes() -> dict[str, list[psutil.Process]]:
    found: dict[str, list[psutil.Process]] = {"kafka": [], "redis": [], "milvus": []}
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "kafka.Kafka" in cmd:
            found["kafka"].append(p)
        elif (p.info["name"] or "").startswith("redis-server") and ":6379" in cmd:
            found["redis"].append(p)
        elif "milvus run standalone" in cmd:
            found["milvus"].append(p)
    return found


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def part_ramp(base: Settings, args: argparse.Namespace) -> dict:
    """A session-shaped stream of impressions and engagements over ``--users`` power-law users and
    ``--items`` items, produced at each rate of ``--rates`` for ``--step-s`` seconds, through the real
    path: Kafka (``--partitions`` per topic) -> ``--workers`` workers (faust, apply to Redis, refresher
    with the served ONNX tower unless ``--no-refresh``) -> Milvus. Per step: events/s applied, the lag
    at the step's end, freshness p50/p99 of the user vectors upserted during the step (from the workers'
    histograms), encoded users/s, the dirty queue, and CPU (cores) per process kind."""
    s = isolated(base, "sr", topic_partitions=args.partitions, refresh_debounce_s=args.debounce)
    feed = Feed(args.users, args.items)
    logs = OUT / "ramp-logs"
    logs.mkdir(parents=True, exist_ok=True)
    store = StateStore.from_settings(s)
    workers: list[Proc] = []
    steps: list[dict] = []
    try:
        from streams.topics import ensure_topics

        ensure_topics(s)
        with EventProducer(s) as producer:
            producer.send_many(feed.catalogue(datetime.now(timezone.utc) - timedelta(minutes=10)))
        workers = [Proc(s, not args.no_refresh, logs / f"worker{k}.log", args.model) for k in range(args.workers)]
        stack = stack_processes()
        print(f"{args.workers} worker(s) started; the catalogue ({args.items} items) applied and encoded first")
        if not args.no_refresh:
            with tqdm(total=args.items, desc="catalogue encoded", unit="item") as bar:
                while True:
                    done = sum(metric(scrape(w.port), "onetower_encoded_total", kind="items") for w in workers)
                    bar.update(int(done) - bar.n)
                    if done >= args.items or time.monotonic() - bar.start_t > args.catalogue_timeout_s:
                        break
                    time.sleep(2)
        prod = EventProducer(s, linger_ms=5)
        for rate in args.rates:
            before = [scrape(w.port) for w in workers]
            cpu0 = {"workers": cpu_seconds([w.ps for w in workers]), **{k: cpu_seconds(v) for k, v in stack.items()},
                    "producer": cpu_seconds([psutil.Process()])}
            t0 = time.monotonic()
            sent = 0
            lags: list[float] = []
            next_lag = t0
            with tqdm(total=int(rate * args.step_s), desc=f"offered {rate} ev/s", unit="ev") as bar:
                while (elapsed := time.monotonic() - t0) < args.step_s:
                    due = int(rate * min(elapsed + 0.1, args.step_s)) - sent
                    if due > 0:
                        batch = feed.sessions(due)[:due]
                        for ev in batch:
                            prod.send(ev)
                        prod.flush()
                        sent += len(batch)
                        bar.update(len(batch))
                    if time.monotonic() >= next_lag:
                        next_lag += 5.0
                        lags.append(sum(metric(scrape(w.port), "onetower_consumer_lag") for w in workers))
                    time.sleep(max(0.0, t0 + elapsed + 0.1 - time.monotonic()))
            wall = time.monotonic() - t0
            after = [scrape(w.port) for w in workers]
            cpu1 = {"workers": cpu_seconds([w.ps for w in workers]), **{k: cpu_seconds(v) for k, v in stack.items()},
                    "producer": cpu_seconds([psutil.Process()])}

            def delta(name: str, **labels: str) -> float:
                return sum(metric(a, name, **labels) - metric(b, name, **labels) for a, b in zip(after, before))

            fresh = {}
            for a, b in zip(after, before):
                ha, hb = histogram(a, "onetower_freshness_seconds", kind="users"), histogram(b, "onetower_freshness_seconds", kind="users")
                for edge in ha:
                    fresh[edge] = fresh.get(edge, 0.0) + ha[edge] - hb.get(edge, 0.0)
            applied = delta("onetower_events_total", outcome="applied")
            step = {
                "offered_per_s": rate, "sent": sent, "seconds": round(wall, 1),
                "applied_per_s": round(applied / wall, 1),
                "lag_end": sum(metric(a, "onetower_consumer_lag") for a in after), "lag_samples": lags,
                "users_encoded_per_s": round(delta("onetower_encoded_total", kind="users") / wall, 1),
                "items_encoded_per_s": round(delta("onetower_encoded_total", kind="items") / wall, 1),
                "freshness_p50_s": quantile(fresh, 0.5), "freshness_p99_s": quantile(fresh, 0.99),
                "dirty_users_end": store.dirty_count("users"),
                "cpu_cores": {k: round((cpu1[k] - cpu0[k]) / wall, 2) for k in cpu0},
                "load_avg": os.getloadavg()[0],
            }
            steps.append(step)
            print(json.dumps(step))
            if step["lag_end"] > args.stop_lag:
                print(f"lag {step['lag_end']:.0f} > {args.stop_lag}: the path is saturated; the ramp stops here")
                break
        prod.close()
        return {"users": args.users, "items": args.items, "workers": args.workers, "partitions": args.partitions,
                "refresh": not args.no_refresh, "debounce_s": args.debounce, "step_s": args.step_s, "steps": steps}
    finally:
        for w in workers:
            w.stop()
        purge(s)


# -- table: the sizing model ---------------------------------------------------------------------

GPU_USERS_PER_S = {"3B causal tower, 512 tokens (H200)": 154, "SmolLM2-135M (H200)": 1345}


def part_table(base: Settings, args: argparse.Namespace) -> dict:
    """The sizing table of docs/SIZING.md from the measured JSONs and the model's assumptions (flags)."""
    import math

    def load(name: str) -> dict:
        return json.loads((args.dir / f"{name}.json").read_text())

    state, memory, milvus = load("state"), load("memory"), load("milvus")
    worker_eps = args.worker_events_per_s or state["writers_1"]["events_per_s"]
    redis_eps = args.redis_events_per_core or state["redis_events_per_core_s"]
    per_vec = max(milvus["rss_delta_per_vector"], int(milvus["raw_bytes_per_vector"] * 1.1))
    qps_core = milvus["concurrency_4"]["qps"] / 2  # 2 cores on this machine
    rows = []
    for users, eng in args.sizes:
        events = round(eng * (1 + args.impressions_per_engagement))
        items = users // args.users_per_item
        dedup_keys = events * args.dedup_ttl_s
        redis_bytes = (users * memory["bytes_per_user"] + items * memory["bytes_per_item"]
                       + dedup_keys * args.dedup_bytes)
        shards_mem = math.ceil(redis_bytes / (args.redis_shard_gb * 2**30))
        shards_cpu = math.ceil(events / (args.utilisation * redis_eps))
        reencodes = eng * args.reencodes_per_engagement
        gpus = {name: math.ceil(reencodes / (args.utilisation * g)) for name, g in GPU_USERS_PER_S.items()}
        qps = users / args.users_per_qps
        milvus_bytes = (users + items * args.item_replicas) * per_vec
        query_nodes = max(math.ceil(milvus_bytes / (args.milvus_node_gb * 2**30)),
                          math.ceil(qps / (args.utilisation * qps_core * args.milvus_node_cores)))
        rows.append({"users": users, "engagements_per_s": eng, "events_per_s": events, "items": items,
                     "workers": math.ceil(events / (args.utilisation * worker_eps)),
                     "redis_gb": round(redis_bytes / 2**30), "redis_dedup_gb": round(dedup_keys * args.dedup_bytes / 2**30),
                     "redis_shards": max(shards_mem, shards_cpu), "redis_shards_mem_cpu": (shards_mem, shards_cpu),
                     "reencodes_per_s": reencodes, "gpus": gpus, "candidates_qps": round(qps),
                     "milvus_gb": round(milvus_bytes / 2**30), "milvus_query_nodes": query_nodes})
    print("| users | engagements/s (events/s) | workers | Redis (of which event ids) | Redis shards (memory, CPU) | "
          + " | ".join(f"GPUs, {n}" for n in GPU_USERS_PER_S) + " | Milvus memory | Milvus query nodes (QPS) |")
    print("|---" * (7 + len(GPU_USERS_PER_S)) + "|")
    for r in rows:
        print(f"| {r['users']:,} | {r['engagements_per_s']:,} ({r['events_per_s']:,}) | {r['workers']:,} | "
              f"{r['redis_gb']:,} GB ({r['redis_dedup_gb']:,} GB) | {r['redis_shards']:,} {r['redis_shards_mem_cpu']} | "
              + " | ".join(f"{g:,}" for g in r["gpus"].values())
              + f" | {r['milvus_gb']:,} GB | {r['milvus_query_nodes']:,} ({r['candidates_qps']:,}) |")
    return {"inputs": {"worker_events_per_s": worker_eps, "redis_events_per_core_s": redis_eps, "milvus_bytes_per_vector": per_vec,
                       "milvus_qps_per_core": qps_core, **{k: v for k, v in vars(args).items() if k not in ("dir", "part", "out", "sizes")}},
            "rows": rows}


def part_plot(base: Settings, args: argparse.Namespace) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(Path(p).read_text()) for p in args.inputs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        label = f"{run['workers']} worker(s), {'refresh' if run['refresh'] else 'state only'}"
        x = [st["offered_per_s"] for st in run["steps"]]
        ax1.plot(x, [st["lag_end"] for st in run["steps"]], marker="o", label=label)
        if run["refresh"]:
            ax2.plot(x, [st["freshness_p99_s"] or float("nan") for st in run["steps"]], marker="o", label=f"{label}: p99")
            ax2.plot(x, [st["freshness_p50_s"] or float("nan") for st in run["steps"]], marker="x", ls="--", label=f"{label}: p50")
    for ax, title, ylab in ((ax1, "consumer lag at the end of each step", "records"),
                            (ax2, "user vector freshness (event -> upsert)", "seconds")):
        ax.set_xscale("log")
        ax.set_yscale("symlog")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("offered events/s (impressions + engagements)")
        ax.set_ylabel(ylab)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("onetower ramp on 2 shared CPU cores (bench_scale.py ramp)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"-> {args.png}")
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    sub = parser.add_subparsers(dest="part", required=True)
    p = sub.add_parser("state")
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=10_000)
    sub.add_parser("memory")
    p = sub.add_parser("encoder")
    p.add_argument("--users", type=int, default=256)
    p = sub.add_parser("milvus")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=400)
    p = sub.add_parser("ramp")
    p.add_argument("--rates", type=int, nargs="+", default=[50, 100, 200, 400, 800, 1600, 3200])
    p.add_argument("--step-s", type=float, default=30.0)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--debounce", type=float, default=0.5)
    p.add_argument("--no-refresh", action="store_true")
    p.add_argument("--model", type=Path)
    p.add_argument("--stop-lag", type=float, default=20_000)
    p.add_argument("--catalogue-timeout-s", type=float, default=300)
    p = sub.add_parser("table")
    p.add_argument("--dir", type=Path, default=OUT)
    p.add_argument("--sizes", type=lambda x: tuple(int(float(v)) for v in x.split(",")), nargs="+",
                   default=[(10_000_000, 1_000), (100_000_000, 10_000), (1_000_000_000, 100_000)], help="USERS,ENGAGEMENTS_PER_S")
    p.add_argument("--impressions-per-engagement", type=float, default=10.0)
    p.add_argument("--users-per-item", type=int, default=10, help="catalogue held in Milvus: users / this")
    p.add_argument("--dedup-ttl-s", type=float, default=3600.0, help="event-id TTL planned (the default setting is 7 days)")
    p.add_argument("--dedup-bytes", type=float, default=150.0)
    p.add_argument("--redis-shard-gb", type=float, default=25.0)
    p.add_argument("--utilisation", type=float, default=0.5, help="planned share of measured capacity (headroom for p99, rebalances)")
    p.add_argument("--reencodes-per-engagement", type=float, default=1.0)
    p.add_argument("--users-per-qps", type=float, default=10_000.0, help="peak candidates QPS = users / this")
    p.add_argument("--item-replicas", type=int, default=2)
    p.add_argument("--milvus-node-gb", type=float, default=96.0)
    p.add_argument("--milvus-node-cores", type=int, default=16)
    p.add_argument("--worker-events-per-s", type=float)
    p.add_argument("--redis-events-per-core", type=float)
    p = sub.add_parser("plot")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--png", type=Path, default=Path("docs/scale_ramp.png"))
    args = parser.parse_args()
    parts: dict[str, Callable[[Settings, argparse.Namespace], dict]] = {
        "state": part_state, "memory": part_memory, "encoder": part_encoder, "milvus": part_milvus, "ramp": part_ramp,
        "table": part_table, "plot": part_plot}
    result = parts[args.part](Settings(), args)
    if args.part != "plot":
        write(args.part, result, args.out)


if __name__ == "__main__":
    main()
