"""The streaming state in Redis (docs/DESIGN.md, State): profiles, histories, counters, dirty queues.

How each kind of event changes the state is defined once, in ``streams.rules`` (its Lua and its
Python reference side by side); this module runs those rules on Redis and reads the result.

Exactly-once effect under at-least-once delivery: every event is applied by ONE Lua script that
first claims the event's idempotency key (``SET NX EX``) and then changes the state, so a replay
(after a crash, a rebalance, or a producer retry) changes nothing, and a crash cannot land between
the claim and the change. The same script marks the entity dirty, so an applied event always
leaves its entity queued for re-encoding. Redis does not roll back a script that fails, so the
change runs under ``pcall``: a failure on the event's own data (a key of the wrong type, a corrupt
field) releases the claim and replies ``REJECTED <reason>`` (``rejected``), so the event can go to
the DLQ and a replay after a fix applies it; writes made before the failure stay.

Layout (``P`` = ``settings.redis_key_prefix``; ``{s<n>}`` = the hash tag of shard n, ``Keys.shard``: crc32
of the id modulo ``settings.redis_shards``; every key ends in a type suffix, so ids may hold ':'):

==============================  ======  ===========================================================
``P{s<n>}ev:<kind>:<id>``       string  idempotency key of an event's part on its own entity (n: the
                                        entity's shard), expires after ``dedup_ttl_s``
``P{s<n>}ct:<kind>:<id>``       string  the same for the part that counts it for an item (n: the item's)
``P{s<n>}u:<uid>:m``            hash    ``ts`` (event time of the latest profile/engagement reflected),
                                        ``pts`` (profile event time), ``its`` (latest impression time),
                                        ``v`` (state version: +1 by each event that changes what is encoded)
``P{s<n>}u:<uid>:p``            hash    profile feature -> JSON value (replaced by each newer user event)
``P{s<n>}u:<uid>:h``            zset    history: item -> event time of the latest engagement, capped
``P{s<n>}u:<uid>:e``            set     every item the user engaged with (uncapped; for exclude-seen)
``P{s<n>}u:<uid>:i``            zset    recent impressions: item -> event time, capped
``P{s<n>}i:<iid>:m``            hash    ``ts`` (latest event time reflected), ``fts`` (features event time),
                                        ``cts`` (newest counter event time), ``deleted``, ``n`` (counter
                                        changes), ``b`` (JSON percentile buckets when the item was last
                                        queued for its counters: ``bucket_hysteresis`` points away from
                                        them queues it again), ``v`` (state version: +1 by each feature
                                        or counter change)
``P{s<n>}i:<iid>:f``            hash    feature -> JSON value (replaced by each newer item event)
``P{s<n>}i:<iid>:c:<sig>``      hash    hour bucket -> count, per signal (impressions, engagements)
``P{s<n>}dirty:<kind>``         zset    the shard's entities waiting for re-encoding -> wall-clock ms of
                                        first dirt
``P{s<n>}dirty:items:counts``   zset    items whose percentile buckets moved, the same (popped after
                                        ``dirty:items``, and after users: a new item or a user never waits
                                        behind a wave of moves)
``P{s<n>}inflight:<kind>``      zset    entities popped for re-encoding -> lease deadline (wall-clock ms)
``P{s<n>}lease:<kind>``         hash    entities popped for re-encoding -> the token of their current lease
``P{s<n>}quarantine:<kind>``    hash    entities whose re-encoding failed on their own data -> the reason
                                        (out of the queues until retried or changed again)
``P{s<n>}vec:<model>:<kind>``   hash    entity -> state version of the newest vector written for it (an
                                        older render arriving later is not written)
``P{s<n>}counted``              zset    items whose counters changed since their buckets were checked -> ``n``
``P pct``                       hash    counter name -> PercentileTable JSON
``P pct:due``                   string  set (with a TTL of the refit interval) by the worker that refits
==============================  ======  ===========================================================

Every script touches one shard, and a shard is one hash slot, so the same layout runs on one Redis
server and on Redis Cluster (``settings.redis_cluster``): the queues are per shard, and the calls
that span shards (pops, acks, reads of many entities) run one script or transaction per shard in one
pipeline. Keys of no shard (``P pct``, live recall's ``P lr:...``) are only ever touched one at a time.
``redis_shards`` is part of the layout: changing it for a live keyspace strands every entity in its
old shard (start a new prefix and replay the topics instead). Shards are the unit a cluster can move
between nodes, so use several per node (the default 16 suits up to four or five primaries).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from core.settings import Settings
from streams.counters import COUNTER_NAMES, SIGNALS, PercentileTable, counters_as_of, fit_tables
from streams.events import Event
from streams.rules import RULES, Call, HistoryEntry, ItemState, Keys, Part, UserState, glob_escape, rule_for

Kind = Literal["users", "items"]
Client = redis.Redis | RedisCluster
REJECTED = "REJECTED"  # prefix of the error an event script replies when the event's own data failed it


def rejected(exc: BaseException) -> bool:
    """True for a script's reply that this event failed on its own data: retrying cannot help."""
    return type(exc) is redis.ResponseError and str(exc).startswith(REJECTED + " ")


