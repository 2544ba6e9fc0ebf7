"""How each kind of event changes the state: one rule per kind, in Lua for Redis and in Python.

A ``Rule`` holds both forms side by side: the Lua that ``StateStore`` runs on Redis (with a builder of
its KEYS and ARGV) and ``apply``, the same rule on plain Python structures shaped like the Redis keys.
``ReferenceState`` replays events through the Python form and reads like ``StateStore`` (``StateReader``),
so training builds its point-in-time examples from the state serving would hold, and
``tests/test_skew.py`` replays the same events through both and compares them. A new kind of event
is its schema (``streams.events.EVENT_TYPES``), its rule here (``RULES``) and its tests.

Training used to keep its own rules, which disagreed with serving's. Serving's are the definition
(the model is used on what serving holds, and a stream worker cannot know more than this):

- history: one entry per item, at its latest engagement, capped at ``history_len`` (the oldest leave
  first; equal times are ordered by item id bytes, as a Redis sorted set orders them). A user who
  engaged twice with one item gets the same text in training as in serving. The engaged set, which
  retrieval excludes, is uncapped.
- counters: read as of the item's newest counter event (``cts``), not as of a query time: a worker
  has event times but no clock, so an item's counts stand still between its own events. Buckets
  outside every window as of ``cts`` are pruned.
- percentile tables: fitted on every item with any state (catalogue or counts, deleted or not), each
  item's counters as of its own ``cts``.
- hard negatives: from the recent impressions (one per item at its latest time, capped at
  ``recent_impressions_len``).
- profiles and item features: replaced by an event not older than the stored one (an older one that
  arrives late is ignored; an equal one wins). A deleted item keeps its counters and its place in
  histories, which leave it out of texts; a newer item event brings it back.
- an event id is applied once per key (the entity the event is keyed by on Kafka, which orders the
  copies of an event): a copy, or another event reusing the id on that key, changes nothing. Redis
  forgets an id after ``dedup_ttl_s``; the reference never does.

On Redis a rule is one or two scripts (``Part``), each touching the keys of one shard only (``Keys``),
so that it runs on Redis Cluster: an engagement or an impression changes the user in the user's shard
and the item's counters in the item's, each part claimed apart, so a retry after one part failed
applies only the other.
"""

from __future__ import annotations

import heapq
import json
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Iterator, NamedTuple, Protocol, Sequence, TypeVar

from core.settings import Settings
from streams.counters import (BUCKET_MS, MAX_WINDOW_H, PercentileTable, counters_as_of, fit_tables, hour_bucket,
                              prune)
from streams.events import EngagementEvent, Event, ImpressionEvent, ItemEvent, UserEvent


# ---------------------------------------------------------------- what the state reads as


@dataclass(frozen=True)
class HistoryEntry:
    item_id: str
    ts_ms: int


@dataclass(frozen=True)
class UserState:
    user_id: str
    profile: dict[str, Any]
    history: list[HistoryEntry]  # oldest first, capped at history_len, one entry per item (latest ts)
    updated_ms: int  # event time of the latest profile or engagement event reflected (what the vector shows)
    version: int = 0  # state version (``v``): orders two reads of one user, unlike event times, which may tie
    engaged: int = 0  # distinct items ever engaged (the uncapped engaged set's size)

    @property
    def history_offset(self) -> int:
        """How many of the user's engaged items came before ``history[0]``: with it, each history entry
        has a number from the user's first engagement that the history cap does not shift."""
        return max(self.engaged - len(self.history), 0)


@dataclass(frozen=True)
class ItemState:
    item_id: str
    features: dict[str, Any]
    counters: dict[str, int]  # COUNTER_NAMES as of the newest counter event time seen for this item
    deleted: bool
    updated_ms: int
    version: int = 0  # state version (``v``), as for UserState


