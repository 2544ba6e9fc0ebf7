"""Scale-out: several ``onetower worker`` processes on one consumer group, through a rebalance.

Own topics with 12 partitions, three workers (``--no-refresh``, live recall off: state only, low CPU)
on one group. A known stream of events is produced at a steady pace; one worker is SIGKILLed
mid-stream and a new one joins; more events follow; once the group's committed offsets reach the end
of every partition (lag 0), Redis must hold exactly what the events imply: every user's engaged set,
history and impressions, every item's counters, change number and state version, one idempotency
key per event (nothing lost, nothing applied twice), and the same state as one in-process writer
applying each event once. The partitions must have moved: every worker alive at the end held some,
the three split all 48 (4 topics x 12) with no overlap, and so does the group's own description.

Faust's defaults wait 60 s for a killed member's session to expire; the workers here get a 10 s
session (``BROKER_SESSION_TIMEOUT``, read by faust from the environment). Nothing asserts a timing.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator, Sequence

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from core.settings import Settings
from onetower.prefixes import isolated, purge
from streams.events import EngagementEvent, Event, ImpressionEvent, ItemEvent, UserEvent
from streams.producer import EventProducer
from streams.state import StateStore
from streams.topics import ensure_topics
from tests.test_worker import Worker, onetower_env, poll, reference_state, semantic_state

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(900)]

PARTITIONS = 12
KINDS = ("items", "users", "impressions", "engagements")
N_USERS, N_ITEMS = 300, 150
PHASE_A, PHASE_B = 6000, 2000  # impressions per phase (about 40% of them also engaged)
PACE = 1500  # events a second while phase A is produced, so the kill and the join land mid-stream
SESSION_S = 10


class StateWorker(Worker):
    """``onetower worker --no-refresh`` with live recall off and a short group session."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.log = log
        env = {**onetower_env(settings), "ONETOWER_LIVE_RECALL_SAMPLE_RATE": "0",
               "BROKER_SESSION_TIMEOUT": str(SESSION_S), "BROKER_HEARTBEAT_INTERVAL": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", "from onetower.cli import app; app()", "worker", "--no-refresh"],
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
        self.port = poll(f"worker metrics port in {log}", self._port, timeout=120)


def stream(n_impressions: int, start: datetime, rng: random.Random, first: int) -> list[Event]:
    """Impressions of power-law-ish users and items, 40% engaged; event times strictly increasing."""
    out: list[Event] = []
    for k in range(n_impressions):
        user = f"u{min(int(rng.paretovariate(1.2)) - 1, N_USERS - 1)}" if rng.random() < 0.5 else f"u{rng.randrange(N_USERS)}"
        item = f"m{min(int(rng.paretovariate(1.0)) - 1, N_ITEMS - 1)}" if rng.random() < 0.5 else f"m{rng.randrange(N_ITEMS)}"
        ts = start + timedelta(milliseconds=2 * (first + k))
        out.append(ImpressionEvent(user_id=user, item_id=item, ts=ts))
        if rng.random() < 0.4:
            out.append(EngagementEvent(user_id=user, item_id=item, ts=ts + timedelta(microseconds=500)))
    return out


def catalogue(ts: datetime) -> list[Event]:
    return ([ItemEvent(item_id=f"m{i}", features={"title": f"Movie {i}"}, ts=ts) for i in range(N_ITEMS)]
            + [UserEvent(user_id=f"u{u}", features={"age": 20 + u % 50}, ts=ts) for u in range(N_USERS)])


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def expected_effects(events: Sequence[Event], history_len: int, impressions_len: int) -> dict:
    """What applying each event exactly once implies, computed here without Redis."""
    engaged: dict[str, dict[str, int]] = defaultdict(dict)  # user -> item -> latest engagement ms
    shown: dict[str, dict[str, int]] = defaultdict(dict)
    n_eng: Counter[str] = Counter()
    imp_of: Counter[str] = Counter()
    eng_of: Counter[str] = Counter()
    for ev in events:
        if isinstance(ev, EngagementEvent):
            engaged[ev.user_id][ev.item_id] = max(engaged[ev.user_id].get(ev.item_id, 0), ms(ev.ts))
            n_eng[ev.user_id] += 1
            eng_of[ev.item_id] += 1
        elif isinstance(ev, ImpressionEvent):
            shown[ev.user_id][ev.item_id] = max(shown[ev.user_id].get(ev.item_id, 0), ms(ev.ts))
            imp_of[ev.item_id] += 1

    def capped(latest: dict[str, int], cap: int) -> list[tuple[str, int]]:
        return sorted(latest.items(), key=lambda kv: kv[1])[-cap:]

    users = {f"u{u}" for u in range(N_USERS)}
    items = {f"m{i}" for i in range(N_ITEMS)}
    return {
        "engaged": {u: set(engaged[u]) for u in users},
        "history": {u: capped(engaged[u], history_len) for u in users},
        "impressions": {u: capped(shown[u], impressions_len) for u in users},
        "user_version": {u: 1 + n_eng[u] for u in users},  # the profile event, then one per engagement
        "item_counts": {i: (imp_of[i], eng_of[i]) for i in items},
        "item_changes": {i: imp_of[i] + eng_of[i] for i in items},
        "item_version": {i: 1 + imp_of[i] + eng_of[i] for i in items},  # features, then one per counted signal
    }


def observed_effects(store: StateStore) -> dict:
    r = store.r
    users, items = [f"u{u}" for u in range(N_USERS)], [f"m{i}" for i in range(N_ITEMS)]

    def zset(key: str) -> list[tuple[str, int]]:
        return [(m.decode(), int(s)) for m, s in r.zrange(key, 0, -1, withscores=True)]

    def total(key: str) -> int:
        return sum(int(v) for v in r.hvals(key))

    return {
        "engaged": {u: {m.decode() for m in r.smembers(store._u(u, "e"))} for u in users},
        "history": {u: zset(store._u(u, "h")) for u in users},
        "impressions": {u: zset(store._u(u, "i")) for u in users},
        "user_version": {u: int(r.hget(store._u(u, "m"), "v") or 0) for u in users},
        "item_counts": {i: (total(store._i(i, "c:impressions")), total(store._i(i, "c:engagements"))) for i in items},
        "item_changes": {i: int(r.hget(store._i(i, "m"), "n") or 0) for i in items},
        "item_version": {i: int(r.hget(store._i(i, "m"), "v") or 0) for i in items},
    }


def idempotency_keys(store: StateStore) -> int:
    return sum(1 for _ in store.r.scan_iter(match=store.keys.every_shard("ev:*"), count=10_000))


def group_of(admin: KafkaAdminClient, settings: Settings) -> str:
    groups = [g["group_id"] for g in admin.list_groups() if g["group_id"].endswith(settings.topic_prefix.rstrip("."))]
    assert len(groups) == 1, groups
    return groups[0]


def group_lag(admin: KafkaAdminClient, consumer: KafkaConsumer, group: str, settings: Settings) -> int:
    """Records not yet covered by the group's committed offsets, over every partition of the 4 topics."""
    tps = [TopicPartition(settings.topic(k), p) for k in KINDS for p in range(PARTITIONS)]
    ends = consumer.end_offsets(tps)
    committed = admin.list_group_offsets({group: tps})[group]
    return sum(ends[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0) for tp in tps)


def group_assignment(admin: KafkaAdminClient, group: str) -> dict[str, set[tuple[str, int]]]:
    """Member id -> the partitions the group's coordinator says it holds (empty while rebalancing)."""
    desc = admin.describe_groups([group])[group]
    if desc["group_state"] != "Stable":
        return {}
    return {m["member_id"]: {(a["topic"], p) for a in m["member_assignment"]["assigned_partitions"] for p in a["partitions"]}
            for m in desc["members"]}


def split(workers: Sequence[Worker], everything: set[tuple[str, str]]) -> list[set[tuple[str, str]]] | None:
    """Each worker's partitions (from its lag metric) once they are disjoint, non-empty and cover everything."""
    held = [w.partitions() for w in workers]
    if all(held) and sum(len(h) for h in held) == len(everything) and set().union(*held) == everything:
        return held
    return None


@pytest.fixture()
def rsettings(local_stack: Settings) -> Iterator[Settings]:
    s = isolated(local_stack, "rb", topic_partitions=PARTITIONS)
    yield s
    admin = KafkaAdminClient(**s.kafka_client_config())
    try:
        admin.delete_groups([g["group_id"] for g in admin.list_groups() if g["group_id"].endswith(s.topic_prefix.rstrip("."))])
    except Exception:  # noqa: BLE001 - best effort: a group with no members expires on its own
        pass
    finally:
        admin.close()
    purge(s)


def test_workers_rebalance_through_a_kill_and_a_join_and_apply_every_event_once(rsettings: Settings, tmp_path: Path) -> None:
    s = rsettings
    store = StateStore.from_settings(s)
    rng = random.Random(14)
    start = datetime.now(timezone.utc) - timedelta(minutes=30)
    cat = catalogue(start - timedelta(minutes=1))
    phase_a = stream(PHASE_A, start, rng, 0)
    phase_b = stream(PHASE_B, start, rng, PHASE_A)
    everything_sent = cat + phase_a + phase_b
    ensure_topics(s)  # 12 partitions each, before any client can create one with the broker's default

    started: list[StateWorker] = []
    admin = KafkaAdminClient(**s.kafka_client_config())
    offsets = KafkaConsumer(**s.kafka_client_config(), group_id=None, enable_auto_commit=False)
    t0 = time.monotonic()
    try:
        def start_worker() -> StateWorker:
            w = StateWorker(s, tmp_path / f"worker{len(started)}.log")
            started.append(w)
            return w

        a, b, victim = start_worker(), start_worker(), start_worker()
        with EventProducer(s) as producer:
            producer.send_many(cat)  # also gives every partition a high watermark, so the lag metric lists it
        all_partitions = {(s.topic(k), str(p)) for k in KINDS for p in range(PARTITIONS)}
        before = poll("three workers to split the 48 partitions", lambda: split([a, b, victim], all_partitions))
        print(f"\n3 workers split the partitions {[len(h) for h in before]} after {time.monotonic() - t0:.0f}s")

        def produce_paced(events: list[Event]) -> None:
            with EventProducer(s) as p:
                for k in range(0, len(events), PACE // 10):
                    p.send_many(events[k:k + PACE // 10])
                    time.sleep(0.1)

        sender = threading.Thread(target=produce_paced, args=(phase_a,), daemon=True)
        sender.start()
        # Mid-stream: the victim has applied some of its share, and its last batches are not committed yet.
        poll("the victim to be applying", lambda: victim.events("applied") > 300, timeout=300)
        applied_by_victim = victim.events("applied")
        victim.stop(signal.SIGKILL)
        joiner = start_worker()
        sender.join()
        print(f"victim killed after applying {applied_by_victim:.0f} events; a fourth worker joined")
        after = poll("the two survivors and the joiner to split the 48 partitions",
                     lambda: split([a, b, joiner], all_partitions), timeout=300)
        print(f"after the rebalance {[len(h) for h in after]} (a, b, joiner), {time.monotonic() - t0:.0f}s")
        with EventProducer(s) as producer:
            producer.send_many(phase_b)

        group = group_of(admin, s)
        poll("the group's lag to reach 0", lambda: group_lag(admin, offsets, group, s) == 0, timeout=300)
        print(f"lag 0 after {time.monotonic() - t0:.0f}s")
        members = poll("a stable group", lambda: group_assignment(admin, group))

        # The partitions moved: the victim held some, now the survivors and the joiner hold them all; the group agrees.
        owner_before = {tp: name for name, held in zip(("a", "b", "victim"), before) for tp in held}
        owner_after = {tp: name for name, held in zip(("a", "b", "joiner"), after) for tp in held}
        moved = sum(owner_before[tp] != owner_after[tp] for tp in all_partitions)
        print(f"{moved} of {len(all_partitions)} partitions changed owner; the victim's {len(before[2])} went to "
              f"{dict(Counter(owner_after[tp] for tp in before[2]))}")
        assert before[2] and all(after), (before, after)
        assert moved >= len(before[2])
        assert len(members) == 3
        member_sets = list(members.values())
        assert all(member_sets) and sum(len(m) for m in member_sets) == len(all_partitions)
        assert set().union(*member_sets) == {(t, int(p)) for t, p in all_partitions}
        assert sorted(len(m) for m in member_sets) == sorted(len(h) for h in after)

        # Exactly once: every event's effect, none twice, none missing.
        expected = expected_effects(everything_sent, s.history_len, s.recent_impressions_len)
        observed = observed_effects(store)
        for key in expected:
            wrong = [k for k in expected[key] if expected[key][k] != observed[key][k]]
            assert not wrong, f"{key}: {len(wrong)} differ, e.g. {wrong[0]}: expected {expected[key][wrong[0]]}, got {observed[key][wrong[0]]}"
        assert idempotency_keys(store) == len(everything_sent)
        users, items = [f"u{u}" for u in range(N_USERS)], [f"m{i}" for i in range(N_ITEMS)]
        assert semantic_state(store, users, items) == reference_state(s, everything_sent, users, items)
        survivors = [a, b, joiner]
        duplicates = sum(w.events("duplicate") for w in survivors)
        applied_after = sum(w.events("applied") for w in survivors)
        assert applied_after < len(everything_sent)  # the victim's applied events count: none was applied twice
        assert joiner.events("applied") > 0
        assert all(w.proc.poll() is None for w in survivors)
        print(f"{len(everything_sent)} events, each applied once; the survivors applied {applied_after:.0f} and recognised "
              f"{duplicates:.0f} replayed duplicates; {time.monotonic() - t0:.0f}s in all")
    finally:
        for w in started:  # a graceful stop leaves the group at once, so the fixture can delete it
            try:
                w.stop(signal.SIGTERM)
            except subprocess.TimeoutExpired:
                w.stop(signal.SIGKILL)
        offsets.close()
        admin.close()