def _event_script(part: Part) -> str:
    """A rule part's script: claim the part (KEYS[1]) for the event's digest (ARGV[2]) for ARGV[1] seconds
    (when claimed already, reply 0 if by the same digest, -1 if by another event with this id), run its Lua
    under pcall, and on failure release the claim and reply REJECTED with the reason."""
    return f"""
local held = redis.call('SET', KEYS[1], ARGV[2], 'NX', 'GET', 'EX', ARGV[1])
if held then return held == ARGV[2] and 0 or -1 end
local ok, err = pcall(function()
{part.lua}
end)
if ok then return 1 end
redis.call('DEL', KEYS[1])
return redis.error_reply('{REJECTED} ' .. (type(err) == 'table' and err.err or tostring(err)))
"""


@dataclass(frozen=True)
class Lease:
    """Entities popped for re-encoding, and the token that proves this popper still holds them."""

    ids: list[str]
    token: str


# In one shard: move up to ARGV[2] entities to inflight with a lease under token ARGV[5]: first those whose
# lease expired (a worker died or stalled mid-batch), then settled dirty ones from the first ARGV[6]
# queues, queue by queue, that are not under a live lease (another worker encodes them). A popped entity
# leaves every queue: one encode covers all its changes.
# KEYS: inflight, lease tokens, dirty queue 1, dirty queue 2, ...
# ARGV: settled_before_ms, limit, now_ms, lease_ms, token, queues served
_POP = """
local limit, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local deadline = now + tonumber(ARGV[4])
local out, seen = {}, {}
local function take(id)
  for q = 3, #KEYS do redis.call('ZREM', KEYS[q], id) end
  if not seen[id] then out[#out + 1] = id; seen[id] = true end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do take(id) end
for q = 3, 2 + tonumber(ARGV[6]) do
  if #out >= limit then break end
  local window = limit - #out + redis.call('ZCARD', KEYS[1])
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[q], '-inf', ARGV[1], 'LIMIT', 0, window)) do
    if #out >= limit then break end
    local lease = redis.call('ZSCORE', KEYS[1], id)
    if seen[id] or not lease or tonumber(lease) <= now then take(id) end
  end
end
for _, id in ipairs(out) do
  redis.call('ZADD', KEYS[1], deadline, id)
  redis.call('HSET', KEYS[2], id, ARGV[5])
end
return out
"""

# End the leases of ARGV[4..] still held under token ARGV[1]: ack them (ARGV[2] == 'ack') or quarantine
# them with reason ARGV[2]. An id whose lease expired and another worker took over keeps that lease;
# on an ack it also goes back to the dirty queue, since the vector this holder wrote may be older
# than the one the other wrote. The reply lists those ids (leases lost).
# KEYS: inflight, lease tokens, quarantine, dirty queue    ARGV: token, 'ack' or reason, now_ms, id1, ...
_RELEASE = """
local lost = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == ARGV[1] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    if ARGV[2] == 'ack' then redis.call('HDEL', KEYS[3], id) else redis.call('HSET', KEYS[3], id, ARGV[2]) end
  else
    if ARGV[2] == 'ack' then redis.call('ZADD', KEYS[4], 'NX', ARGV[3], id) end
    lost[#lost + 1] = id
  end
end
return lost
"""