class StateReader(Protocol):
    """What texts and training read of a state: ``StateStore`` (Redis) and ``ReferenceState`` have it."""

    def users(self, ids: Sequence[str]) -> list[UserState | None]: ...

    def items(self, ids: Sequence[str]) -> list[ItemState | None]: ...

    def engaged_items(self, user_id: str) -> set[str]: ...

    def recent_impressions(self, user_id: str) -> list[HistoryEntry]: ...

    def percentile_tables(self) -> dict[str, PercentileTable]: ...


class Keys:
    """Redis key names under one prefix (the layout is in ``streams.state``); every key is built here.

    Each user and item lives in one of ``shards`` shards (crc32 of its id); its keys, the queues of
    its shard and the claims of the scripts that change it carry the shard's hash tag (``P{s<n>}``),
    which Redis Cluster maps to one hash slot, so a script touching them runs there. Changing the
    number of shards moves every entity: it is fixed for the life of a keyspace.
    """

    def __init__(self, prefix: str, shards: int) -> None:
        self.prefix = prefix
        self.shards = shards

    def shard(self, entity_id: str) -> int:
        """The shard of a user or an item (users and items share the shards)."""
        return zlib.crc32(entity_id.encode()) % self.shards

    def in_shard(self, shard: int, name: str) -> str:
        return f"{self.prefix}{{s{shard}}}{name}"

    def near(self, entity_id: str, name: str) -> str:
        """Key ``name`` (a queue, a claim) of the shard ``entity_id`` lives in."""
        return self.in_shard(self.shard(entity_id), name)

    def user(self, uid: str, suffix: str) -> str:
        return self.near(uid, f"u:{uid}:{suffix}")

    def item(self, iid: str, suffix: str) -> str:
        return self.near(iid, f"i:{iid}:{suffix}")

    def shared(self, name: str) -> str:
        """A key of no shard: read and written alone (by a single-key command or script)."""
        return f"{self.prefix}{name}"

    def claim(self, event: Event, part: Part, entity_id: str) -> str:
        """The idempotency key of one part of an event, in the shard of the entity the part changes; ids
        are per key ('/' is in no id)."""
        return self.near(entity_id, f"{part.claim}:{event.kind}:{event.key}/{event.event_id}")

    def every_shard(self, name_glob: str) -> str:
        """A SCAN pattern for the keys ``name_glob`` of every shard. Exact: neither prefixes nor ids
        (``streams.events.ID_PATTERN``) hold braces, so the first '}' ends the tag."""
        return f"{glob_escape(self.prefix)}{{s*}}{name_glob}"

    @staticmethod
    def entity(key: str) -> str:
        """The id in an entity's key, ``P{s<n>}u:<id>:<suffix>`` (or ``i:``, with a one-letter suffix)."""
        return key.partition("}")[2][2:-2]


def glob_escape(s: str) -> str:
    """``s`` matched literally in a SCAN pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in s)


# ---------------------------------------------------------------- the Python form of the state


@dataclass
class _User:
    """One user's keys: ``meta`` (u:m: ts, pts, its, v), profile (u:p), history (u:h), engaged (u:e), impressions (u:i)."""

    meta: dict[str, int] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    history: dict[str, int] = field(default_factory=dict)
    engaged: set[str] = field(default_factory=set)
    impressions: dict[str, int] = field(default_factory=dict)


@dataclass
class _Item:
    """One item's keys: ``meta`` (i:m: ts, fts, cts, deleted, v), features (i:f), hour buckets per signal (i:c:<signal>)."""

    meta: dict[str, int] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    buckets: dict[str, dict[int, int]] = field(default_factory=dict)


def _zrange(zset: dict[str, int]) -> list[HistoryEntry]:
    """A sorted set's members, lowest score first, equal scores by member bytes (Redis's ZRANGE order)."""
    return [HistoryEntry(m, ts) for m, ts in sorted(zset.items(), key=lambda kv: (kv[1], kv[0].encode()))]


