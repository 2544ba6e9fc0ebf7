"""EventProducer: the SDK clients use to send events to onetower's topics."""

from __future__ import annotations

from typing import Iterable

from kafka import KafkaProducer
from kafka.errors import KafkaError

from core.settings import Settings
from streams.events import ORIGIN_HEADER, DeadLetter, Event
from streams.topics import KafkaUnavailable


class EventProducer:
    """Sends validated events keyed by entity id, batched, with delivery confirmed on ``flush``.

    Keys keep one entity's events in one partition, so they are consumed in order.
    """

    def __init__(self, settings: Settings, *, linger_ms: int = 20, batch_size: int = 256 * 1024) -> None:
        self.settings = settings
        try:
            self._producer = KafkaProducer(
                **settings.kafka_client_config(), acks="all", linger_ms=linger_ms,
                batch_size=batch_size, compression_type=None, enable_idempotence=True,
                request_timeout_ms=15_000, bootstrap_timeout_ms=10_000,
                max_block_ms=15_000,
            )
        except KafkaError:
            raise KafkaUnavailable(f"Kafka is unreachable at {settings.kafka_bootstrap} (is the stack up? `onetower stack up`)") from None
        self._pending: list = []

    def send(self, event: Event) -> None:
        """Queue one event; it is confirmed by the next ``flush``."""
        self._send(self.settings.topic(event.kind), key=event.key.encode(), value=event.to_bytes(), timestamp_ms=event.ts_ms)

    def replay(self, letter: DeadLetter) -> None:
        """Queue a dead letter's record back to its source topic as it was received, with its original
        coordinates in a header: a record without an event id keeps the id they give, so replaying it
        twice applies it once. A letter without a value (a tombstone, or one too large to keep) cannot
        be replayed: ValueError."""
        if letter.raw is None:
            raise ValueError(f"the dead letter of {letter.origin} kept no value")
        self._send(letter.source_topic, key=None if letter.key is None else letter.key.encode(), value=letter.raw,
                   headers=[(ORIGIN_HEADER, letter.origin.header())])

    def _send(self, topic: str, **record: object) -> None:
        try:
            future = self._producer.send(topic, **record)
        except KafkaError as exc:
            raise KafkaUnavailable(f"could not send to {topic} at {self.settings.kafka_bootstrap}: {exc}") from None
        self._pending.append(future)

    def send_many(self, events: Iterable[Event], flush_every: int = 10_000) -> int:
        """Send events in order, confirming every ``flush_every``; returns how many were sent."""
        count = 0
        for event in events:
            self.send(event)
            count += 1
            if count % flush_every == 0:
                self.flush()
        self.flush()
        return count

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every queued event is acknowledged by the broker, or raise."""
        self._producer.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.get(timeout=timeout_s)
            except KafkaError as exc:
                raise KafkaUnavailable(f"delivery to {self.settings.kafka_bootstrap} failed: {exc}") from None

    def close(self) -> None:
        self.flush()
        self._producer.close()

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._producer.close(timeout=5)
