"""Topic creation from settings (kafka-python admin): compacted entity topics, retained event topics;
reading the dead-letter topic."""

from __future__ import annotations

from typing import Iterator

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from pydantic import ValidationError

from core.errors import Unavailable
from core.settings import Settings
from streams.events import DLQ_KIND, EVENT_TYPES, DeadLetter


class KafkaUnavailable(Unavailable):
    """The broker could not be reached; the message names the address."""


def admin_client(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(**settings.kafka_client_config(), request_timeout_ms=10_000, bootstrap_timeout_ms=10_000,
                                client_id="onetower-admin")
    except KafkaError:
        raise KafkaUnavailable(f"Kafka is unreachable at {settings.kafka_bootstrap} (is the stack up? `onetower stack up`)") from None


def topic_kinds() -> list[str]:
    """Every topic's kind: the registered event kinds in application order, then the DLQ."""
    return [*EVENT_TYPES, DLQ_KIND]


def topic_specs(settings: Settings) -> list[NewTopic]:
    """One NewTopic per kind: entity state compacted (the event class says so), the rest retained
    for training."""
    specs = []
    for kind in topic_kinds():
        compacted = kind in EVENT_TYPES and EVENT_TYPES[kind].compacted
        configs = {"cleanup.policy": "compact"} if compacted else {"retention.ms": str(settings.topic_retention_ms)}
        specs.append(NewTopic(name=settings.topic(kind), num_partitions=settings.topic_partitions,
                              replication_factor=1, topic_configs=configs))
    return specs


def ensure_topics(settings: Settings) -> list[str]:
    """Create the missing topics; returns the names created (empty when all existed)."""
    admin = admin_client(settings)
    try:
        existing = set(admin.list_topics())
        missing = [spec for spec in topic_specs(settings) if spec.name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # a concurrent creator won the race: the topics exist, which is all we need
        return [spec.name for spec in missing]
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {settings.kafka_bootstrap} failed to create topics: {exc}") from None
    finally:
        admin.close()


def delete_topics(settings: Settings) -> list[str]:
    """Delete every topic under the settings' prefix; returns their names."""
    admin = admin_client(settings)
    try:
        doomed = [t for t in admin.list_topics() if t.startswith(settings.topic_prefix)]
        if doomed:
            admin.delete_topics(doomed)
        return doomed
    finally:
        admin.close()


def dead_letters(settings: Settings, poll_ms: int = 1000) -> Iterator[DeadLetter]:
    """Every dead letter, read without a consumer group to the DLQ's end offsets (partition by
    partition, oldest first); a record that is not a dead letter is skipped."""
    consumer = KafkaConsumer(**settings.kafka_client_config(), enable_auto_commit=False, group_id=None,
                             client_id="onetower-dlq")
    try:
        topic = settings.topic(DLQ_KIND)
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=poll_ms).values():
                for record in records:
                    try:
                        yield DeadLetter.model_validate_json(record.value)
                    except ValidationError:
                        continue
    except KafkaError as exc:
        raise KafkaUnavailable(f"reading the DLQ from {settings.kafka_bootstrap} failed: {exc}") from None
    finally:
        consumer.close()
