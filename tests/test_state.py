"""StateStore semantics on the real redis-server and on a Redis Cluster (``any_redis``): histories,
counters, idempotency, dirty queues."""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone
from typing import Iterator

import pytest
import redis

from core.settings import Settings
from onetower.prefixes import isolated
from streams.counters import BUCKET_MS, COUNTER_NAMES, WINDOWS_H
from streams.events import EngagementEvent, ImpressionEvent, ItemEvent, UserEvent
from streams.state import HistoryEntry, StateStore, rejected

pytestmark = pytest.mark.stack

T0 = 1_700_000_000_000

ALL_SETTLED = 2**62  # a settle time after every dirty mark: pop whatever is queued


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def snapshot(store: StateStore) -> dict[bytes, object]:
    """Every key under the store's prefix with its type-aware value (the whole state, comparable)."""
    r = store.r
    out: dict[bytes, object] = {}
    for key in r.scan_iter(match=f"{store.p}*"):
        kind = r.type(key)
        if kind == b"string":
            out[key] = r.get(key)
        elif kind == b"hash":
            out[key] = r.hgetall(key)
        elif kind == b"zset":
            out[key] = r.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            out[key] = r.smembers(key)
        else:
            raise AssertionError(f"unexpected type {kind!r} of {key!r}")
    return out


def drop_prefix(store: StateStore) -> None:
    """Delete this test's keys (and only those: the stack is shared)."""
    store.clear()


@pytest.fixture()
def store(any_redis: Settings) -> Iterator[StateStore]:
    s = StateStore.from_settings(any_redis.model_copy(update={"history_len": 3, "recent_impressions_len": 2}))
    yield s
    drop_prefix(s)


def test_history_is_capped_deduplicated_and_event_time_ordered(store: StateStore) -> None:
    events = [EngagementEvent(user_id="u:1", item_id=item, ts=at(T0 + dt)) for item, dt in
              [("a", 10), ("b", 20), ("a", 30), ("c", 5), ("d", 40), ("e", 1)]]
    assert store.apply_many(events) == [True] * 6
    (user,) = store.users(["u:1"])
    # 'a' keeps its latest time; 'c' (5) and 'e' (1, out of order) fall off the 3-item cap.
    assert user.history == [HistoryEntry("b", T0 + 20), HistoryEntry("a", T0 + 30), HistoryEntry("d", T0 + 40)]
    assert user.updated_ms == T0 + 40
    assert store.engaged_items("u:1") == {"a", "b", "c", "d", "e"}
    assert store.users(["nobody"]) == [None]


def test_replayed_events_change_nothing(store: StateStore) -> None:
    events = [
        UserEvent(user_id="u1", features={"age": 30, "job": "writer"}, ts=at(T0)),
        ItemEvent(item_id="i1", features={"title": "Heat", "year": 1995}, ts=at(T0)),
        ImpressionEvent(user_id="u1", item_id="i1", ts=at(T0 + 1)),
        EngagementEvent(user_id="u1", item_id="i1", ts=at(T0 + 2)),
        ImpressionEvent(user_id="u1", item_id="i2", ts=at(T0 + 3)),
    ]
    assert store.apply_many(events) == [True] * len(events)
    before = snapshot(store)
    assert store.apply_many(events) == [False] * len(events)
    assert all(store.apply(ev) is False for ev in events)
    assert snapshot(store) == before
    (item,) = store.items(["i1"])
    assert item.counters["impressions_1h"] == 1 and item.counters["engagements_7d"] == 1


