"""Event schemas (DESIGN.md, Events): JSON values validated by pydantic, keyed by entity id."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timezone
from typing import Annotated, ClassVar, Literal, Union

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1

EntityId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\s]+$")]
FeatureValue = Union[str, int, float, bool]


class InvalidEvent(ValueError):
    """Raised for bytes that are not a valid event of the expected kind; the message is the reason."""


class Event(BaseModel):
    """Fields every event carries: schema version, a unique id (for idempotency), event time."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    kind: ClassVar[str]

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, alias="schema")
    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=200)
    ts: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def key(self) -> str:
        """The Kafka key: the entity id, so one entity's events stay ordered in one partition."""
        raise NotImplementedError

    @property
    def ts_ms(self) -> int:
        return int(self.ts.timestamp() * 1000)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class ItemEvent(Event):
    """An item was created, changed or deleted in the catalogue."""

    kind: ClassVar[str] = "items"
    item_id: EntityId
    features: dict[str, FeatureValue] = Field(default_factory=dict)
    deleted: bool = False

    @property
    def key(self) -> str:
        return self.item_id


class UserEvent(Event):
    """A user's profile features were set or changed."""

    kind: ClassVar[str] = "users"
    user_id: EntityId
    features: dict[str, FeatureValue] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.user_id


class ImpressionEvent(Event):
    """An item was shown to a user."""

    kind: ClassVar[str] = "impressions"
    user_id: EntityId
    item_id: EntityId
    session_id: str | None = None

    @property
    def key(self) -> str:
        return self.user_id


class EngagementEvent(Event):
    """A user engaged positively with an item (click, like, rating of 4+ ...)."""

    kind: ClassVar[str] = "engagements"
    user_id: EntityId
    item_id: EntityId
    kind_: str = Field(default="click", alias="kind", min_length=1, max_length=32)
    session_id: str | None = None

    @property
    def key(self) -> str:
        return self.user_id


EVENT_TYPES: dict[str, type[Event]] = {t.kind: t for t in (ItemEvent, UserEvent, ImpressionEvent, EngagementEvent)}


def event_type(topic_kind: str) -> type[Event]:
    """The event class for a topic kind ('items', 'users', 'impressions', 'engagements')."""
    try:
        return EVENT_TYPES[topic_kind]
    except KeyError:
        raise ValueError(f"unknown event kind {topic_kind!r}; expected one of {', '.join(EVENT_TYPES)}") from None


def parse_event(topic_kind: str, raw: bytes | str) -> Event:
    """Validate raw JSON as an event of ``topic_kind``; raise InvalidEvent with a readable reason."""
    cls = event_type(topic_kind)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise InvalidEvent(f"invalid {topic_kind} event: {reasons}") from None


class DeadLetter(BaseModel):
    """What the DLQ keeps of a record that could not be processed: enough to replay it after a fix."""

    model_config = ConfigDict(frozen=True)

    source_topic: str
    partition: int
    offset: int
    key: str | None
    raw_b64: str = Field(description="the record's value, base64-encoded, exactly as received")
    error: str
    ts: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @classmethod
    def of(cls, topic: str, partition: int, offset: int, key: bytes | None, raw: bytes | None, error: str) -> "DeadLetter":
        return cls(
            source_topic=topic,
            partition=partition,
            offset=offset,
            key=key.decode(errors="replace") if key is not None else None,
            raw_b64=base64.b64encode(raw or b"").decode(),
            error=error,
        )

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.raw_b64)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()
