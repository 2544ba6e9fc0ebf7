"""Topic creation from settings (kafka-python admin): compacted entity topics, retained event topics."""

from __future__ import annotations

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from onetower.settings import Settings

COMPACTED = ("items", "users")


class KafkaUnavailable(RuntimeError):
    """The broker could not be reached; the message names the address."""


def admin_client(settings: Settings) -> KafkaAdminClient:
    try:
        return KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000, bootstrap_timeout_ms=10_000,
                                client_id="onetower-admin")
    except KafkaError:
        raise KafkaUnavailable(f"Kafka is unreachable at {settings.kafka_bootstrap} (is the stack up? `onetower stack up`)") from None


def topic_specs(settings: Settings) -> list[NewTopic]:
    """One NewTopic per kind: items/users compacted, the rest retained for training."""
    specs = []
    for kind in ("items", "users", "impressions", "engagements", "dlq"):
        configs = {"cleanup.policy": "compact"} if kind in COMPACTED else {"retention.ms": str(settings.topic_retention_ms)}
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