def _capped_add(zset: dict[str, int], member: str, ts: int, cap: int) -> None:
    """Lua ``capped_add``: ZADD GT (a member keeps its latest time), then drop the lowest beyond ``cap``."""
    if member not in zset or ts > zset[member]:
        zset[member] = ts
    extra = len(zset) - cap
    for m in heapq.nsmallest(extra, zset, key=lambda m: (zset[m], m.encode())) if extra > 0 else ():
        del zset[m]


def _raise(meta: dict[str, int], name: str, ts: int) -> None:
    """Lua ``if ts > HGET(name) then HSET(name, ts)``: a field that holds the newest time seen."""
    if ts > meta.get(name, -1):
        meta[name] = ts


def _bump(meta: dict[str, int], name: str) -> None:
    meta[name] = meta.get(name, 0) + 1


def _count(item: _Item, signal: str, ts: int) -> None:
    """Lua ``count``: one event in the item's hour bucket; a new bucket prunes those out of every window."""
    _raise(item.meta, "cts", ts)
    buckets = item.buckets.setdefault(signal, {})
    b = hour_bucket(ts)
    buckets[b] = buckets.get(b, 0) + 1
    if buckets[b] == 1:
        prune(buckets, item.meta["cts"])
    _raise(item.meta, "ts", ts)
    _bump(item.meta, "v")
    _bump(item.meta, "n")


def _replace(meta: dict[str, int], stored: dict[str, Any], ts_field: str, ts: int, features: dict[str, Any]) -> bool:
    """Lua ``_ENTITY``: features replaced unless the event is older than the stored ones; False if ignored."""
    if ts < meta.get(ts_field, -1):
        return False
    stored.clear()
    stored.update(features)
    meta[ts_field] = ts
    _raise(meta, "ts", ts)
    _bump(meta, "v")
    return True


# ---------------------------------------------------------------- the rules

E = TypeVar("E", bound=Event)


@dataclass(frozen=True)
class Part:
    """One script of a rule, changing one entity and the queues of its shard. ``StateStore`` runs ``lua``
    after claiming the part's idempotency key (KEYS[1], named ``claim``: ev or ct) for the event's digest
    (ARGV[2]) for ARGV[1] seconds."""

    claim: str
    lua: str


class Call(NamedTuple):
    """One part's run on one event: the entity whose shard it runs in, its KEYS[2:] and ARGV[3:]."""

    entity: str
    keys: list[str]
    args: list[Any]


class Rule(Generic[E]):
    """How one kind of event changes the state, in Lua (``parts``) and in Python (``apply``)."""

    event_type: ClassVar[type[Event]]
    parts: ClassVar[tuple[Part, ...]]

    def redis_calls(self, event: E, keys: Keys, settings: Settings, now_ms: int) -> list[Call]:
        """One call per part, in the order of ``parts``; ``now_ms`` (wall clock) scores the dirty queues."""
        raise NotImplementedError

    def apply(self, event: E, state: ReferenceState) -> None:
        """The same change on the reference state."""
        raise NotImplementedError


# A capped sorted-set insert: a member keeps its latest time; the lowest beyond ``cap`` leave.
_CAPPED_ADD_LUA = """
local function capped_add(zset, member, ts, cap)
  redis.call('ZADD', zset, 'GT', ts, member)
  local extra = redis.call('ZCARD', zset) - cap
  if extra > 0 then redis.call('ZREMRANGEBYRANK', zset, 0, extra - 1) end
end
"""

