"""No training/serving skew: the same events replayed through Redis (``StateStore``, the real server, and
a Redis Cluster: ``any_redis``) and through ``ReferenceState`` (what training builds on) read the same, and the dataset's examples
hold the texts serving would have made from Redis at the same moment."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from core.settings import Settings
from models.texts import has_text, item_texts, user_state_texts, user_texts
from onetower.prefixes import isolated
from streams.counters import BUCKET_MS, SIGNALS, hour_bucket
from streams.events import EVENT_TYPES, EngagementEvent, Event, ImpressionEvent, ItemEvent, UserEvent
from streams.rules import RULES, HistoryEntry, ReferenceState, UserState
from streams.state import StateStore
from training.dataset import DatasetOptions, _time_key, build_examples

pytestmark = pytest.mark.stack

T0 = 1_700_000_000_000
DAY = 24 * BUCKET_MS
CAPS = {"history_len": 3, "recent_impressions_len": 2}


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


@pytest.fixture()
def store(any_redis: Settings) -> Iterator[StateStore]:
    s = StateStore.from_settings(any_redis.model_copy(update=CAPS))
    yield s
    s.clear()


def replay(store: StateStore, events: Sequence[Event], ref: ReferenceState | None = None) -> ReferenceState:
    """Apply ``events`` in order to Redis and to the reference state (a new one by default); both say
    the same about each (applied, or a replayed id)."""
    ref = ref or ReferenceState.from_settings(store.settings)
    assert store.apply_many(events) == [ref.apply(e) for e in events]
    return ref


def assert_same(store: StateStore, ref: ReferenceState, users: Sequence[str] = (), items: Sequence[str] = ()) -> None:
    """Every read Redis and the reference offer agrees: states (None where neither has one), sets,
    buckets, tables, texts, for the given ids (default: those the reference has state for)."""
    users, items = list(users or ref.user_ids()), list(items or ref.item_ids())
    assert store.users(users) == ref.users(users)
    assert store.items(items) == ref.items(items)
    for uid in users:
        assert store.engaged_items(uid) == ref.engaged_items(uid)
        assert store.recent_impressions(uid) == ref.recent_impressions(uid)
    for iid in items:
        for signal in SIGNALS:
            stored = {int(b): int(n) for b, n in store.r.hgetall(store._i(iid, f"c:{signal}")).items()}
            assert stored == ref.counter_buckets(iid, signal)
    assert store.refresh_percentile_tables() == ref.refresh_percentile_tables()
    assert store.percentile_tables() == ref.percentile_tables()
    assert user_texts(store, users) == user_texts(ref, users)
    assert item_texts(store, items) == item_texts(ref, items)


def test_every_event_kind_has_a_rule() -> None:
    assert set(RULES) == set(EVENT_TYPES.values())


def test_engaging_twice_with_one_item_keeps_one_entry_at_the_latest_time(store: StateStore) -> None:
    ref = replay(store, [ItemEvent(item_id=i, features={"title": f"Movie {i}"}, ts=at(T0)) for i in "abcd"] + [
        EngagementEvent(user_id="u", item_id="a", ts=at(T0 + 10)),
        EngagementEvent(user_id="u", item_id="b", ts=at(T0 + 20)),
        EngagementEvent(user_id="u", item_id="a", ts=at(T0 + 30)),  # again: moves to the end, not a second entry
        EngagementEvent(user_id="u", item_id="c", ts=at(T0 + 5)),  # older than the rest: first to leave the cap
        EngagementEvent(user_id="u", item_id="d", ts=at(T0 + 40)),
    ])
    assert [h.item_id for h in ref.users(["u"])[0].history] == ["b", "a", "d"]
    assert ref.engaged_items("u") == {"a", "b", "c", "d"}
    assert user_texts(ref, ["u"]) == ["[USER][HISTORY][ITEM][TITLE] Movie b[ITEM][TITLE] Movie a[ITEM][TITLE] Movie d"]
    assert ref.items(["a"])[0].counters["engagements_1h"] == 2
    assert_same(store, ref)


def test_an_older_profile_event_arriving_late_is_ignored_and_an_equal_one_wins(store: StateStore) -> None:
    ref = replay(store, [
        UserEvent(user_id="u", features={"age": 30}, ts=at(T0 + 10)),
        UserEvent(user_id="u", features={"age": 99}, ts=at(T0)),
        UserEvent(user_id="v", features={"age": 1}, ts=at(T0)),
        UserEvent(user_id="v", features={"age": 2}, ts=at(T0)),
    ])
    assert [u.profile for u in ref.users(["u", "v"])] == [{"age": 30}, {"age": 2}]
    assert ref.users(["u"])[0].version == 1
    assert_same(store, ref)


def test_an_item_deleted_after_being_engaged_leaves_texts_but_keeps_history_and_counters(store: StateStore) -> None:
    ref = replay(store, [
        ItemEvent(item_id="a", features={"title": "A"}, ts=at(T0)),
        ItemEvent(item_id="b", features={"title": "B"}, ts=at(T0)),
        EngagementEvent(user_id="u", item_id="a", ts=at(T0 + 1)),
        EngagementEvent(user_id="u", item_id="b", ts=at(T0 + 2)),
        ItemEvent(item_id="a", deleted=True, ts=at(T0 + 3)),
        ItemEvent(item_id="a", features={"title": "A again"}, ts=at(T0 + 2)),  # older than the delete: ignored
    ])
    (a,) = ref.items(["a"])
    assert a.deleted and a.features == {} and a.counters["engagements_7d"] == 1
    assert [h.item_id for h in ref.users(["u"])[0].history] == ["a", "b"]
    assert user_texts(ref, ["u"]) == ["[USER][HISTORY][ITEM][TITLE] B"] and item_texts(ref, ["a"]) == [None]
    assert_same(store, ref)
    replay(store, [ItemEvent(item_id="a", features={"title": "A back"}, ts=at(T0 + 4))], ref)  # a newer event restores it
    assert user_texts(ref, ["u"]) == ["[USER][HISTORY][ITEM][TITLE] A back[ITEM][TITLE] B"]
    assert_same(store, ref)


def test_equal_timestamps_order_by_member_bytes_and_replays_change_nothing(store: StateStore) -> None:
    same = at(T0 + 7)
    events: list[Event] = [EngagementEvent(user_id="u", item_id=i, ts=same) for i in ("b", "a", "B", "c")]
    events += [ImpressionEvent(user_id="u", item_id=i, ts=same) for i in ("z", "y", "x")]
    ref = replay(store, events + events[:3])  # the replayed ids: False on both sides
    assert [h.item_id for h in ref.users(["u"])[0].history] == ["a", "b", "c"]  # 'B' < 'a' in bytes: dropped first
    assert ref.recent_impressions("u") == [HistoryEntry("y", T0 + 7), HistoryEntry("z", T0 + 7)]
    assert_same(store, ref)


def test_counters_are_read_as_of_the_items_newest_event_and_pruned_past_seven_days(store: StateStore) -> None:
    ref = replay(store, [ItemEvent(item_id="a", features={"title": "A"}, ts=at(T0))]
                 + [ImpressionEvent(user_id="u", item_id="a", ts=at(T0 + n * BUCKET_MS)) for n in range(3)])
    assert ref.items(["a"])[0].counters["impressions_1h"] == 1  # as of the newest impression, not of a clock
    replay(store, [ImpressionEvent(user_id="u", item_id="a", ts=at(T0 + 8 * DAY))], ref)
    assert ref.counter_buckets("a", "impressions") == {hour_bucket(T0 + 8 * DAY): 1}  # the rest is out of every window
    replay(store, [ImpressionEvent(user_id="u", item_id="a", ts=at(T0 + 1))], ref)  # too old: pruned as it lands
    assert ref.items(["a"])[0].counters == {"impressions_1h": 1, "impressions_24h": 1, "impressions_7d": 1,
                                            "engagements_1h": 0, "engagements_24h": 0, "engagements_7d": 0}
    assert_same(store, ref)


# ---------------------------------------------------------------- random event sequences

USERS, ITEMS = ("u", "v"), ("a", "b", "B", "c")
TIMES = (0, BUCKET_MS, DAY, 8 * DAY + 1)  # few: equal times are common; far apart: windows and pruning
features = st.dictionaries(st.sampled_from(["title", "age", "genres", "x"]),
                           st.one_of(st.integers(-2, 2), st.sampled_from(["A", "b c", ""]), st.booleans(), st.just(2.5)),
                           max_size=3)
common = {"event_id": st.sampled_from([f"e{n}" for n in range(30)]), "ts": st.sampled_from(TIMES).map(lambda dt: at(T0 + dt))}
events = st.lists(st.one_of(
    st.builds(ItemEvent, item_id=st.sampled_from(ITEMS), features=features, deleted=st.booleans(), **common),
    st.builds(UserEvent, user_id=st.sampled_from(USERS), features=features, **common),
    st.builds(ImpressionEvent, user_id=st.sampled_from(USERS), item_id=st.sampled_from(ITEMS), **common),
    st.builds(EngagementEvent, user_id=st.sampled_from(USERS), item_id=st.sampled_from(ITEMS), **common),
), min_size=10, max_size=40)


@hypothesis_settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=events)
def test_redis_and_the_reference_agree_on_any_event_sequence(any_redis: Settings, events: list[Event]) -> None:
    store = StateStore.from_settings(isolated(any_redis, history_len=2, recent_impressions_len=2))
    try:
        assert_same(store, replay(store, events), USERS, ITEMS)
    finally:
        store.clear()


# ---------------------------------------------------------------- the dataset holds serving's texts


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from models.tower import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())


def assert_examples_are_servings(settings: Settings, events: list[Event], options: DatasetOptions, tokenizer) -> int:
    """Build the dataset, then replay the events through Redis in the builder's order, refitting the
    tables once per engagement hour as the builder does, and check every example against the texts
    serving makes from Redis just before its timestamp. Returns the number of examples checked."""
    data = build_examples(events, options, tokenizer)
    examples: dict[tuple[int, str, str], dict] = {}
    for split in ("train", "val", "test"):
        for row in data.splits[split].to_pylist():
            examples[(row["ts_ms"], row["user_id"], row["item_id"])] = row
    store = StateStore.from_settings(settings.model_copy(update={"history_len": options.history_len,
                                                                 "recent_impressions_len": options.recent_impressions_len}))
    checked, hour = 0, None
    try:
        ordered = sorted(events, key=_time_key)
        groups: dict[int, list[Event]] = {}
        for e in ordered:
            groups.setdefault(e.ts_ms, []).append(e)
        for t, group in groups.items():
            engagements = [e for e in group if isinstance(e, EngagementEvent)]
            if engagements and hour_bucket(t) != hour:
                store.refresh_percentile_tables()
                hour = hour_bucket(t)
            for e in engagements:
                row = examples.pop((t, e.user_id, e.item_id), None)
                (positive,) = item_texts(store, [e.item_id])
                assert (row is None) == (positive is None)
                if row is None:
                    continue
                user = store.users([e.user_id])[0] or UserState(e.user_id, {}, [], -1)
                assert row["query"] == user_state_texts(store, [user], tokenizer=tokenizer, max_tokens=options.max_seq_length, history_block=options.history_block)[0]
                assert row["positive"] == positive
                engaged = store.engaged_items(e.user_id)
                assert sorted(row["history"]) == sorted(engaged)
                shown = [h.item_id for h in reversed(store.recent_impressions(e.user_id))
                         if h.item_id not in engaged | {e.item_id}]
                hard = [x for x, st_ in zip(shown, store.items(shown)) if has_text(st_)][:options.hard_negatives]
                assert row["negative_ids"][:row["n_hard"]] == hard
                negatives = [row[f"negative_{n}"] for n in range(1, options.hard_negatives + 1)]
                assert negatives == item_texts(store, row["negative_ids"])
                checked += 1
            store.apply_many(group)
    finally:
        store.clear()
    assert not examples  # every example was checked
    return checked


def test_the_datasets_examples_hold_servings_texts(settings: Settings, tokenizer) -> None:
    events: list[Event] = [ItemEvent(item_id=i, features={"title": f"Movie {i}"}, ts=at(T0)) for i in "abcdefg"]
    events += [UserEvent(user_id="u", features={"age": 30}, ts=at(T0 + 5)), UserEvent(user_id="u", features={"age": 99}, ts=at(T0)),
               ImpressionEvent(user_id="u", item_id="e", ts=at(T0 + 1)), ImpressionEvent(user_id="u", item_id="f", ts=at(T0 + 2)),
               ImpressionEvent(user_id="u", item_id="g", ts=at(T0 + 3))]
    for n, item in enumerate("abacdab"):  # engages twice with a and b; two engagements share a timestamp
        events.append(EngagementEvent(user_id="u", item_id=item, ts=at(T0 + 10 + min(n, 5) * BUCKET_MS)))
        events.append(EngagementEvent(user_id="w", item_id=item, ts=at(T0 + 9 * DAY + n)))  # counters pruned by then
    events += [ItemEvent(item_id="c", deleted=True, ts=at(T0 + 6 * BUCKET_MS)),
               EngagementEvent(user_id="x", item_id="c", ts=at(T0 + 7 * BUCKET_MS))]  # deleted: no example
    options = DatasetOptions(hard_negatives=2, history_len=3, recent_impressions_len=2, val_fraction=0.2, test_fraction=0.2)
    assert assert_examples_are_servings(settings, events, options, tokenizer) == 13
    raw = build_examples(events, options.model_copy(update={"counts_mode": "raw"}), tokenizer)
    rows = [r for split in raw.splits.values() for r in split.to_pylist() if (r["user_id"], r["item_id"]) == ("w", "a")]
    # raw counts as of a's newest counter event: w's two engagements; u's, nine days before, are out of every window
    assert rows[-1]["positive"].endswith("[ENGAGEMENTS_1H] 2[ENGAGEMENTS_24H] 2[ENGAGEMENTS_7D] 2")


def test_a_movielens_slice_gives_servings_texts(settings: Settings, tokenizer) -> None:
    from streams.movielens import events_from_wheel, recbole_wheel

    by_kind = events_from_wheel(recbole_wheel(settings))
    impressions = by_kind["impressions"][:1000]
    last = impressions[-1].ts_ms
    events = by_kind["items"] + by_kind["users"] + impressions + [e for e in by_kind["engagements"] if e.ts_ms <= last]
    assert assert_examples_are_servings(settings, events, DatasetOptions(history_len=20), tokenizer) > 300
