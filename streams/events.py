"""Event schemas (docs/DESIGN.md, Events): JSON values validated by pydantic, keyed by entity id.

A value is a valid event only if (``parse_event`` raises ``InvalidEvent`` with the reason otherwise,
and nothing else, whatever the bytes):

- ids (``item_id``, ``user_id``, ``event_id``) match ``^[A-Za-z0-9_.:@-]{1,128}$``: they become Redis
  keys, Milvus primary keys and filter literals, so no spaces, quotes, wildcards or control characters;
- numbers are finite (Python's json reads ``NaN``/``Infinity``/``1e999``; JSON has no such numbers,
  and a NaN feature crashed rendering) and integer features fit in 64 bits;
- text is UTF-8 (no lone surrogates from ``\\ud800`` escapes: Redis and Milvus cannot take them);
- features serialize to at most ``MAX_FEATURES_BYTES`` of JSON (Milvus JSON fields stop at 64 KiB);
- the event time lies between ``MAX_PAST`` before and ``MAX_AHEAD`` after now (a year-9999 event
  moved an item's counter clock past every real event and wiped its counters). ``MAX_PAST`` is 40
  years so that MovieLens-100k (1997-98) replays, while epoch-0 and year-1 timestamps do not.

An event without ``event_id`` gets one at parse time: derived from the record's coordinates
(``Origin``: topic, partition, offset) when the reader gives them, so a redelivered record is applied
once; a random one otherwise (a new event made by the SDK).
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Union

from pydantic import (AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator)

from core.errors import OnetowerError

SCHEMA_VERSION = 1
ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
MAX_FEATURES_BYTES = 16 * 1024
MAX_PAST = timedelta(days=40 * 365)
MAX_AHEAD = timedelta(days=1)
ORIGIN_HEADER = "onetower-origin"
MAX_DEAD_RAW_BYTES = 512 * 1024  # base64 of it stays under Kafka's default 1 MiB message limit
MAX_REASON_CHARS = 2000  # a record with thousands of bad fields still gets a short dead letter
INT64 = (-(2**63), 2**63 - 1)
_ORIGIN_NS = uuid.UUID("6f6e6574-6f77-6572-8000-6576656e7473")  # fixed: ids derived from coordinates never change


def _utf8(s: str) -> str:
    try:
        s.encode()
    except UnicodeEncodeError:
        raise ValueError("text is not UTF-8 (a lone surrogate)") from None
    return s


def _int64(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1]:
        raise ValueError("integer does not fit in 64 bits")
    return v


EntityId = Annotated[str, Field(pattern=ID_PATTERN)]
Text = Annotated[str, AfterValidator(_utf8)]
FeatureValue = Annotated[Union[Text, int, Annotated[float, Field(allow_inf_nan=False)], bool], BeforeValidator(_int64)]
Features = dict[Text, FeatureValue]


class InvalidEvent(OnetowerError, ValueError):
    """Raised for bytes that are not a valid event of the expected kind; the message is the reason."""


class Origin(NamedTuple):
    """Where a record was first read: a record without an event id is identified by these. A record
    replayed from the DLQ carries its original ones in the ``ORIGIN_HEADER`` header."""

    topic: str
    partition: int
    offset: int

    @property
    def event_id(self) -> str:
        return uuid.uuid5(_ORIGIN_NS, f"{self.topic}/{self.partition}/{self.offset}").hex

    def header(self) -> bytes:
        return f"{self.topic}:{self.partition}:{self.offset}".encode()

    @classmethod
    def from_header(cls, value: bytes | None) -> Origin | None:
        """The header's coordinates; None when it is malformed (the record's own are used then)."""
        if not isinstance(value, bytes):  # Kafka header values may be null
            return None
        try:
            topic, partition, offset = value.decode().rsplit(":", 2)
            return cls(topic, int(partition), int(offset))
        except ValueError:  # also UnicodeDecodeError
            return None


def _features_size(features: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(features, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_FEATURES_BYTES:
        raise ValueError(f"features take {size} bytes as JSON; at most {MAX_FEATURES_BYTES} are accepted")
    return features


class Event(BaseModel):
    """Fields every event carries: schema version, a unique id (for idempotency), event time.

    A subclass declares its topic kind (``kind``: the topic name after the prefix) and whether that
    topic is compacted (``compacted``: it holds entity state, the latest event per key is enough);
    listed in ``EVENT_TYPES``, it gets a topic, a worker agent and a place in the application order."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    kind: ClassVar[str]
    compacted: ClassVar[bool] = False

    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, alias="schema")
    event_id: EntityId = Field(default_factory=lambda: uuid.uuid4().hex)
    ts: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("ts")
    @classmethod
    def _recent(cls, ts: datetime) -> datetime:
        now = datetime.now(timezone.utc)
        if not now - MAX_PAST <= ts <= now + MAX_AHEAD:
            raise ValueError(f"event time {ts.isoformat()} is outside the accepted window "
                             f"({MAX_PAST.days} days before now to {MAX_AHEAD.days} day(s) after)")
        return ts

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
    compacted: ClassVar[bool] = True
    item_id: EntityId
    features: Annotated[Features, AfterValidator(_features_size)] = Field(default_factory=dict)
    deleted: bool = False

    @property
    def key(self) -> str:
        return self.item_id


