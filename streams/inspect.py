"""Read-only views of onetower's topics: how many events each holds."""

from __future__ import annotations

from kafka import KafkaConsumer, TopicPartition

from core.settings import Settings
from streams.events import EVENT_TYPES
from streams.topics import topic_kinds


def topic_counts(settings: Settings) -> dict[str, int]:
    """Records per topic (end minus beginning offsets over all partitions); 0 for a missing topic."""
    consumer = KafkaConsumer(**settings.kafka_client_config(), bootstrap_timeout_ms=10_000)
    try:
        counts = {}
        for kind in topic_kinds():
            parts = consumer.partitions_for_topic(settings.topic(kind)) or set()
            tps = [TopicPartition(settings.topic(kind), p) for p in parts]
            begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
            counts[kind] = sum(end[tp] - begin[tp] for tp in tps)
        return counts
    finally:
        consumer.close()


def group_lag(settings: Settings, group: str) -> int:
    """Records of the event topics not yet committed by consumer group ``group`` (all records when it
    has no offsets)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**settings.kafka_client_config(), bootstrap_timeout_ms=10_000)
    consumer = KafkaConsumer(**settings.kafka_client_config(), bootstrap_timeout_ms=10_000)
    try:
        committed = admin.list_group_offsets(group).get(group, {})
        tps = [TopicPartition(settings.topic(kind), p) for kind in EVENT_TYPES
               for p in consumer.partitions_for_topic(settings.topic(kind)) or ()]
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        return sum(end[tp] - (committed[tp].offset if tp in committed else begin[tp]) for tp in tps)
    finally:
        consumer.close()
        admin.close()
