"""Event schemas: validation reasons, round trips, dead letters (pure unit tests)."""

from __future__ import annotations

import json

import pytest

from streams.events import DeadLetter, EngagementEvent, InvalidEvent, ItemEvent, parse_event


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