# One counted event for an item, in the item's shard: hour bucket, prune buckets outside the longest
# window (as of the newest counter time), newest counter and event times, version, change number;
# queued for a bucket check.
# KEYS: ct, i_meta, i_cnt, counted    ARGV: ttl, digest, item_id, ts, bucket_ms, max_window_h
_COUNT = Part("ct", """
local ts, bucket_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local cts = tonumber(redis.call('HGET', KEYS[2], 'cts') or '-1')
if ts > cts then cts = ts; redis.call('HSET', KEYS[2], 'cts', ts) end
if redis.call('HINCRBY', KEYS[3], math.floor(ts / bucket_ms), 1) == 1 then
  local horizon = math.floor(cts / bucket_ms) - tonumber(ARGV[6])
  for _, f in ipairs(redis.call('HKEYS', KEYS[3])) do
    if tonumber(f) <= horizon then redis.call('HDEL', KEYS[3], f) end
  end
end
if ts > tonumber(redis.call('HGET', KEYS[2], 'ts') or '-1') then redis.call('HSET', KEYS[2], 'ts', ts) end
redis.call('HINCRBY', KEYS[2], 'v', 1)
redis.call('ZADD', KEYS[4], redis.call('HINCRBY', KEYS[2], 'n', 1), ARGV[3])
""")


def _count_call(keys: Keys, item_id: str, signal: str, ts_ms: int) -> Call:
    return Call(item_id, [keys.item(item_id, "m"), keys.item(item_id, f"c:{signal}"), keys.near(item_id, "counted")],
                [item_id, ts_ms, BUCKET_MS, MAX_WINDOW_H])


class EngagementRule(Rule[EngagementEvent]):
    """History (one entry per item, latest time, capped), engaged set, user version and dirt; item counters."""

    event_type = EngagementEvent
    # KEYS: ev, u_meta, u_hist, u_seen, dirty_users    ARGV: ttl, digest, user_id, item_id, ts, history_len, now_ms
    parts = (Part("ev", _CAPPED_ADD_LUA + """
local ts = tonumber(ARGV[5])
capped_add(KEYS[3], ARGV[4], ts, tonumber(ARGV[6]))
redis.call('SADD', KEYS[4], ARGV[4])
if ts > tonumber(redis.call('HGET', KEYS[2], 'ts') or '-1') then redis.call('HSET', KEYS[2], 'ts', ts) end
redis.call('HINCRBY', KEYS[2], 'v', 1)
redis.call('ZADD', KEYS[5], 'NX', ARGV[7], ARGV[3])
"""), _COUNT)

    def redis_calls(self, event: EngagementEvent, keys: Keys, settings: Settings, now_ms: int) -> list[Call]:
        u, i = event.user_id, event.item_id
        return [Call(u, [keys.user(u, "m"), keys.user(u, "h"), keys.user(u, "e"), keys.near(u, "dirty:users")],
                     [u, i, event.ts_ms, settings.history_len, now_ms]),
                _count_call(keys, i, "engagements", event.ts_ms)]

    def apply(self, event: EngagementEvent, state: ReferenceState) -> None:
        user = state.user_record(event.user_id)
        _capped_add(user.history, event.item_id, event.ts_ms, state.history_len)
        user.engaged.add(event.item_id)
        _raise(user.meta, "ts", event.ts_ms)
        _bump(user.meta, "v")
        _count(state.item_record(event.item_id), "engagements", event.ts_ms)


class ImpressionRule(Rule[ImpressionEvent]):
    """Recent impressions (one per item, latest time, capped), latest impression time; item counters."""

    event_type = ImpressionEvent
    # KEYS: ev, u_meta, u_imp    ARGV: ttl, digest, item_id, ts, impressions_len
    parts = (Part("ev", _CAPPED_ADD_LUA + """
local ts = tonumber(ARGV[4])
capped_add(KEYS[3], ARGV[3], ts, tonumber(ARGV[5]))
if ts > tonumber(redis.call('HGET', KEYS[2], 'its') or '-1') then redis.call('HSET', KEYS[2], 'its', ts) end
"""), _COUNT)

    def redis_calls(self, event: ImpressionEvent, keys: Keys, settings: Settings, now_ms: int) -> list[Call]:
        u, i = event.user_id, event.item_id
        return [Call(u, [keys.user(u, "m"), keys.user(u, "i")], [i, event.ts_ms, settings.recent_impressions_len]),
                _count_call(keys, i, "impressions", event.ts_ms)]

    def apply(self, event: ImpressionEvent, state: ReferenceState) -> None:
        user = state.user_record(event.user_id)
        _capped_add(user.impressions, event.item_id, event.ts_ms, state.recent_impressions_len)
        _raise(user.meta, "its", event.ts_ms)
        _count(state.item_record(event.item_id), "impressions", event.ts_ms)


