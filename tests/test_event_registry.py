"""A new event type needs its schema, its state rule and its tests, and nothing else: toy kinds,
defined and registered only here, get topics (compacted or not, as the class says), a parser, a worker
agent, a place in the application order and in replays, and counts, with no other change."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import Field

from core.settings import Settings
from onetower.worker import build_app
from streams.events import (DLQ_KIND, EVENT_TYPES, EngagementEvent, EntityId, Event, Features, ItemEvent, kind_rank,
                            parse_event)
from streams.inspect import topic_counts
from streams.movielens import read_events
from streams.producer import EventProducer
from streams.topics import ensure_topics, topic_kinds, topic_specs

T0 = datetime(2026, 1, 2, tzinfo=timezone.utc)


class ShareEvent(Event):
    """A user shared an item: activity, so its topic is retained."""

    kind: ClassVar[str] = "shares"
    user_id: EntityId
    item_id: EntityId

    @property
    def key(self) -> str:
        return self.user_id


class SellerEvent(Event):
    """A seller's profile: entity state, so its topic is compacted."""

    kind: ClassVar[str] = "sellers"
    compacted: ClassVar[bool] = True
    seller_id: EntityId
    features: Features = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.seller_id


@pytest.fixture()
def toys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy kinds registered after the real ones, for one test only."""
    for cls in (ShareEvent, SellerEvent):
        monkeypatch.setitem(EVENT_TYPES, cls.kind, cls)


def test_topics_include_the_new_kinds_with_their_policies(toys: None) -> None:
    settings = Settings(topic_prefix="t.")
    assert topic_kinds() == ["items", "users", "impressions", "engagements", "shares", "sellers", DLQ_KIND]
    configs = {spec.name: spec.topic_configs for spec in topic_specs(settings)}
    assert configs["t.shares"] == {"retention.ms": str(settings.topic_retention_ms)}
    assert configs["t.sellers"] == {"cleanup.policy": "compact"}


def test_settings_name_the_topic_of_any_well_formed_kind() -> None:
    assert Settings(topic_prefix="t.").topic("shares") == "t.shares"
    with pytest.raises(ValueError, match="is not a name"):
        Settings().topic("a b")


def test_new_kinds_parse_and_follow_the_known_ones_in_the_application_order(toys: None) -> None:
    event = parse_event("shares", json.dumps({"user_id": "u1", "item_id": "i1", "ts": T0.isoformat()}))
    assert isinstance(event, ShareEvent) and event.key == "u1"
    assert kind_rank("engagements") < kind_rank("shares") < kind_rank("sellers")


def test_the_worker_has_an_agent_per_registered_kind(toys: None) -> None:
    app = build_app(Settings(topic_prefix="t.", live_recall_sample_rate=0), refresher=None)
    topics = sorted(agent.channel.get_topic_name() for agent in app.agents.values())
    assert topics == sorted(f"t.{kind}" for kind in EVENT_TYPES)


def test_replays_read_new_kinds_in_order_and_directories_without_them(toys: None, tmp_path: Path) -> None:
    item = ItemEvent(item_id="i1", ts=T0)
    engaged = EngagementEvent(user_id="u1", item_id="i1", ts=T0)
    shared = ShareEvent(user_id="u1", item_id="i1", ts=T0)
    for event in (shared, engaged, item):
        (tmp_path / f"{event.kind}.jsonl").write_bytes(event.to_bytes() + b"\n")
    assert list(read_events(tmp_path)) == [item, engaged, shared]  # equal times: the registry's order
    (tmp_path / "shares.jsonl").unlink()
    assert list(read_events(tmp_path)) == [item, engaged]


@pytest.mark.stack
def test_new_kinds_get_topics_records_and_counts_on_kafka(toys: None, settings: Settings) -> None:
    ensure_topics(settings)
    with EventProducer(settings) as producer:
        producer.send_many([ShareEvent(user_id="u1", item_id="i1"), SellerEvent(seller_id="s1", features={"name": "Ada"})])
    counts = topic_counts(settings)
    assert counts["shares"] == counts["sellers"] == 1 and counts["items"] == 0