# Record the state version each vector is written from, unless a newer one was written already.
# KEYS: vec:<model>:<kind>    ARGV: id1, v1, id2, v2, ...    Reply: the ids to write
_CLAIM = """
local fresh = {}
for i = 1, #ARGV, 2 do
  if tonumber(ARGV[i + 1]) >= tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1') then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    fresh[#fresh + 1] = ARGV[i]
  end
end
return fresh
"""

# Remove checked items from ``counted`` unless they changed again meanwhile (their score grew).
# KEYS: counted    ARGV: id1, n1, id2, n2, ...
_UNCOUNT = """
for i = 1, #ARGV, 2 do
  local n = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if n and tonumber(n) <= tonumber(ARGV[i + 1]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _digest(event: Event) -> str:
    """What an event's claims hold: the same for a replay of the event, another for another event."""
    return hashlib.blake2b(event.model_dump_json().encode(), digest_size=8).hexdigest()


def _moved(stored: Mapping[str, int], buckets: Mapping[str, int], at_least: int) -> bool:
    """Whether an item's buckets moved far enough from those stored when it was last queued to queue it
    again: a counter appeared or went, or one moved by ``at_least`` points or more. A smaller drift
    accumulates against the stored buckets, so a served item's buckets stay within about
    ``at_least - 1`` points of its current ones however slowly they move."""
    return stored.keys() != buckets.keys() or any(abs(b - stored[name]) >= at_least for name, b in buckets.items())


def _counters(buckets: Sequence[Mapping[bytes, bytes]], as_of_ms: int) -> dict[str, int]:
    """An item's counters from its hour buckets as read, one hash per signal in ``SIGNALS`` order."""
    return counters_as_of({signal: {int(b): int(c) for b, c in raw.items()} for signal, raw in zip(SIGNALS, buckets)}, as_of_ms)


