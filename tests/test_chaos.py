"""Chaos: a MovieLens slice replayed into a unique prefix while the worker is killed (SIGKILL) at seeded
random points and restarted each time, with one Redis restart (a private redis-server) and one Milvus
restart (the shared server: this test restarts the stack, so it runs last). The final Redis state and
Milvus vectors must equal those of a clean run by one worker that is never killed.

Size: ``ONETOWER_CHAOS_EVENTS`` activity events (default 3,000) and ``ONETOWER_CHAOS_KILLS`` kills
(default 5; the reliability issue runs 20 once); ``ONETOWER_CHAOS_SEED`` picks the kill points;
``ONETOWER_CHAOS_RESTART_MILVUS=0`` leaves the shared Milvus alone (while others use it).
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pytest

from indexer.milvus import MilvusStore
from onetower import stack
from onetower.prefixes import isolated, purge
from core.settings import Settings
from streams.events import Event, kind_rank
from streams.movielens import events_from_wheel, recbole_wheel
from streams.producer import EventProducer
from streams.state import StateStore
from streams.topics import dead_letters
from tests.test_worker import Worker, poll, semantic_state, tiny_model, vectors_reflect_state  # noqa: F401

N_EVENTS = int(os.environ.get("ONETOWER_CHAOS_EVENTS", "3000"))
N_KILLS = max(int(os.environ.get("ONETOWER_CHAOS_KILLS", "5")), 2)
SEED = int(os.environ.get("ONETOWER_CHAOS_SEED", "7"))
RESTART_MILVUS = os.environ.get("ONETOWER_CHAOS_RESTART_MILVUS", "1") != "0"  # 0: spare a shared server others use now
VERSION = "tiny_streams"
COSINE = 0.9999
SETTLE_S = 900 + N_EVENTS / 5

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.restarts_stack,
              pytest.mark.timeout(int(2 * SETTLE_S + 200 * N_KILLS))]


@dataclass(frozen=True)
class Slice:
    """The first ``N_EVENTS`` ratings of MovieLens-100k as events, and the catalogue they touch."""

    catalogue: list[Event]
    activity: list[Event]
    users: list[str]
    items: list[str]


@dataclass
class Outcome:
    state: tuple
    vectors: dict[str, dict[str, np.ndarray]]
    seconds: float


@pytest.fixture(scope="module")
def movielens(local_stack: Settings) -> Slice:
    events = events_from_wheel(recbole_wheel(local_stack))
    activity = sorted(events["impressions"] + events["engagements"], key=lambda e: (e.ts, kind_rank(e.kind)))
    activity = activity[:N_EVENTS]
    users, items = sorted({e.user_id for e in activity}), sorted({e.item_id for e in activity})
    catalogue = ([e for e in events["items"] if e.item_id in set(items)]
                 + [e for e in events["users"] if e.user_id in set(users)])
    return Slice(catalogue, activity, users, items)


def run_settings(base: Settings, tag: str) -> Settings:
    """A unique prefix; leases short (a killed worker's batch comes back soon), a debounce longer than
    the refresher's table reload, so an item is never encoded with tables older than its check, and
    every bucket move re-encoded, so both runs end on the final buckets (with a hysteresis an item's
    vector may keep buckets a few points off, and which ones depends on when it was last encoded)."""
    return isolated(base, tag, refresh_lease_s=3.0, refresh_debounce_s=1.5, bucket_hysteresis=1)


@pytest.fixture()
def clean_settings(local_stack: Settings) -> Iterator[Settings]:
    s = run_settings(local_stack, "cl")
    yield s
    purge(s)


@pytest.fixture()
def chaos_settings(private_redis: Settings) -> Iterator[Settings]:
    s = run_settings(private_redis, "ch")
    yield s
    purge(s)


def applied(store: StateStore) -> int:
    """Events applied so far (one idempotency key each; the slice's ids are all distinct)."""
    return sum(1 for _ in store.r.scan_iter(match=store.keys.every_shard("ev:*"), count=10_000))


def quiescent(store: StateStore) -> bool:
    return (store.dirty_count("users") == 0 and store.dirty_count("items") == 0
            and store.unchecked_count() == 0)


def send(settings: Settings, events: Sequence[Event]) -> None:
    with EventProducer(settings) as producer:
        producer.send_many(events)


def settle(settings: Settings, sl: Slice, started: float) -> Outcome:
    """Wait until every event is applied and every vector reflects the state; refit the percentile
    tables on the final counts first (as a worker does every ``percentile_refresh_s``), so that both
    runs bucket the same counts with the same tables. Returns the state and the vectors."""
    store, index = StateStore.from_settings(settings), MilvusStore(settings)
    total = len(sl.catalogue) + len(sl.activity)
    poll(f"{total} events applied", lambda: applied(store) >= total, timeout=SETTLE_S)
    poll("quiescence", lambda: quiescent(store), timeout=SETTLE_S)
    store.refresh_percentile_tables()
    poll("quiescence after the refit", lambda: quiescent(store), timeout=SETTLE_S)
    poll("every vector to reflect the state",
         lambda: vectors_reflect_state(index, store, VERSION, sl.users, sl.items), timeout=SETTLE_S)
    state = semantic_state(store, sl.users, sl.items)
    vectors = {kind: index.get_vectors(kind, VERSION, ids, strong=True)
               for kind, ids in (("users", sl.users), ("items", sl.items))}
    assert applied(store) == total
    assert not list(dead_letters(settings)) and not store.quarantined("users") and not store.quarantined("items")
    return Outcome(state, vectors, time.monotonic() - started)


def catalogue_applied(store: StateStore, sl: Slice) -> bool:
    return (all(st is not None and st.profile for st in store.users(sl.users))
            and all(st is not None and st.features for st in store.items(sl.items)))


def clean_run(settings: Settings, sl: Slice, model: Path, logs: Path) -> Outcome:
    started = time.monotonic()
    w = Worker(settings, model, logs / "clean.log")
    try:
        send(settings, sl.catalogue)  # the catalogue first: users' texts show their items' features
        poll("the catalogue applied", lambda: catalogue_applied(StateStore.from_settings(settings), sl))
        send(settings, sl.activity)
        return settle(settings, sl, started)
    finally:
        w.stop(signal.SIGKILL)


def wait_applying(w: Worker, timeout: float = 150.0) -> None:
    """Until the worker applied something (it holds partitions), or ``timeout``: a kill comes either way."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and w.proc.poll() is None and w.events("applied") + w.events("duplicate") == 0:
        time.sleep(0.3)


def kill_point(w: Worker, rng: random.Random) -> str:
    """Wait for a seeded random moment: soon (a fresh worker is still joining the group), mid-apply, or
    a little later (more batches applied, the refresher encoding and upserting)."""
    how = rng.choice(["soon", "mid-apply", "mid-apply", "later"])
    if how == "soon":
        time.sleep(rng.uniform(0.0, 3.0))
        return how
    wait_applying(w)
    time.sleep(rng.uniform(0.0, 1.0) if how == "mid-apply" else rng.uniform(2.0, 10.0))
    return how


def restart_redis(settings: Settings) -> None:
    server = stack.Redis(settings)
    server.stop()
    server.start()


def restart_milvus(settings: Settings) -> None:
    server = stack.Milvus(settings)
    server.stop()
    server.start()


def chaos_run(settings: Settings, shared: Settings, sl: Slice, model: Path, logs: Path, rng: random.Random) -> Outcome:
    """The slice in ``N_KILLS + 1`` chunks of random sizes: a chunk is sent, a worker started, and killed
    at a random point (one of them survives a Redis restart, one a Milvus restart); the last one finishes."""
    started = time.monotonic()
    cuts = sorted(rng.sample(range(1, len(sl.activity)), N_KILLS))
    chunks = [sl.activity[a:b] for a, b in zip([0, *cuts], [*cuts, len(sl.activity)])]
    redis_at, milvus_at = rng.sample(range(N_KILLS), 2)
    restarts: dict[int, Callable[[], None]] = {redis_at: lambda: restart_redis(settings)}
    if RESTART_MILVUS:
        restarts[milvus_at] = lambda: restart_milvus(shared)
    store = StateStore.from_settings(settings)
    send(settings, sl.catalogue)
    for k in range(N_KILLS):
        if k == 1:  # the catalogue first (see clean_run), applied by however many workers it took
            poll("the catalogue applied", lambda: catalogue_applied(store, sl), timeout=SETTLE_S)
        send(settings, chunks[k])
        w = Worker(settings, model, logs / f"chaos{k}.log")
        if k in restarts:
            wait_applying(w)
            restarts[k]()
        how = kill_point(w, rng)
        assert w.proc.poll() is None, f"worker {k} died on its own:\n{w.log.read_text()[-3000:]}"
        w.stop(signal.SIGKILL)
        print(f"kill {k + 1}/{N_KILLS} ({how}{', after a Redis restart' if k == redis_at else ''}"
              f"{', after a Milvus restart' if k == milvus_at and RESTART_MILVUS else ''}): {applied(store)} events applied so far")
    send(settings, chunks[-1])
    w = Worker(settings, model, logs / "chaos-final.log")
    try:
        return settle(settings, sl, started)
    finally:
        w.stop(signal.SIGKILL)


def cosines(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {i: float(np.dot(a[i], b[i]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[i]))) for i in a}


def test_kills_and_restarts_end_in_the_clean_runs_state_and_vectors(
        local_stack: Settings, clean_settings: Settings, chaos_settings: Settings, movielens: Slice,
        tiny_model: Path, tmp_path: Path) -> None:
    sl = movielens
    clean = clean_run(clean_settings, sl, tiny_model, tmp_path)
    print(f"\nclean run: {len(sl.catalogue)} catalogue + {len(sl.activity)} activity events, {len(sl.users)} users, "
          f"{len(sl.items)} items, settled in {clean.seconds:.0f}s")
    chaos = chaos_run(chaos_settings, local_stack, sl, tiny_model, tmp_path, random.Random(SEED))
    print(f"chaos run: {N_KILLS} kills, 1 Redis and {int(RESTART_MILVUS)} Milvus restart, settled in {chaos.seconds:.0f}s")
    assert chaos.state == clean.state  # profiles, histories, item features and counters, engaged items
    for kind in ("users", "items"):
        assert chaos.vectors[kind].keys() == clean.vectors[kind].keys() == set(getattr(sl, kind)), kind
        cos = cosines(chaos.vectors[kind], clean.vectors[kind])
        worst = sorted(cos, key=cos.get)[:5]
        assert cos[worst[0]] >= COSINE, f"{kind} farthest from the clean run: {[(i, cos[i]) for i in worst]}"
        # The check can tell vectors apart: different entities' vectors are farther apart than that.
        ids = list(clean.vectors[kind])
        neighbours = {i: clean.vectors[kind][j] for i, j in zip(ids, ids[1:])}
        others = cosines(neighbours, {i: clean.vectors[kind][i] for i in neighbours})
        assert np.median(list(others.values())) < COSINE, kind
