"""Event schemas: validation reasons, round trips, dead letters, hostile input (pure unit tests)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.events import (EVENT_TYPES, ID_PATTERN, MAX_DEAD_RAW_BYTES, DeadLetter, EngagementEvent, InvalidEvent,
                            ItemEvent, Origin, parse_event)


def test_item_event_round_trip() -> None:
    event = ItemEvent(item_id="42", features={"title": "Heat", "year": 1995})
    parsed = parse_event("items", event.to_bytes())
    assert parsed == event and parsed.key == "42"
    assert json.loads(event.to_bytes())["schema"] == 1


def test_engagement_kind_is_serialised_as_kind() -> None:
    raw = json.loads(EngagementEvent(user_id="u", item_id="i", kind_="like").to_bytes())
    assert raw["kind"] == "like"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"user_id": "u1", "ts": "2024-01-01T00:00:00Z"}', "item_id: Field required"),
        (b'{"user_id": "u1", "item_id": "i1", "ts": "2024-01-01T00:00:00"}', "ts: Input should have timezone info"),
        (b'{"user_id": "u 1", "item_id": "i1"}', "user_id: String should match pattern"),
        (b'{"user_id": "u1", "item_id": "i1", "schema": 2}', "schema: Input should be 1"),
        (b'{"user_id": "u1", "item_id": "i1", "color": "red"}', "color: Extra inputs are not permitted"),
    ],
)
def test_invalid_engagements_give_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_event("engagements", raw)


def test_unknown_topic_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown event kind 'clicks'"):
        parse_event("clicks", b"{}")


def test_dead_letter_keeps_raw_bytes() -> None:
    raw = b"\xff\x00 not utf-8"
    letter = DeadLetter.of("p.engagements", 3, 17, b"u1", raw, "not JSON")
    restored = DeadLetter.model_validate_json(letter.to_bytes())
    assert restored.raw == raw and restored.partition == 3 and restored.offset == 17 and restored.key == "u1"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"1" * 5000, "not JSON: ValueError: Exceeds the limit"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON: RecursionError"),
        (b'{"item_id": "i1", "features": {"year": NaN}}', "NaN is not a JSON number"),
        (b'{"item_id": "i1", "features": {"year": -Infinity}}', "-Infinity is not a JSON number"),
        (b'{"item_id": "i1", "features": {"year": 1e999}}', "1e999 is not a finite number"),
        (None, "tombstone"),
        (b"42", "expected a JSON object, got int"),
        (b'"items"', "expected a JSON object, got str"),
        (b'{"item_id": "i1", "ts": "9999-12-31T00:00:00Z"}', "ts: .*outside the accepted window"),
        (b'{"item_id": "i1", "ts": "1970-01-01T00:00:00Z"}', "ts: .*outside the accepted window"),
        (b'{"item_id": "i\\"1"}', "item_id: String should match pattern"),
        (b'{"item_id": "' + b"i" * 129 + b'"}', "item_id: String should match pattern"),
        (b'{"item_id": "i1", "event_id": "a b"}', "event_id: String should match pattern"),
        (b'{"item_id": "i1", "features": {"t": "\\ud800"}}', "not UTF-8"),
        (b'{"item_id": "i1", "features": {"n": 9223372036854775808}}', "does not fit in 64 bits"),
        (json.dumps({"item_id": "i1", "features": {"plot": "x" * 17_000}}).encode(), "features: .*at most 16384"),
    ],
    ids=["huge-int", "deep", "nan", "infinity", "overflow", "tombstone", "number", "string", "year-9999", "epoch-0",
         "quote-in-id", "long-id", "space-in-event-id", "lone-surrogate", "int-over-64-bits", "oversized-features"],
)
def test_hostile_items_are_invalid_events(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_event("items", raw)


def test_the_sdk_cannot_build_a_non_finite_feature() -> None:
    with pytest.raises(ValidationError, match="finite"):
        ItemEvent(item_id="i1", features={"year": math.nan})


def test_movielens_event_times_are_accepted() -> None:
    assert parse_event("engagements", b'{"user_id": "u1", "item_id": "i1", "ts": "1997-09-20T03:05:10Z"}').ts.year == 1997


def test_an_event_without_id_gets_one_from_its_record_coordinates() -> None:
    raw = b'{"user_id": "u1", "item_id": "i1", "ts": "2025-01-01T00:00:00Z"}'
    first, again = (parse_event("engagements", raw, Origin("p.engagements", 2, 7)) for _ in range(2))
    assert first.event_id == again.event_id
    assert parse_event("engagements", raw, Origin("p.engagements", 2, 8)).event_id != first.event_id
    assert parse_event("engagements", raw).event_id != parse_event("engagements", raw).event_id  # no coordinates: fresh ids
    given = b'{"user_id": "u1", "item_id": "i1", "event_id": "sdk-1"}'
    assert parse_event("engagements", given, Origin("p.engagements", 2, 7)).event_id == "sdk-1"


texts = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates included
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2, max_value=2**64)
                | st.floats(allow_nan=True, allow_infinity=True) | texts)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=20)
ids = st.from_regex(ID_PATTERN, fullmatch=True) | json_values
times = (st.datetimes(min_value=datetime(2000, 1, 1), timezones=st.just(timezone.utc)).map(datetime.isoformat)
         | st.datetimes().map(datetime.isoformat) | json_values)
features = st.dictionaries(texts, json_scalars, max_size=6) | json_values
REQUIRED = {"items": {"item_id": ids, "features": features}, "users": {"user_id": ids, "features": features},
            "impressions": {"user_id": ids, "item_id": ids}, "engagements": {"user_id": ids, "item_id": ids}}


def event_like(kind: str) -> st.SearchStrategy[dict]:
    """Events of ``kind`` with each field valid or hostile (so that many are accepted, and many not)."""
    optional = {"schema": st.just(1) | json_values, "event_id": ids, "ts": times, "deleted": json_values,
                "kind": json_values, "session_id": json_values, "extra": json_values}
    return st.fixed_dictionaries(REQUIRED[kind], optional=optional)


def _parses_or_rejects(kind: str, raw: bytes) -> None:
    try:
        event = parse_event(kind, raw, Origin("p." + kind, 0, 1))
    except InvalidEvent:
        return
    assert parse_event(kind, event.to_bytes()) == event  # an accepted event serialises and reads back


@settings(deadline=None, max_examples=300)
@given(kind=st.sampled_from(list(EVENT_TYPES)), raw=st.binary(max_size=256))
def test_arbitrary_bytes_parse_or_are_invalid(kind: str, raw: bytes) -> None:
    _parses_or_rejects(kind, raw)


@settings(deadline=None, max_examples=500)
@given(case=st.sampled_from(list(EVENT_TYPES)).flatmap(lambda kind: st.tuples(st.just(kind), event_like(kind) | json_values)))
def test_arbitrary_json_parses_or_is_invalid(case: tuple[str, object]) -> None:
    kind, value = case
    _parses_or_rejects(kind, json.dumps(value).encode())


@pytest.mark.parametrize("value", [b"p.engagements:2:7", b"p:x.engagements:2:7", b"nonsense", b"a:b:c", b"\xff:1:2", None])
def test_an_origin_header_reads_back_or_is_ignored(value: bytes | None) -> None:
    found = Origin.from_header(value)
    assert found is None or found.header() == value


def test_a_dead_letter_keeps_no_value_it_could_not_fit_in_a_kafka_message() -> None:
    assert DeadLetter.of("p.items", 0, 1, b"i1", None, "tombstone").raw is None
    huge = DeadLetter.of("p.items", 0, 1, b"i1", b"x" * (MAX_DEAD_RAW_BYTES + 1), "too big")
    assert huge.raw is None and "not kept" in huge.error and huge.origin == Origin("p.items", 0, 1)