def _decode_features(raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    return {k.decode(): json.loads(v) for k, v in raw.items()}


ScriptCall = tuple[Script, Sequence[str], Sequence[Any]]  # a script, its KEYS and its ARGV


class StateStore:
    """Reads and writes the streaming state; one event = one script call per shard it changes, batches
    = one pipeline."""

    def __init__(self, client: Client, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.p = settings.redis_key_prefix
        self.keys = Keys(self.p, settings.redis_shards)
        self._scripts = {part: client.register_script(_event_script(part)) for rule in RULES.values() for part in rule.parts}
        self._pop = client.register_script(_POP)
        self._release = client.register_script(_RELEASE)
        self._uncount = client.register_script(_UNCOUNT)
        self._claim = client.register_script(_CLAIM)
        self._loaded = False

    @classmethod
    def from_settings(cls, settings: Settings) -> "StateStore":
        """A store on ``redis_url``: a Redis Cluster client when ``redis_cluster`` (the URL names any node)."""
        # A password in the URL wins over redis_password (redis-py lets the URL override keywords).
        password = settings.redis_password.get_secret_value() or None
        client_class = RedisCluster if settings.redis_cluster else redis.Redis
        return cls(client_class.from_url(settings.redis_url, password=password, health_check_interval=30), settings)

    # -- keys ---------------------------------------------------------------------------------
    def _u(self, uid: str, suffix: str) -> str:
        return self.keys.user(uid, suffix)

    def _i(self, iid: str, suffix: str) -> str:
        return self.keys.item(iid, suffix)

    def _q(self, name: str) -> str:
        return self.keys.shared(name)

    def _by_shard(self, ids: Sequence[str]) -> dict[int, list[str]]:
        """``ids`` (each once, in order) grouped by shard."""
        groups: dict[int, list[str]] = {}
        for id_ in dict.fromkeys(ids):
            groups.setdefault(self.keys.shard(id_), []).append(id_)
        return groups

    # -- scripts --------------------------------------------------------------------------------
    def _run(self, calls: Sequence[ScriptCall], raise_on_error: bool = True) -> list[Any]:
        """Run script calls in order in one pipeline (Redis Cluster splits it by node); the replies in order.

        EVALSHA, since a cluster pipeline cannot load scripts: every script is loaded on every primary
        before the first call, and again when a node without them (restarted, new, promoted) replies
        NOSCRIPT to its calls, which then run again, in order.
        """
        if not self._loaded:
            self._load_scripts()
        replies = self._evalsha(calls)
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
        if missing:
            self._load_scripts()
            for n, reply in zip(missing, self._evalsha([calls[n] for n in missing])):
                replies[n] = reply
        for reply in replies:
            if raise_on_error and isinstance(reply, Exception):
                raise reply
        return replies

    def _evalsha(self, calls: Sequence[ScriptCall]) -> list[Any]:
        pipe = self.r.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return pipe.execute(raise_on_error=False)

    def _load_scripts(self) -> None:
        for script in (*self._scripts.values(), self._pop, self._release, self._uncount, self._claim):
            self.r.script_load(script.script)  # Redis Cluster: on every primary
        self._loaded = True

    # -- writes -------------------------------------------------------------------------------
    def apply(self, event: Event) -> bool:
        """Apply one event; False when its id was already applied (a replay changes nothing)."""
        return self.apply_many([event])[0]

    def apply_many(self, events: Sequence[Event], now_ms: int | None = None) -> list[bool]:
        """Apply events in order in one round trip; each is atomic and idempotent on its own."""
        results = self.try_apply_many(events, now_ms)
        for res in results:
            if isinstance(res, redis.ResponseError):
                raise res
        return results  # type: ignore[return-value]

    def try_apply_many(self, events: Sequence[Event], now_ms: int | None = None) -> list[bool | redis.ResponseError]:
        """``apply_many``, but an event that failed on its own data (``rejected``) gets its error in
        its place while the others are applied; any other error reply is raised.

        An event is applied by its rule's parts, one per shard it changes, each claimed once: True when
        any part was applied now, False when all were before (a replay). The first part runs in the
        shard of the entity the event is keyed by and claims the event id for the event's digest; the
        others run after it (a second round trip), only for events whose id that digest holds: a retry
        of the same event applies the parts still missing, another event reusing the id applies none.
        """
        now = _now_ms() if now_ms is None else now_ms
        planned = [(ev, rule_for(ev).redis_calls(ev, self.keys, self.settings, now), _digest(ev)) for ev in events]
        results: list[bool | redis.ResponseError] = [False] * len(events)
        first = self._apply_parts([(n, 0) for n in range(len(events))], planned, results)
        self._apply_parts([(n, k) for n, reply in enumerate(first) if reply in (0, 1) for k in range(1, len(planned[n][1]))],
                          planned, results)
        return results

    def _apply_parts(self, which: Sequence[tuple[int, int]], planned: Sequence[tuple[Event, list[Call], str]],
                     results: list[bool | redis.ResponseError]) -> list[Any]:
        """Run part k of event n for each (n, k) of ``which`` in one pipeline and record the outcome in
        ``results[n]``; the replies."""
        calls: list[ScriptCall] = []
        for n, k in which:
            event, event_calls, digest = planned[n]
            part, call = rule_for(event).parts[k], event_calls[k]
            calls.append((self._scripts[part], [self.keys.claim(event, part, call.entity), *call.keys],
                          [self.settings.dedup_ttl_s, digest, *call.args]))
        replies = self._run(calls, raise_on_error=False)
        for (n, _), reply in zip(which, replies):
            if isinstance(reply, Exception) and not rejected(reply):
                raise reply
            if isinstance(reply, redis.ResponseError):
                results[n] = reply  # the event goes to the DLQ, whatever its other parts did
            elif reply == 1 and results[n] is False:
                results[n] = True
        return replies

    # -- reads --------------------------------------------------------------------------------
    def _snapshots(self, ids: Sequence[str], read: Callable[[Any, str], None]) -> dict[str, list[Any]]:
        """Each id's replies to the commands ``read(pipe, id)`` queues; one MULTI per shard, so the keys of
        one entity are read in one snapshot (a cluster runs a transaction in one slot only)."""
        out: dict[str, list[Any]] = {}
        for group in self._by_shard(ids).values():
            pipe = self.r.pipeline(transaction=True)
            for id_ in group:
                read(pipe, id_)
            replies = pipe.execute()
            width = len(replies) // len(group)
            out.update((id_, replies[n * width:(n + 1) * width]) for n, id_ in enumerate(group))
        return out

    def users(self, ids: Sequence[str]) -> list[UserState | None]:
        """User states in the order of ``ids``; None for a user with no state. Each user's is one
        snapshot: the version read is the version of the history and profile read."""
        def read(pipe: Any, uid: str) -> None:
            pipe.hgetall(self._u(uid, "m"))
            pipe.hgetall(self._u(uid, "p"))
            pipe.zrange(self._u(uid, "h"), 0, -1, withscores=True)
            pipe.scard(self._u(uid, "e"))

        got = self._snapshots(ids, read)
        out: list[UserState | None] = []
        for uid in ids:
            meta, profile, hist, engaged = got[uid]
            out.append(UserState(
                user_id=uid, profile=_decode_features(profile),
                history=[HistoryEntry(item.decode(), int(ts)) for item, ts in hist],
                updated_ms=int(meta.get(b"ts", -1)), version=int(meta.get(b"v", 0)), engaged=int(engaged)) if meta else None)
        return out

    def items(self, ids: Sequence[str]) -> list[ItemState | None]:
        """Item states in the order of ``ids``; None for an item with no state (neither features nor
        counts). Each item's is one snapshot, as for ``users``."""
        def read(pipe: Any, iid: str) -> None:
            pipe.hgetall(self._i(iid, "m"))
            pipe.hgetall(self._i(iid, "f"))
            for signal in SIGNALS:
                pipe.hgetall(self._i(iid, f"c:{signal}"))

        got = self._snapshots(ids, read)
        out: list[ItemState | None] = []
        for iid in ids:
            meta, features, *buckets = got[iid]
            if not meta:
                out.append(None)
                continue
            out.append(ItemState(item_id=iid, features=_decode_features(features),
                                 counters=_counters(buckets, int(meta.get(b"cts", -1))),
                                 deleted=meta.get(b"deleted") == b"1", updated_ms=int(meta.get(b"ts", -1)),
                                 version=int(meta.get(b"v", 0))))
        return out

    def servable_counters(self, ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Counters of the items among ``ids`` that have features and are not deleted (those serving can
        offer), read without their features: what a popularity ranking needs, at a fraction of ``items``' cost."""
        def read(pipe: Any, iid: str) -> None:
            pipe.hmget(self._i(iid, "m"), "cts", "deleted")
            pipe.exists(self._i(iid, "f"))
            for signal in SIGNALS:
                pipe.hgetall(self._i(iid, f"c:{signal}"))

        out: dict[str, dict[str, int]] = {}
        for iid, ((cts, deleted), has_features, *buckets) in self._snapshots(ids, read).items():
            if has_features and deleted != b"1":
                out[iid] = _counters(buckets, int(cts or -1))
        return out

    def _scan_ids(self, entity: str) -> Iterator[str]:
        for key in self.r.scan_iter(match=self.keys.every_shard(f"{entity}:*:m"), count=1000):
            yield self.keys.entity(key.decode())

    def user_ids(self) -> Iterator[str]:
        """Every user with any state (SCAN, on every node of a cluster: may repeat an id; callers
        needing a set should make one)."""
        return self._scan_ids("u")

    def item_ids(self) -> Iterator[str]:
        """Every item with any state, features or counts (SCAN: may repeat an id)."""
        return self._scan_ids("i")

    def engaged_items(self, user_id: str) -> set[str]:
        """Every item the user ever engaged with (a separate uncapped set, not the capped history)."""
        return {m.decode() for m in self.r.smembers(self._u(user_id, "e"))}

    def recent_impressions(self, user_id: str) -> list[HistoryEntry]:
        """The user's most recent impressions, oldest first (capped at recent_impressions_len)."""
        return [HistoryEntry(i.decode(), int(ts)) for i, ts in self.r.zrange(self._u(user_id, "i"), 0, -1, withscores=True)]

    # -- popularity percentiles ------------------------------------------------------------------
    def percentile_tables(self) -> dict[str, PercentileTable]:
        """The stored table per counter name (empty until the first refresh)."""
        return {k.decode(): PercentileTable.from_json(v.decode()) for k, v in self.r.hgetall(self._q("pct")).items()}

    def refresh_percentile_tables(self, batch: int = 1000) -> dict[str, PercentileTable]:
        """Refit every counter's table on all items' counts, store it, and mark dirty every item
        whose buckets moved (``bucket_hysteresis``; the buckets are part of the item's text)."""
        ids = list(dict.fromkeys(self.item_ids()))
        states = [st for start in range(0, len(ids), batch) for st in self.items(ids[start:start + batch]) if st]
        if not states:
            return {}
        tables = fit_tables([st.counters for st in states])
        self.r.hset(self._q("pct"), mapping={name: t.to_json() for name, t in tables.items()})
        for start in range(0, len(states), batch):
            self._recheck(states[start:start + batch], tables, {})
        return tables

    def claim_percentile_refresh(self, interval_s: float) -> bool:
        """True for the one caller (of all workers) that should refit the tables in this interval."""
        return bool(self.r.set(self._q("pct:due"), 1, nx=True, px=max(int(interval_s * 1000), 1)))

    def check_buckets(self, limit: int = 1000, tables: Mapping[str, PercentileTable] | None = None) -> list[str]:
        """Items whose counters changed (about ``limit``, an even share from each shard): mark dirty
        those whose percentile buckets moved by ``bucket_hysteresis`` points or more; returns them.

        The check is off the event path (so an event stays one script call per shard) and crash-safe:
        an item leaves ``counted`` only after its new buckets are stored and its dirty mark is set.
        """
        tables = self.percentile_tables() if tables is None else tables
        share = math.ceil(limit / self.keys.shards)
        pipe = self.r.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.zrange(self.keys.in_shard(shard, "counted"), 0, share - 1, withscores=True)
        change_no = {m.decode(): int(n) for pending in pipe.execute() for m, n in pending}
        if not change_no or not tables:
            return []
        states = [st for st in self.items(list(change_no)) if st]
        return self._recheck(states, tables, change_no)

    def _recheck(self, states: Sequence[ItemState], tables: Mapping[str, PercentileTable],
                 change_no: Mapping[str, int]) -> list[str]:
        stored = self.r.pipeline(transaction=False)
        for st in states:
            stored.hget(self._i(st.item_id, "m"), "b")
        previous = stored.execute()
        now = _now_ms()
        moved: list[str] = []
        # In order per item (its keys share a node): the dirty mark, then the buckets, then (below) the
        # uncount. A crash between them costs one encode more, never a missed move.
        pipe = self.r.pipeline(transaction=False)
        for st, prev in zip(states, previous):
            buckets = {name: tables[name].bucket(st.counters[name]) for name in COUNTER_NAMES if name in tables}
            if prev is not None and not _moved(json.loads(prev), buckets, self.settings.bucket_hysteresis):
                continue
            if st.features and not st.deleted:  # no stored buckets yet: its vector has none either
                pipe.zadd(self.keys.near(st.item_id, "dirty:items:counts"), {st.item_id: now}, nx=True)
                moved.append(st.item_id)
            pipe.hset(self._i(st.item_id, "m"), "b", json.dumps(buckets, sort_keys=True))
        pipe.execute()
        self._run([(self._uncount, [self.keys.in_shard(shard, "counted")], [x for iid in group for x in (iid, change_no[iid])])
                   for shard, group in self._by_shard(list(change_no)).items()])
        return moved

    def unchecked_count(self) -> int:
        """Items whose counters changed since their percentile buckets were last checked."""
        return self._sum_cards(["counted"])

    def claim_writes(self, kind: Kind, model_version: str, versions: Mapping[str, int]) -> set[str]:
        """Record that vectors (or deletes) of these state versions are about to be written; returns
        the ids to write: those with no newer version written already. A slow worker's render of an
        older state, arriving after a newer one, is left out, so it cannot replace the newer vector."""
        name = f"vec:{model_version}:{kind}"
        replies = self._run([(self._claim, [self.keys.in_shard(shard, name)], [x for id_ in group for x in (id_, versions[id_])])
                             for shard, group in self._by_shard(list(versions)).items()])
        return {x.decode() for fresh in replies for x in fresh}

    def written_versions(self, model_version: str, kind: Kind, ids: Sequence[str]) -> dict[str, int]:
        """The state version of the newest vector of ``model_version`` written for each of ``ids``
        (-1: none yet)."""
        pipe = self.r.pipeline(transaction=False)
        for id_ in ids:
            pipe.hget(self.keys.near(id_, f"vec:{model_version}:{kind}"), id_)
        return {id_: int(v) if v is not None else -1 for id_, v in zip(ids, pipe.execute())}

    def durability_issue(self) -> str | None:
        """Why an event script's reply may come before its writes are on disk (the worker commits
        offsets after it), or None: every server (each primary of a cluster) must run with appendonly
        yes and appendfsync always."""
        try:
            if isinstance(self.r, RedisCluster):
                confs = {node.name: self.r.config_get("append*", target_nodes=node) for node in self.r.get_primaries()}
            else:
                confs = {self.settings.redis_url_masked: self.r.config_get("append*")}
        except redis.ResponseError as exc:  # managed Redis may refuse CONFIG
            return f"cannot read the server's persistence settings ({exc})"
        for node, conf in confs.items():
            got = {k: conf.get(k) for k in ("appendonly", "appendfsync")}
            if got != {"appendonly": "yes", "appendfsync": "always"}:
                return f"persistence of {node} is {got}"
        return None

    def clear(self) -> int:
        """Delete every key under this store's prefix (and only those); returns how many."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.r.scan_iter(match=f"{glob_escape(self.p)}*", count=10_000):
            batch.append(key)
            if len(batch) == 10_000:
                deleted += self.r.delete(*batch)
                batch = []
        return deleted + (self.r.delete(*batch) if batch else 0)

    # -- dirty queues ---------------------------------------------------------------------------
    def mark_dirty(self, kind: Kind, ids_with_ts: Mapping[str, int]) -> None:
        """Queue entities for re-encoding; ``ids_with_ts`` maps id -> wall-clock ms of the change.
        A queued entity keeps its first time (the debounce window starts at the first change)."""
        pipe = self.r.pipeline(transaction=False)
        for shard, group in self._by_shard(list(ids_with_ts)).items():
            pipe.zadd(self.keys.in_shard(shard, f"dirty:{kind}"), {id_: ids_with_ts[id_] for id_ in group}, nx=True)
        pipe.execute()

    def pop_dirty(self, kind: Kind, limit: int, settled_before_ms: int, *, counter_moves: bool = True) -> Lease:
        """Take up to ``limit`` entities dirty since before ``settled_before_ms`` (plus any whose
        lease expired), leased for ``refresh_lease_s`` under a new token: call ``ack_dirty`` after
        their vectors are upserted; unacknowledged ones return to the queue when the lease ends (a
        crashed worker), and then another popper's token replaces this one. ``counter_moves=False``
        leaves the items queued for a bucket move only (``dirty:items:counts``) where they are.

        Every shard's first queue is served before any shard's second. Fair across shards: each round
        asks every shard that may hold more for an even share of what is still wanted (starting at a
        random shard when fewer are wanted than there are shards), in one pipeline; a shard that gives
        less than its share is done. Usually one or two rounds a queue.
        """
        token, now, lease_ms = uuid.uuid4().hex, _now_ms(), int(self.settings.refresh_lease_s * 1000)
        start = random.randrange(self.keys.shards)
        taken: list[str] = []
        queues = len(self._queue_names(kind)) if counter_moves else 1
        for served in range(1, queues + 1):
            shards = [(start + n) % self.keys.shards for n in range(self.keys.shards)]
            while shards and len(taken) < limit:
                asked = shards[:limit - len(taken)]
                share = (limit - len(taken)) // len(asked)
                replies = self._run([(self._pop, [self._key(shard, "inflight", kind), self._key(shard, "lease", kind),
                                                  *self._queues(kind, shard)],
                                      [settled_before_ms, share, now, lease_ms, token, served]) for shard in asked])
                taken += [x.decode() for got in replies for x in got]
                shards = [shard for shard, got in zip(asked, replies) if len(got) == share] + shards[len(asked):]
        return Lease(taken, token)

    def ack_dirty(self, kind: Kind, lease: Lease, ids: Sequence[str] | None = None) -> list[str]:
        """The vectors of ``ids`` (default: all the lease's) are upserted: end their leases (and any
        quarantine: they are fine now). A change made meanwhile re-queued them. An id whose lease
        expired and was taken over is queued again instead (this write may be older than the
        other's) and returned: the leases lost."""
        return self._end_leases(kind, lease, {id_: "ack" for id_ in (lease.ids if ids is None else ids)})

    def quarantine(self, kind: Kind, lease: Lease, reasons: Mapping[str, str]) -> None:
        """Set aside leased entities whose re-encoding failed on their own data, with the reason,
        ending their leases: they stop failing every batch they are in. A new event queues one
        again. An entity whose lease was taken over is left to its new holder."""
        self._end_leases(kind, lease, reasons)

    def _end_leases(self, kind: Kind, lease: Lease, outcomes: Mapping[str, str]) -> list[str]:
        """End the leases of ``outcomes``' ids: 'ack', or quarantine with the reason; the leases lost."""
        groups: dict[tuple[int, str], list[str]] = {}
        for id_, outcome in outcomes.items():
            groups.setdefault((self.keys.shard(id_), outcome), []).append(id_)
        now = _now_ms()
        replies = self._run([(self._release, [self._key(shard, "inflight", kind), self._key(shard, "lease", kind),
                                              self._key(shard, "quarantine", kind), self._key(shard, "dirty", kind)],
                              [lease.token, outcome, now, *ids]) for (shard, outcome), ids in groups.items()])
        return [x.decode() for lost in replies for x in lost]

    def quarantined(self, kind: Kind) -> dict[str, str]:
        """Quarantined entities of ``kind`` -> the reason their re-encoding failed."""
        pipe = self.r.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            pipe.hgetall(self._key(shard, "quarantine", kind))
        return {k.decode(): v.decode() for held in pipe.execute() for k, v in held.items()}

    def retry_quarantined(self, kind: Kind, ids: Sequence[str] | None = None) -> list[str]:
        """Queue quarantined entities (all of ``kind`` when ``ids`` is None) for re-encoding again,
        after a fix; they stay listed until a refresh succeeds. Returns the ids queued."""
        held = self.quarantined(kind)
        queued = list(held) if ids is None else [i for i in ids if i in held]
        self.mark_dirty(kind, {i: _now_ms() for i in queued})
        return queued

    def dirty_count(self, kind: Kind) -> int:
        """Entities waiting or leased for re-encoding (zero = the vectors reflect all applied events)."""
        return self._sum_cards([f"inflight:{kind}", *self._queue_names(kind)])

    def _sum_cards(self, names: Sequence[str]) -> int:
        """The members of the sorted sets ``names`` of every shard, summed."""
        pipe = self.r.pipeline(transaction=False)
        for shard in range(self.keys.shards):
            for name in names:
                pipe.zcard(self.keys.in_shard(shard, name))
        return sum(pipe.execute())

    def _key(self, shard: int, name: str, kind: Kind) -> str:
        return self.keys.in_shard(shard, f"{name}:{kind}")

    def _queues(self, kind: Kind, shard: int) -> list[str]:
        """Dirty queues of ``kind`` in one shard, in the order they are served."""
        return [self.keys.in_shard(shard, name) for name in self._queue_names(kind)]

    @staticmethod
    def _queue_names(kind: Kind) -> list[str]:
        return [f"dirty:{kind}"] + (["dirty:items:counts"] if kind == "items" else [])
