"""Fuzzing the stream worker through the real broker (hypothesis).

Malformed and edge-case records (huge ints, deep nesting, NaN/Infinity, tombstones, non-object JSON,
bad ids, absurd timestamps, oversized features, invalid UTF-8, missing fields, wrong types, repeated
event ids, records without an id) interleaved with valid events go as raw bytes (kafka-python, not
the SDK) to a running ``onetower worker`` under a unique prefix. Then: every valid event is applied
exactly once (counted from Redis), every invalid record is in the DLQ with a reason, the worker never
restarted; and the training reader judges the same topics the same way (same invalid counts, same
event ids, duplicates collapsed).

Size: ``ONETOWER_FUZZ_RECORDS`` records (default 1,000; the reliability issue runs 10,000 once).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, Phase, given, settings as hsettings, strategies as st
from kafka import KafkaProducer

from onetower.prefixes import isolated, purge
from core.settings import Settings
from streams.events import (ID_PATTERN, INT64, MAX_DEAD_RAW_BYTES, MAX_FEATURES_BYTES, MAX_PAST, EngagementEvent, Event,
                            ImpressionEvent, InvalidEvent, Origin, event_type, parse_event)
from streams.state import StateStore
from streams.topics import dead_letters, ensure_topics
from tests.test_worker import Worker, poll, tiny_model  # noqa: F401  (tiny_model: the session fixture)
from training.dataset import DatasetOptions, ReadStats, load_or_build, read_events

N_RECORDS = int(os.environ.get("ONETOWER_FUZZ_RECORDS", "1000"))
BATCH = 20  # records per hypothesis example
KINDS = ("items", "users", "impressions", "engagements")
NOW = datetime.now(timezone.utc)
USERS = [f"u{n}" for n in range(8)] + ["a:b", "x@y.z", "-", "U" * 128]
ITEMS = [f"i{n}" for n in range(12)] + ["m:1", "9", "_", "I" * 128]

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(900 + N_RECORDS // 4)]


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One record as sent, with what the worker must do with it."""

    kind: str
    key: bytes | None
    value: bytes | None
    event: Event | None  # the event it carries (None: it must be dead-lettered)
    has_id: bool = True  # False: the worker derives the id from the record's coordinates

    @property
    def why(self) -> str:
        return f"{self.kind} key={self.key!r} value={self.value if self.value is None else self.value[:300]!r}"

    def __repr__(self) -> str:  # values run to hundreds of kB
        return f"Record({self.why}, valid={self.event is not None}, has_id={self.has_id})"


def _at(us: int) -> datetime:
    return NOW + timedelta(microseconds=us)


DAY_US = 86_400 * 10**6
VALID_TS = st.one_of(
    st.integers(-7 * DAY_US, 0).map(_at),  # the last week
    st.integers(-(MAX_PAST.days - 2) * DAY_US, 0).map(_at),  # any age the window accepts (2 days to spare)
    st.integers(0, 20 * 3600 * 10**6).map(_at),  # up to 20 h ahead (clock skew)
).flatmap(lambda t: st.integers(-14, 14).map(lambda h: t.astimezone(timezone(timedelta(hours=h)))))
FEATURE_VALUE = st.one_of(st.text(max_size=40), st.integers(*INT64), st.sampled_from(INT64),
                          st.floats(allow_nan=False, allow_infinity=False), st.booleans())
FEATURES = st.dictionaries(st.text(max_size=12), FEATURE_VALUE, max_size=6)
GOOD_ID = st.from_regex(ID_PATTERN.strip("^$"), fullmatch=True)


