"""Events through the real Kafka broker: keys, per-user order, topic creation, unreachable broker."""

from __future__ import annotations

import subprocess
import sys

import pytest
from kafka import KafkaConsumer

from core.settings import Settings
from streams.events import EVENT_TYPES, EngagementEvent, ItemEvent, UserEvent, parse_event
from streams.producer import EventProducer
from streams.topics import KafkaUnavailable, admin_client, ensure_topics, topic_kinds

pytestmark = pytest.mark.stack


def consume_all(settings: Settings, kind: str, expected: int, timeout_ms: int = 20_000) -> list:
    """Every record of a topic, from the beginning, until ``expected`` arrived or the timeout."""
    consumer = KafkaConsumer(settings.topic(kind), bootstrap_servers=settings.kafka_bootstrap,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=timeout_ms)
    records = []
    for record in consumer:
        records.append(record)
        if len(records) >= expected:
            break
    consumer.close()
    return records


def test_topics_created_once_with_policies(settings: Settings) -> None:
    created = ensure_topics(settings)
    assert sorted(created) == sorted(settings.topic(k) for k in topic_kinds())
    assert ensure_topics(settings) == []
    admin = admin_client(settings)
    try:
        from kafka.admin import ConfigResource, ConfigResourceType

        for kind, cls in EVENT_TYPES.items():  # entity state is compacted, activity retained
            result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, settings.topic(kind))])
            configs = result["topic"][settings.topic(kind)]  # what was set on the topic, not the broker's defaults
            assert (configs.get("cleanup.policy", {}).get("value") == "compact") == cls.compacted
        assert ItemEvent.compacted and UserEvent.compacted
        partitions = admin.describe_topics([settings.topic("engagements")])[0]["partitions"]
        assert len(partitions) == settings.topic_partitions
    finally:
        admin.close()


def test_events_round_trip_with_keys_and_per_user_order(settings: Settings) -> None:
    ensure_topics(settings)
    events = [EngagementEvent(user_id=f"u{n % 3}", item_id=f"i{n}") for n in range(60)]
    with EventProducer(settings) as producer:
        assert producer.send_many(events) == 60
        producer.send(ItemEvent(item_id="i7", features={"title": "Heat"}))
    records = consume_all(settings, "engagements", 60)
    assert len(records) == 60
    by_user: dict[str, list[str]] = {}
    for record in records:
        event = parse_event("engagements", record.value)
        assert record.key.decode() == event.user_id
        by_user.setdefault(event.user_id, []).append(event.item_id)
    for user, items in by_user.items():
        assert items == [e.item_id for e in events if e.user_id == user], "one user's events must stay in order"
    (item,) = consume_all(settings, "items", 1)
    assert item.key == b"i7" and parse_event("items", item.value).features == {"title": "Heat"}


def test_producer_reports_an_unreachable_broker(settings: Settings) -> None:
    dead = settings.model_copy(update={"kafka_bootstrap": "127.0.0.1:1"})
    with pytest.raises(KafkaUnavailable, match="unreachable at 127.0.0.1:1"):
        EventProducer(dead)


def test_cli_fails_with_one_clear_line_when_kafka_is_unreachable(tmp_path) -> None:
    env_cmd = [sys.executable, "-m", "onetower", "--kafka-bootstrap", "127.0.0.1:1", "produce",
               "--topic", "engagements", "--event", '{"user_id": "u1", "item_id": "i1"}']
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "error: Kafka is unreachable at 127.0.0.1:1" in lines[0], lines


def test_cli_rejects_a_bad_event_with_its_reason() -> None:
    proc = subprocess.run([sys.executable, "-m", "onetower", "produce", "--topic", "engagements",
                           "--event", '{"user_id": "u1"}'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "item_id: Field required" in proc.stdout