# Profile or item features: replaced when the event is not older than the stored ones (compacted
# topics carry full state per key; an out-of-order older event must not win).
# KEYS: ev, meta, features, dirty      ARGV: ttl, digest, entity_id, ts, now_ms, deleted ('' for users), k1, v1, ...
_ENTITY = Part("ev", """
local ts = tonumber(ARGV[4])
local tsf = ARGV[6] == '' and 'pts' or 'fts'
if ts < tonumber(redis.call('HGET', KEYS[2], tsf) or '-1') then return end
redis.call('DEL', KEYS[3])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[2], tsf, ts)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[2], 'deleted', ARGV[6]) end
if ts > tonumber(redis.call('HGET', KEYS[2], 'ts') or '-1') then redis.call('HSET', KEYS[2], 'ts', ts) end
redis.call('HINCRBY', KEYS[2], 'v', 1)
redis.call('ZADD', KEYS[4], 'NX', ARGV[5], ARGV[3])
""")


def _encode_features(features: dict[str, Any]) -> list[str]:
    return [x for k, v in features.items() for x in (k, json.dumps(v))]


class UserRule(Rule[UserEvent]):
    """The profile, replaced by a not-older event; user version and dirt."""

    event_type = UserEvent
    parts = (_ENTITY,)

    def redis_calls(self, event: UserEvent, keys: Keys, settings: Settings, now_ms: int) -> list[Call]:
        u = event.user_id
        return [Call(u, [keys.user(u, "m"), keys.user(u, "p"), keys.near(u, "dirty:users")],
                     [u, event.ts_ms, now_ms, "", *_encode_features(event.features)])]

    def apply(self, event: UserEvent, state: ReferenceState) -> None:
        user = state.user_record(event.user_id)
        _replace(user.meta, user.profile, "pts", event.ts_ms, event.features)


class ItemRule(Rule[ItemEvent]):
    """Item features (none once deleted) and the deleted flag, replaced by a not-older event; version and dirt."""

    event_type = ItemEvent
    parts = (_ENTITY,)

    def redis_calls(self, event: ItemEvent, keys: Keys, settings: Settings, now_ms: int) -> list[Call]:
        i = event.item_id
        return [Call(i, [keys.item(i, "m"), keys.item(i, "f"), keys.near(i, "dirty:items")],
                     [i, event.ts_ms, now_ms, int(event.deleted), *_encode_features({} if event.deleted else event.features)])]

    def apply(self, event: ItemEvent, state: ReferenceState) -> None:
        item = state.item_record(event.item_id)
        if _replace(item.meta, item.features, "fts", event.ts_ms, {} if event.deleted else event.features):
            item.meta["deleted"] = int(event.deleted)


RULES: dict[type[Event], Rule[Any]] = {r.event_type: r for r in (ItemRule(), UserRule(), ImpressionRule(), EngagementRule())}


def rule_for(event: Event) -> Rule[Any]:
    """The rule of ``event``'s kind; TypeError for an object no rule covers."""
    try:
        return RULES[type(event)]
    except KeyError:
        raise TypeError(f"no state rule for {type(event).__name__}") from None


# ---------------------------------------------------------------- the reference state