class UserEvent(Event):
    """A user's profile features were set or changed."""

    kind: ClassVar[str] = "users"
    compacted: ClassVar[bool] = True
    user_id: EntityId
    features: Annotated[Features, AfterValidator(_features_size)] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.user_id


class ImpressionEvent(Event):
    """An item was shown to a user."""

    kind: ClassVar[str] = "impressions"
    user_id: EntityId
    item_id: EntityId
    session_id: Annotated[Text, Field(max_length=128)] | None = None

    @property
    def key(self) -> str:
        return self.user_id


class EngagementEvent(Event):
    """A user engaged positively with an item (click, like, rating of 4+ ...)."""

    kind: ClassVar[str] = "engagements"
    user_id: EntityId
    item_id: EntityId
    kind_: Text = Field(default="click", alias="kind", min_length=1, max_length=32)
    session_id: Annotated[Text, Field(max_length=128)] | None = None

    @property
    def key(self) -> str:
        return self.user_id


# The registry of event kinds: every topic, worker agent, replay and reader of events iterates it.
# Its order is the application order: events with equal timestamps are applied in it (an item exists
# before an engagement with it at the same instant). These are topic kinds; the entity kinds of
# ``streams.state.Kind`` and ``indexer.vectors.KINDS`` (items, users) are what gets encoded to vectors.
EVENT_TYPES: dict[str, type[Event]] = {t.kind: t for t in (ItemEvent, UserEvent, ImpressionEvent, EngagementEvent)}
DLQ_KIND = "dlq"  # the dead-letter topic's kind: a topic of ``DeadLetter`` records, not of events


def event_type(topic_kind: str) -> type[Event]:
    """The event class registered for a topic kind; ValueError names the known kinds otherwise."""
    try:
        return EVENT_TYPES[topic_kind]
    except KeyError:
        raise ValueError(f"unknown event kind {topic_kind!r}; expected one of {', '.join(EVENT_TYPES)}") from None


def kind_rank(topic_kind: str) -> int:
    """The kind's place in the application order: the tie-breaker after event time."""
    event_type(topic_kind)
    return list(EVENT_TYPES).index(topic_kind)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _printable(reason: str) -> str:
    """The reason as UTF-8-safe text of bounded length (field names in it come from the input)."""
    reason = reason.encode(errors="backslashreplace").decode()
    return reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "..."


def parse_event(topic_kind: str, raw: bytes | str | None, origin: Origin | None = None) -> Event:
    """Validate raw JSON as an event of ``topic_kind``; raise InvalidEvent with a readable reason.
    ``origin``: where the record was read, the source of its id when it carries none."""
    cls = event_type(topic_kind)
    if raw is None:
        raise InvalidEvent("null value (a tombstone): entities are deleted by an event with deleted=true")
    try:
        data = json.loads(raw, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, over 4,300 digits, too deep
        raise InvalidEvent(f"not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}")
    if origin is not None and "event_id" not in data:
        data["event_id"] = origin.event_id
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise InvalidEvent(_printable(f"invalid {topic_kind} event: {reasons}")) from None


class DeadLetter(BaseModel):
    """What the DLQ keeps of a record that could not be processed: enough to replay it after a fix.
    ``raw_b64`` is None for a tombstone, and for a value over ``MAX_DEAD_RAW_BYTES`` (the reason says
    so): a dead letter must fit in a Kafka message wherever the record came from."""

    model_config = ConfigDict(frozen=True)

    source_topic: str
    partition: int
    offset: int
    key: str | None
    raw_b64: str | None = Field(description="the record's value, base64-encoded, exactly as received")
    error: str
    ts: AwareDatetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @classmethod
    def of(cls, topic: str, partition: int, offset: int, key: bytes | None, raw: bytes | None, error: str) -> "DeadLetter":
        kept = raw is not None and len(raw) <= MAX_DEAD_RAW_BYTES
        return cls(
            source_topic=topic,
            partition=partition,
            offset=offset,
            key=key.decode(errors="replace") if key is not None else None,
            raw_b64=base64.b64encode(raw).decode() if kept else None,
            error=_printable(error if kept or raw is None else f"{error} (value of {len(raw)} bytes not kept)"),
        )

    @property
    def raw(self) -> bytes | None:
        return None if self.raw_b64 is None else base64.b64decode(self.raw_b64)

    @property
    def origin(self) -> Origin:
        return Origin(self.source_topic, self.partition, self.offset)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()