def test_counters_are_windows_as_of_the_items_newest_counter_event(store: StateStore) -> None:
    rng = random.Random(6)
    seen: list[tuple[str, str, int]] = []
    events = []
    for _ in range(400):
        item = rng.choice("xyz")
        ts = T0 + rng.randrange(0, 10 * 24 * BUCKET_MS)  # ten days, in random (out-of-order) arrival
        cls = rng.choice([ImpressionEvent, EngagementEvent])
        events.append(cls(user_id=f"u{rng.randrange(5)}", item_id=item, ts=at(ts)))
        seen.append((cls.kind, item, ts))
    store.apply_many(events)
    for state in store.items(["x", "y", "z"]):
        now = max(ts for _, item, ts in seen if item == state.item_id) // BUCKET_MS
        assert state.counters == {
            f"{signal}_{window}": sum(1 for s, item, ts in seen if s == signal and item == state.item_id
                                      and now - hours < ts // BUCKET_MS <= now)
            for signal in ("impressions", "engagements") for window, hours in WINDOWS_H.items()}
        assert set(state.counters) == set(COUNTER_NAMES)
    # Buckets older than the longest window are pruned, so memory per item stays bounded.
    assert len(store.r.hkeys(store._i("x", "c:impressions"))) <= 24 * 7 + 1


def test_servable_counters_are_the_counters_of_items_serving_can_offer(store: StateStore) -> None:
    store.apply_many([
        ItemEvent(item_id="shown", features={"title": "A"}, ts=at(T0)),
        ItemEvent(item_id="gone", features={"title": "B"}, ts=at(T0)),
        ItemEvent(item_id="gone", deleted=True, ts=at(T0 + 1)),
        *(EngagementEvent(user_id=f"u{n}", item_id=item, ts=at(T0 + n))
          for n, item in enumerate(["shown", "shown", "gone", "no-features"])),
    ])
    got = store.servable_counters(["shown", "gone", "no-features", "unknown"])
    assert set(got) == {"shown"}  # deleted, feature-less and unknown items cannot be served
    assert got["shown"] == store.items(["shown"])[0].counters and got["shown"]["engagements_7d"] == 2


def test_profiles_and_features_take_the_newest_event_time(store: StateStore) -> None:
    store.apply_many([
        UserEvent(user_id="u1", features={"age": 30, "city": "Oslo"}, ts=at(T0 + 10)),
        UserEvent(user_id="u1", features={"age": 99}, ts=at(T0)),  # older, arrives late: ignored
        ItemEvent(item_id="i1", features={"title": "Heat", "rating": 4.5, "new": True}, ts=at(T0)),
        ItemEvent(item_id="i1", features={"title": "Heat (1995)"}, ts=at(T0 + 5)),
        ItemEvent(item_id="i2", features={"title": "Gone"}, ts=at(T0)),
        ItemEvent(item_id="i2", deleted=True, ts=at(T0 + 1)),
    ])
    (user,) = store.users(["u1"])
    assert user.profile == {"age": 30, "city": "Oslo"} and user.updated_ms == T0 + 10
    i1, i2 = store.items(["i1", "i2"])
    assert i1.features == {"title": "Heat (1995)"} and not i1.deleted and i1.updated_ms == T0 + 5
    assert i2.deleted and i2.features == {}
    store.apply(ItemEvent(item_id="i3", features={"title": "T", "rating": 4.5, "new": True}, ts=at(T0)))
    assert store.items(["i3"])[0].features == {"title": "T", "rating": 4.5, "new": True}
    wide = {f"{n:x}": 0 for n in range(2000)}  # about the most features the 16 KiB cap lets through
    assert store.apply(ItemEvent(item_id="i4", features=wide, ts=at(T0)))
    assert store.items(["i4"])[0].features == wide


def test_dirty_queue_debounces_leases_and_requeues(store: StateStore) -> None:
    now = int(time.time() * 1000)
    store.apply_many([EngagementEvent(user_id="a", item_id="i", ts=at(T0))], now_ms=now - 5000)
    store.apply_many([EngagementEvent(user_id="a", item_id="j", ts=at(T0 + 1)),
                      EngagementEvent(user_id="b", item_id="i", ts=at(T0))], now_ms=now)
    # 'a' keeps its first-dirty time; 'b' is still inside the debounce window.
    first = store.pop_dirty("users", 10, settled_before_ms=now - 1000)
    assert first.ids == ["a"]
    assert store.pop_dirty("users", 10, settled_before_ms=now - 1000).ids == []
    # A change while 'a' is being encoded queues it again, but nobody takes it while the lease lives.
    store.apply(EngagementEvent(user_id="a", item_id="k", ts=at(T0 + 2)))
    second = store.pop_dirty("users", 10, settled_before_ms=now + 10_000)
    assert second.ids == ["b"]
    assert store.ack_dirty("users", first) == []
    third = store.pop_dirty("users", 10, settled_before_ms=now + 10_000)
    assert third.ids == ["a"]
    store.ack_dirty("users", second)
    store.ack_dirty("users", third)
    assert store.dirty_count("users") == 0


def test_an_unacknowledged_pop_returns_after_its_lease(any_redis: Settings) -> None:
    store = StateStore.from_settings(any_redis.model_copy(update={"refresh_lease_s": 0.2}))
    try:
        store.mark_dirty("items", {"i1": 1, "i2": 2})
        (crashed,) = store.pop_dirty("items", 1, settled_before_ms=10).ids  # the popper "crashes"
        assert store.pop_dirty("items", 5, settled_before_ms=10).ids == list({"i1", "i2"} - {crashed})
        time.sleep(0.3)
        again = store.pop_dirty("items", 5, settled_before_ms=10)
        assert sorted(again.ids) == ["i1", "i2"]
        assert store.ack_dirty("items", again) == []
        assert store.dirty_count("items") == 0
    finally:
        drop_prefix(store)


def test_a_stalled_workers_ack_leaves_the_lease_of_the_worker_that_took_over(any_redis: Settings) -> None:
    slow = StateStore.from_settings(any_redis.model_copy(update={"refresh_lease_s": 0.05}))
    fast = StateStore.from_settings(any_redis)
    inflight = slow.keys.near("u", "inflight:users")
    try:
        slow.mark_dirty("users", {"u": 1})
        stalled = slow.pop_dirty("users", 10, settled_before_ms=10)
        assert stalled.ids == ["u"]
        time.sleep(0.2)  # the slow worker's batch outlives its lease
        taken = fast.pop_dirty("users", 10, settled_before_ms=10)
        assert taken.ids == ["u"]
        # The stalled worker's ack ends nothing of the other's lease; its write may be the older one,
        # so the entity is queued to be encoded once more after the other's ack.
        assert slow.ack_dirty("users", stalled) == ["u"]
        assert fast.r.zscore(inflight, "u") is not None
        assert fast.pop_dirty("users", 10, settled_before_ms=ALL_SETTLED).ids == []
        assert fast.ack_dirty("users", taken) == []
        assert fast.r.zscore(inflight, "u") is None
        again = fast.pop_dirty("users", 10, settled_before_ms=ALL_SETTLED)
        assert again.ids == ["u"]
        fast.quarantine("users", stalled, {"u": "a stale holder's verdict"})  # a lost lease quarantines nothing
        assert fast.quarantined("users") == {}
        assert fast.ack_dirty("users", again) == [] and fast.dirty_count("users") == 0
    finally:
        drop_prefix(fast)


def test_items_are_dirty_for_counters_only_when_their_bucket_moves(store: StateStore) -> None:
    ids = [f"i{n}" for n in range(200)]
    store.apply_many([ItemEvent(item_id=i, features={"title": i}, ts=at(T0)) for i in ids])
    store.ack_dirty("items", store.pop_dirty("items", 1000, settled_before_ms=ALL_SETTLED))
    # Most items were never shown; three were: the tables' top edge sits below the top item.
    store.apply_many([ImpressionEvent(user_id="u", item_id=i, ts=at(T0 + k))
                      for i, times in [("i199", 5), ("i198", 2), ("i197", 1)] for k in range(times)])
    tables = store.refresh_percentile_tables()
    assert set(tables) == set(COUNTER_NAMES)
    assert store.percentile_tables()["impressions_1h"] == tables["impressions_1h"]
    first = store.pop_dirty("items", 1000, settled_before_ms=ALL_SETTLED)
    assert sorted(first.ids) == sorted(ids)  # their vectors had no buckets yet
    store.ack_dirty("items", first)
    assert store.check_buckets() == []  # the counted queue from before the refresh: nothing moved since
    assert store.dirty_count("items") == 0

    # One more impression for the top item keeps it in the top bucket; the same for an item on a
    # bucket edge moves it.
    top, edge = "i199", "i0"
    before = store.items([top, edge])
    store.apply_many([ImpressionEvent(user_id="u", item_id=top, ts=at(T0 + 100)),
                      ImpressionEvent(user_id="u", item_id=edge, ts=at(T0 + 100))])
    after = store.items([top, edge])
    moved = {s.item_id for s, a in zip(before, after)
             if any(tables[c].bucket(s.counters[c]) != tables[c].bucket(a.counters[c]) for c in COUNTER_NAMES)}
    assert top not in moved and edge in moved  # the test's premise
    assert store.check_buckets() == [edge]
    # A catalogue change comes before a bucket move even when it is newer; an item in both queues
    # is popped once.
    later = int(time.time() * 1000) + 5
    store.apply_many([ItemEvent(item_id="new", features={"title": "new"}, ts=at(T0))], now_ms=later)
    assert store.pop_dirty("items", 1, settled_before_ms=later + 1).ids == ["new"]
    store.apply_many([ItemEvent(item_id=edge, features={"title": "renamed"}, ts=at(T0 + 1))], now_ms=later)
    assert store.pop_dirty("items", 100, settled_before_ms=later + 1).ids == [edge]
    assert store.pop_dirty("items", 100, settled_before_ms=later + 1).ids == []
    assert store.dirty_count("items") == 2  # both leased until acknowledged
    assert store.unchecked_count() == 0


def test_bucket_moves_below_the_hysteresis_accumulate_until_they_reach_it(store: StateStore) -> None:
    """Item k has k impressions (k = 0..99): the tables put a count c about c points up, so n more
    impressions move an item about n points (one either way: the percentiles' rounding)."""
    strict = StateStore(store.r, store.settings.model_copy(update={"bucket_hysteresis": 1}))
    loose = StateStore(store.r, store.settings.model_copy(update={"bucket_hysteresis": 5}))
    ids = [f"i{k}" for k in range(100)]
    loose.apply_many([ItemEvent(item_id=i, features={"title": i}, ts=at(T0)) for i in ids])
    loose.apply_many([ImpressionEvent(user_id="u", item_id=f"i{k}", ts=at(T0 + n)) for k in range(100) for n in range(k)])
    tables = loose.refresh_percentile_tables()
    assert abs(tables["impressions_24h"].bucket(60) - tables["impressions_24h"].bucket(50) - 10) <= 1  # the test's premise
    loose.ack_dirty("items", loose.pop_dirty("items", 1000, settled_before_ms=ALL_SETTLED))
    assert loose.check_buckets() == []
    sent = iter(range(1000, 2000))

    def impressions(item: str, n: int) -> None:
        loose.apply_many([ImpressionEvent(user_id="v", item_id=item, ts=at(T0 + next(sent))) for _ in range(n)])

    impressions("i50", 2)
    impressions("i60", 1)
    assert loose.check_buckets() == []  # about 2 and 1 points: below 5
    impressions("i50", 8)
    assert loose.check_buckets() == ["i50"]  # about 2 + 8 points from the buckets it was last queued with
    impressions("i50", 1)
    impressions("i60", 1)
    assert loose.check_buckets() == []  # i50 counted from its new buckets: about 1 point; i60 about 2
    impressions("i60", 1)
    assert strict.check_buckets() == ["i60"]  # every move counts at 1
    assert loose.dirty_count("items") == 2


def test_ids_are_scanned_per_prefix(store: StateStore, any_redis: Settings) -> None:
    other = StateStore.from_settings(any_redis.model_copy(update={"redis_key_prefix": any_redis.redis_key_prefix + "x:"}))
    try:
        store.apply_many([UserEvent(user_id="u:1", ts=at(T0)), ImpressionEvent(user_id="u2", item_id="i:m", ts=at(T0))])
        other.apply(UserEvent(user_id="z", ts=at(T0)))
        assert set(store.user_ids()) == {"u:1", "u2"}
        assert set(store.item_ids()) == {"i:m"}
        assert set(other.user_ids()) == {"z"}
        assert store.recent_impressions("u2") == [HistoryEntry("i:m", T0)]
    finally:
        drop_prefix(other)


def test_an_event_its_own_state_fails_is_rejected_alone_and_can_be_applied_after_a_fix(store: StateStore) -> None:
    store.r.set(store._u("broken", "h"), "not a history")  # a key of the wrong type: ZADD fails inside the script
    events = [EngagementEvent(user_id="ok", item_id="i", ts=at(T0)), EngagementEvent(user_id="broken", item_id="i", ts=at(T0)),
              EngagementEvent(user_id="ok", item_id="j", ts=at(T0 + 1))]
    results = store.try_apply_many(events)
    assert results[0] is True and results[2] is True
    assert rejected(results[1]) and "WRONGTYPE" in str(results[1])
    with pytest.raises(redis.ResponseError, match="^REJECTED WRONGTYPE"):
        store.apply(EngagementEvent(user_id="broken", item_id="k", ts=at(T0)))
    store.r.delete(store._u("broken", "h"))
    assert store.apply(events[1])  # the claim was released: the fixed replay applies it (once)
    assert not store.apply(events[1])
    assert [h.item_id for h in store.users(["broken"])[0].history] == ["i"]


def test_a_retry_after_one_part_of_an_event_failed_applies_only_the_other(store: StateStore) -> None:
    """An engagement changes the user in the user's shard and the item's counters in the item's, each part
    claimed on its own: the part that failed is applied by the retry, the other is not applied again."""
    event = EngagementEvent(user_id="u", item_id="i", ts=at(T0))
    store.r.set(store._i("i", "m"), "not a hash")  # the counting part fails (before any write), once
    (result,) = store.try_apply_many([event])
    assert rejected(result)
    assert [h.item_id for h in store.users(["u"])[0].history] == ["i"] and not store.r.exists(store._i("i", "c:engagements"))
    store.r.delete(store._i("i", "m"))  # the fix
    assert store.apply(event)  # the counting part only
    assert not store.apply(event)
    once = StateStore.from_settings(isolated(store.settings))
    try:
        assert once.apply(event)
        assert (store.users(["u"]), store.items(["i"]), store.engaged_items("u")) == \
            (once.users(["u"]), once.items(["i"]), once.engaged_items("u"))
        assert store.users(["u"])[0].version == 1 and store.items(["i"])[0].counters["engagements_1h"] == 1
    finally:
        once.clear()


def test_an_unrenderable_item_is_left_out_of_its_users_texts(store: StateStore) -> None:
    from models.texts import item_texts, user_texts

    t = datetime(2024, 1, 1, tzinfo=timezone.utc)
    store.apply_many([ItemEvent(item_id=i, features={"title": f"Movie {i}"}, ts=t) for i in ("ok", "bad")]
                     + [EngagementEvent(user_id="u", item_id=i, kind_="like", ts=t) for i in ("ok", "bad")])
    store.r.hset(store._i("bad", "f"), "year", "NaN")  # stored before validation rejected NaN
    (text,) = user_texts(store, ["u"])
    assert "Movie ok" in text and "Movie bad" not in text
    with pytest.raises(ValueError, match="year"):  # the item itself still fails, and is quarantined by the refresher
        item_texts(store, ["bad"])