class ReferenceState:
    """The state in Python memory, changed by the same rules as Redis; reads like ``StateStore``.

    Reads are cached per entity until a rule changes it (training reads far more than it writes);
    the returned states are shared, so callers must not modify them.
    """

    def __init__(self, history_len: int, recent_impressions_len: int) -> None:
        self.history_len = history_len
        self.recent_impressions_len = recent_impressions_len
        self._users: dict[str, _User] = {}
        self._items: dict[str, _Item] = {}
        self._applied: set[tuple[str, str, str]] = set()
        self._tables: dict[str, PercentileTable] = {}
        self._user_reads: dict[str, UserState | None] = {}
        self._item_reads: dict[str, ItemState | None] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ReferenceState:
        return cls(settings.history_len, settings.recent_impressions_len)

    # -- writes -------------------------------------------------------------------------------
    def apply(self, event: Event) -> bool:
        """Apply one event; False when its id was already applied (as ``StateStore.apply``)."""
        rule = rule_for(event)
        claim = (event.kind, event.key, event.event_id)
        if claim in self._applied:
            return False
        self._applied.add(claim)
        rule.apply(event, self)
        return True

    def user_record(self, user_id: str) -> _User:
        """A user's keys, for a rule to change (its cached read is dropped)."""
        self._user_reads.pop(user_id, None)
        return self._users.setdefault(user_id, _User())

    def item_record(self, item_id: str) -> _Item:
        """An item's keys, for a rule to change (its cached read is dropped)."""
        self._item_reads.pop(item_id, None)
        return self._items.setdefault(item_id, _Item())

    # -- reads --------------------------------------------------------------------------------
    def users(self, ids: Sequence[str]) -> list[UserState | None]:
        """User states in the order of ``ids``; None for a user with no state."""
        return [self._user_state(uid) for uid in ids]

    def _user_state(self, uid: str) -> UserState | None:
        if uid not in self._user_reads:
            user = self._users.get(uid)
            self._user_reads[uid] = None if user is None or not user.meta else UserState(
                user_id=uid, profile=dict(user.profile), history=_zrange(user.history),
                updated_ms=user.meta.get("ts", -1), version=user.meta.get("v", 0), engaged=len(user.engaged))
        return self._user_reads[uid]

    def items(self, ids: Sequence[str]) -> list[ItemState | None]:
        """Item states in the order of ``ids``; None for an item with no state (neither features nor counts)."""
        return [self._item_state(iid) for iid in ids]

    def _item_state(self, iid: str) -> ItemState | None:
        if iid not in self._item_reads:
            item = self._items.get(iid)
            self._item_reads[iid] = None if item is None or not item.meta else ItemState(
                item_id=iid, features=dict(item.features), counters=counters_as_of(item.buckets, item.meta.get("cts", -1)),
                deleted=item.meta.get("deleted") == 1, updated_ms=item.meta.get("ts", -1), version=item.meta.get("v", 0))
        return self._item_reads[iid]

    def user_ids(self) -> Iterator[str]:
        return (uid for uid, user in self._users.items() if user.meta)

    def item_ids(self) -> Iterator[str]:
        return (iid for iid, item in self._items.items() if item.meta)

    def engaged_items(self, user_id: str) -> set[str]:
        """Every item the user ever engaged with (uncapped)."""
        user = self._users.get(user_id)
        return set(user.engaged) if user else set()

    def recent_impressions(self, user_id: str) -> list[HistoryEntry]:
        """The user's most recent impressions, oldest first (capped at recent_impressions_len)."""
        user = self._users.get(user_id)
        return _zrange(user.impressions) if user else []

    def counter_buckets(self, item_id: str, signal: str) -> dict[int, int]:
        """The hour buckets one signal keeps for an item (what pruning left)."""
        item = self._items.get(item_id)
        return dict(item.buckets.get(signal, {})) if item else {}

    # -- popularity percentiles ---------------------------------------------------------------
    def percentile_tables(self) -> dict[str, PercentileTable]:
        """The tables of the last refresh (empty until the first one)."""
        return dict(self._tables)

    def refresh_percentile_tables(self) -> dict[str, PercentileTable]:
        """Refit every counter's table on all items' counters, as ``StateStore.refresh_percentile_tables``
        does (no items: nothing is refitted and {} is returned)."""
        states = [st for st in self.items(list(self.item_ids())) if st]
        if not states:
            return {}
        self._tables = fit_tables([st.counters for st in states])
        return self._tables