@st.composite
def valid_data(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """(kind, Kafka key, JSON-ready fields) of a valid event; the event id may be missing."""
    kind = draw(st.sampled_from(KINDS))
    user, item = draw(st.sampled_from(USERS)), draw(st.sampled_from(ITEMS))
    key = item if kind == "items" else user
    data: dict[str, Any] = {"ts": draw(VALID_TS)}
    ident = draw(st.one_of(st.none(), GOOD_ID, st.integers(0, 20).map(lambda k: f"dup.{key[:100]}.{k}")))
    if ident is not None:  # dup.<key>.<k>: a repeated id on one key, so one partition orders the copies
        data["event_id"] = ident
    if kind == "items":
        data |= {"item_id": item, "features": draw(FEATURES), "deleted": draw(st.sampled_from([False] * 5 + [True]))}
    elif kind == "users":
        data |= {"user_id": user, "features": draw(FEATURES)}
    else:
        data |= {"user_id": user, "item_id": item}
        if draw(st.booleans()):
            data["session_id"] = draw(st.text(max_size=128))
        if kind == "engagements" and draw(st.booleans()):
            data["kind"] = draw(st.text(min_size=1, max_size=32))
    if kind == "items" and draw(st.integers(0, 30)) == 0:  # just under the features limit
        data["features"] = {"blob": "b" * (MAX_FEATURES_BYTES - 20)}
    return kind, key, data


def _dumps(data: dict[str, Any], ascii_only: bool = True) -> bytes:
    text = json.dumps({k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}, ensure_ascii=ascii_only)
    return text.encode(errors="surrogatepass")  # a lone surrogate becomes bytes that are not UTF-8


@st.composite
def valid_record(draw: st.DrawFn) -> Record:
    kind, key, data = draw(valid_data())
    event = event_type(kind).model_validate(data)
    return Record(kind, key.encode(), _dumps(data, draw(st.booleans())), event, has_id="event_id" in data)


BAD_ID = st.one_of(st.sampled_from(["", " u1", "u 1", "u*", 'u"', "ü", "x" * 129, "a\nb", "u\x00", "\ud800", "%", "[u]"]),
                   st.text(min_size=1, max_size=140).filter(lambda s: not re.fullmatch(ID_PATTERN, s)))
BAD_TS = st.one_of(
    st.sampled_from(["2024-01-01T00:00:00", "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1970-01-01T00:00:00Z",
                     "not a date", "", "2024-13-45T99:99:99Z", 0, -1, 10**20, [], {}, None]),
    st.integers(2 * 86_400, 10**6 * 86_400).map(lambda s: (NOW + timedelta(seconds=s)).isoformat()),  # days ahead
    st.integers(1, 10**5).map(lambda d: (NOW - MAX_PAST - timedelta(days=d)).isoformat()),  # past the 40 years
)
WRONG_TYPE = {  # per field: values of a type it does not take (bool is left out where lax parsing takes it)
    "id": [5, 1.5, [], {}, None, True, ["u0"], {"id": "u0"}],
    "features": [5, 1.5, [], None, True, "x", ["u0"]],
    "deleted": [5, 1.5, [], {}, None, "maybe", ["u0"]],
    "ts": [[], {}, None, "x", ["2024-01-01T00:00:00Z"]],
    "schema": [5, 1.5, [], {}, None, "x", 2],
}
NOT_OBJECT = st.one_of(st.sampled_from([b"[]", b"null", b"1", b'"str"', b"true", b"-0.0", b'[{"user_id":"u0","item_id":"i0"}]']),
                       st.lists(st.integers()).map(lambda x: json.dumps(x).encode()))
BAD_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf5\x80\x80\x80", b"\x80"])
DEPTH = st.sampled_from([1_000, 5_000, 100_000])


def _required(kind: str) -> list[str]:
    return {"items": ["item_id"], "users": ["user_id"]}.get(kind, ["user_id", "item_id"])


@st.composite
def invalid_value(draw: st.DrawFn, kind: str, data: dict[str, Any]) -> bytes | None:
    """A value that is not a valid ``kind`` event: ``data`` (a valid one) broken in one of many ways."""
    how = draw(st.sampled_from(["binary", "utf8", "huge_int", "int64", "deep", "deep_inside", "nan", "tombstone",
                                "non_object", "bad_id", "bad_event_id", "bad_ts", "oversized", "huge", "missing",
                                "wrong_type", "extra", "schema", "surrogate", "feature_type", "truncated"]))
    field_ = draw(st.sampled_from(_required(kind)))
    body = _dumps(data)
    if how == "binary":
        return draw(st.binary(max_size=64).filter(lambda b: not _parses(kind, b)))
    if how == "utf8":
        return body.replace(f'"{data[field_]}"'.encode(), b'"' + draw(BAD_UTF8) + data[field_].encode() + b'"', 1)
    if how == "huge_int":
        return body.replace(f'"{data[field_]}"'.encode(), b"7" * draw(st.sampled_from([4_301, 5_000, 50_000])), 1)
    if how == "int64":
        big = draw(st.one_of(st.integers(min_value=INT64[1] + 1), st.integers(max_value=INT64[0] - 1)))
        return _dumps(data | {"features": {"n": big}} if kind in ("items", "users") else data | {"session_id": big})
    if how == "deep":
        depth = draw(DEPTH)
        return b"[" * depth + b"]" * depth if draw(st.booleans()) else b'{"a":' * depth + b"1" + b"}" * depth
    if how == "deep_inside":
        depth = draw(DEPTH)
        return body[:-1] + b', "features": ' + b"[" * depth + b"]" * depth + b"}"
    if how == "nan":
        const = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"]))
        spot = {"features": {"x": "@CONST@"}} if kind in ("items", "users") else {"session_id": "@CONST@"}
        return _dumps(data | spot).replace(b'"@CONST@"', const)
    if how == "tombstone":
        return None
    if how == "non_object":
        return draw(NOT_OBJECT)
    if how == "bad_id":
        return _dumps(data | {field_: draw(BAD_ID)}, draw(st.booleans()))
    if how == "bad_event_id":
        return _dumps(data | {"event_id": draw(BAD_ID)}, draw(st.booleans()))
    if how == "bad_ts":
        return _dumps(data | {"ts": draw(BAD_TS)})
    if how == "huge" and draw(st.integers(0, 9)) == 0:  # over what a dead letter keeps: the value is dropped
        return _dumps(data | {"features": {"t": "h" * (MAX_DEAD_RAW_BYTES + 10_000)}})
    if how in ("oversized", "huge"):
        many = {f"k{n}": "v" * 100 for n in range(MAX_FEATURES_BYTES // 100)}
        features = draw(st.sampled_from([{"t": "a" * (MAX_FEATURES_BYTES + 1)}, many]))
        return _dumps(data | {"features": features}) if kind in ("items", "users") else _dumps(data | {"session_id": "s" * 129})
    if how == "missing":
        return _dumps({k: v for k, v in data.items() if k != field_})
    if how == "wrong_type":
        target = draw(st.sampled_from([field_, "features", "deleted", "ts", "schema"]))
        return _dumps(data | {target: draw(st.sampled_from(WRONG_TYPE["id" if target == field_ else target]))})
    if how == "extra":
        return _dumps(data | {draw(st.sampled_from(["extra", "topic", "", "user"])): 1})
    if how == "schema":
        return _dumps(data | {"schema": draw(st.sampled_from([0, 2, 99, "v1"]))})
    if how == "surrogate":
        return body[:-1] + (b', "features": {"\\ud800": 1}}' if kind in ("items", "users") else b', "session_id": "\\udfff"}')
    if how == "feature_type":
        bad = draw(st.sampled_from([None, [1], {"a": 1}, [], {}]))
        return _dumps(data | {"features": {"f": bad}} if kind in ("items", "users") else data | {"session_id": bad or 5})
    return body[: draw(st.integers(1, len(body) - 1))]  # truncated


def _parses(kind: str, value: bytes | None) -> bool:
    try:
        parse_event(kind, value, Origin("fuzz", 0, 0))
        return True
    except InvalidEvent:
        return False


@st.composite
def invalid_record(draw: st.DrawFn) -> Record:
    kind, key, data = draw(valid_data())
    value = draw(invalid_value(kind, data))
    keys = [st.just(key.encode()), st.binary(max_size=16)] + ([st.none()] if not event_type(kind).compacted else [])
    kafka_key = draw(st.one_of(*keys))  # compacted topics refuse records without a key
    if value is None and kafka_key is None:
        kafka_key = b""  # a record needs a key or a value
    return Record(kind, kafka_key, value, None)


@st.composite
def batch(draw: st.DrawFn) -> list[Record]:
    """Valid and invalid records interleaved, plus exact copies of some of them sent again later."""
    records = draw(st.lists(st.one_of(valid_record(), invalid_record()), min_size=BATCH, max_size=BATCH))
    for pick in draw(st.lists(st.integers(0, BATCH - 1), max_size=3)):
        records.append(records[pick])
    return records


# ---------------------------------------------------------------- what the worker must have done


@dataclass
class Expected:
    """The effect of the records sent, computed here: what Redis, the DLQ and the metrics must show."""

    applied: Counter[str] = field(default_factory=Counter)  # per kind
    duplicates: Counter[str] = field(default_factory=Counter)  # per kind
    dead: Counter[tuple[str, bytes | None]] = field(default_factory=Counter)  # (kind, value kept in the letter)
    counted: Counter[str] = field(default_factory=Counter)  # item -> impressions + engagements applied
    engaged: dict[str, set[str]] = field(default_factory=dict)  # user -> items
    shown: dict[str, set[str]] = field(default_factory=dict)  # user -> items
    entities: dict[tuple[str, str], tuple[int, dict, bool]] = field(default_factory=dict)  # (kind, id) -> ts, features, deleted
    ids: set[tuple[str, str, str]] = field(default_factory=set)  # (kind, key, event id) of every applied event with its own id

    def add(self, rec: Record) -> None:
        if rec.event is None:
            kept = rec.value if rec.value is not None and len(rec.value) <= MAX_DEAD_RAW_BYTES else None
            self.dead[(rec.kind, kept)] += 1
            return
        ev = rec.event
        if rec.has_id and (ev.kind, ev.key, ev.event_id) in self.ids:
            self.duplicates[ev.kind] += 1
            return
        if rec.has_id:
            self.ids.add((ev.kind, ev.key, ev.event_id))
        self.applied[ev.kind] += 1
        if isinstance(ev, (ImpressionEvent, EngagementEvent)):
            self.counted[ev.item_id] += 1
            (self.engaged if isinstance(ev, EngagementEvent) else self.shown).setdefault(ev.user_id, set()).add(ev.item_id)
        else:
            entity = (ev.kind, ev.key)
            if entity not in self.entities or ev.ts_ms >= self.entities[entity][0]:  # ties: the later one wins
                deleted = getattr(ev, "deleted", False)
                self.entities[entity] = (ev.ts_ms, {} if deleted else dict(ev.features), deleted)

    @property
    def total_dead(self) -> int:
        return sum(self.dead.values())


@dataclass
class Fuzzed:
    settings: Settings
    store: StateStore
    worker: Worker
    records: list[Record]
    expected: Expected
    seconds: float


def send_fuzz(settings: Settings, n: int) -> list[Record]:
    """Generate about ``n`` records with hypothesis and send each batch as it is drawn; returns them in order."""
    sent: list[Record] = []
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=20,
                             max_request_size=2 * 1024 * 1024)

    @hsettings(max_examples=max(n // BATCH, 1), database=None, deadline=None, phases=[Phase.generate, Phase.shrink],
               suppress_health_check=list(HealthCheck))
    @given(batch())
    def send(records: list[Record]) -> None:
        for rec in records:  # the oracle: the parser agrees with the generator before anything is sent
            assert _parses(rec.kind, rec.value) == (rec.event is not None), rec.why
        futures.extend(producer.send(settings.topic(rec.kind), key=rec.key, value=rec.value) for rec in records)
        sent.extend(records)

    futures: list = []
    try:
        send()
        producer.flush(timeout=120)
        for future in futures:  # every record is in the broker, or the test stops here
            future.get(timeout=120)
    finally:
        producer.close()
    return sent


def catalogue() -> list[Record]:
    """Every pool item and user, valid, a month back: the training reader has a catalogue to join."""
    out = []
    for kind, ids in (("items", ITEMS), ("users", USERS)):
        for n, ident in enumerate(ids):
            data = {"event_id": f"cat.{ident[:100]}", "ts": NOW - timedelta(days=30), f"{kind[:-1]}_id": ident,
                    "features": {"title": f"Title {n}", "n": n}}
            out.append(Record(kind, ident.encode(), _dumps(data), event_type(kind).model_validate(data)))
    return out


def send_records(settings: Settings, records: list[Record]) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    futures = [producer.send(settings.topic(rec.kind), key=rec.key, value=rec.value) for rec in records]
    producer.flush(timeout=120)
    for future in futures:
        future.get(timeout=120)
    producer.close()


def processed(w: Worker) -> float:
    return sum(w.events(outcome) for outcome in ("applied", "duplicate", "invalid"))


@pytest.fixture(scope="module")
def fuzzed(local_stack: Settings, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """A worker fed ``N_RECORDS`` fuzzed records (plus a small catalogue), polled until it handled all of them."""
    s = isolated(local_stack, "fz", refresh_lease_s=3.0, refresh_debounce_s=0.2, cache_dir=tmp_path_factory.mktemp("cache"))
    ensure_topics(s)
    w = Worker(s, tiny_model, tmp_path_factory.mktemp("fuzz") / "worker.log")
    try:
        started = time.monotonic()
        records = catalogue()
        send_records(s, records)
        records += send_fuzz(s, N_RECORDS)
        store = StateStore.from_settings(s)
        poll(f"the worker to handle {len(records)} records", lambda: processed(w) >= len(records), timeout=300 + N_RECORDS / 5)
        poll("quiescence", lambda: store.dirty_count("users") == 0 and store.dirty_count("items") == 0, timeout=600)
        expected = Expected()
        for rec in records:
            expected.add(rec)
        yield Fuzzed(s, store, w, records, expected, time.monotonic() - started)
    finally:
        w.stop(signal.SIGKILL)
        purge(s)


def _ev_keys(store: StateStore, kind: str) -> set[tuple[str, str]]:
    """(key, event id) of every event of ``kind`` claimed (``P{s<n>}ev:<kind>:<key>/<id>``)."""
    found = (k.decode().split(f"}}ev:{kind}:", 1)[1] for k in store.r.scan_iter(match=store.keys.every_shard(f"ev:{kind}:*"), count=10_000))
    return {tuple(claim.rsplit("/", 1)) for claim in found}  # type: ignore[misc]


def _dlq(settings: Settings) -> Counter[str]:
    return Counter(letter.source_topic for letter in dead_letters(settings))


def test_every_valid_event_is_applied_once_and_every_invalid_record_dead_lettered(fuzzed: Fuzzed) -> None:
    s, store, w, exp = fuzzed.settings, fuzzed.store, fuzzed.worker, fuzzed.expected
    print(f"\nfuzzed {len(fuzzed.records)} records: {sum(exp.applied.values())} applied, {sum(exp.duplicates.values())} "
          f"duplicates, {exp.total_dead} invalid; handled in {fuzzed.seconds:.0f}s")
    # The worker's own counts.
    assert w.events("invalid") == exp.total_dead
    assert w.events("applied") == sum(exp.applied.values())
    assert w.events("duplicate") == sum(exp.duplicates.values())
    # Redis: one idempotency key per applied event, per kind.
    for kind in KINDS:
        assert len(_ev_keys(store, kind)) == exp.applied[kind], kind
    # Counters: impressions + engagements applied per item, each once.
    for item in ITEMS:
        n = store.r.hget(store._i(item, "m"), "n")
        assert int(n or 0) == exp.counted[item], item
    # Histories: every engaged (shown) item, capped as configured.
    for user in USERS:
        engaged, shown = exp.engaged.get(user, set()), exp.shown.get(user, set())
        assert store.engaged_items(user) == engaged, user
        assert store.r.zcard(store._u(user, "h")) == min(len(engaged), s.history_len), user
        assert {h.item_id for h in store.recent_impressions(user)} <= shown
        assert len(store.recent_impressions(user)) == min(len(shown), s.recent_impressions_len), user
    # Profiles and item features: the newest event's.
    for (kind, ident), (_, features, deleted) in exp.entities.items():
        if kind == "items":
            (st_,) = store.items([ident])
            assert (st_.features, st_.deleted) == (features, deleted), ident
        else:
            (st_,) = store.users([ident])
            assert st_.profile == features, ident
    # The DLQ: every invalid record, with its value (when small enough to keep) and a reason.
    letters = list(dead_letters(s))
    assert all(letter.error.strip() for letter in letters)
    topic_kind = {s.topic(k): k for k in KINDS}
    assert Counter((topic_kind[x.source_topic], x.raw) for x in letters) == exp.dead
    # The worker never restarted, and never failed on a record in a way it did not expect.
    log = w.log.read_text(errors="replace")
    assert w.proc.poll() is None and log.count('"worker starting"') == 1, log[-3000:]
    for sign in ("Traceback", "parsing failed unexpectedly", "could not apply the event", "quarantined"):
        assert sign not in log, f"{sign!r} in the worker's log:\n{log[log.find(sign) - 2000:][:4000]}"


def test_the_training_reader_judges_the_topics_as_the_worker_did(fuzzed: Fuzzed) -> None:
    s, store = fuzzed.settings, fuzzed.store
    started = time.monotonic()
    stats = ReadStats()
    events = list(read_events(s, DatasetOptions(), stats=stats))
    print(f"\nread {len(events)} events back in {time.monotonic() - started:.1f}s; "
          f"skipped {sum(stats.invalid.values())} invalid, {sum(stats.duplicates.values())} duplicates")
    assert dict(stats.invalid) == dict(_dlq(s))
    for kind in KINDS:  # same ids, derived ones included: the reader and the worker collapse the same duplicates
        assert {(e.key, e.event_id) for e in events if e.kind == kind} == _ev_keys(store, kind), kind
    assert len({(e.kind, e.key, e.event_id) for e in events}) == len(events)
    assert sum(stats.duplicates.values()) == fuzzed.worker.events("duplicate")


def test_a_prepared_dataset_counts_the_invalid_records_per_topic(fuzzed: Fuzzed) -> None:
    s = fuzzed.settings
    options = DatasetOptions(hard_negatives=0, counts_mode="raw", val_fraction=0.1, test_fraction=0.1)
    data = load_or_build(s, options)
    dlq = _dlq(s)
    assert data.meta["invalid_records"] == {s.topic(k): dlq[s.topic(k)] for k in KINDS}
    assert data.meta["events"] == sum(fuzzed.expected.applied.values())
    assert sum(data.meta["counts"].values()) > 0
