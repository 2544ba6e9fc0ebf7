"""The streaming state in Redis (DESIGN.md, State): profiles, histories, counters, dirty queues.

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

Layout (``P`` = ``settings.redis_key_prefix``; every key ends in a type suffix, so ids may hold ':'):

=====================  ======  =====================================================================
``P ev:<kind>:<id>``   string  idempotency key of one event, expires after ``dedup_ttl_s``
``P u:<uid>:m``        hash    ``ts`` (event time of the latest profile/engagement reflected),
                               ``pts`` (profile event time), ``its`` (latest impression time),
                               ``v`` (state version: +1 by each event that changes what is encoded)
``P u:<uid>:p``        hash    profile feature -> JSON value (replaced by each newer user event)
``P u:<uid>:h``        zset    history: item -> event time of the latest engagement, capped
``P u:<uid>:e``        set     every item the user engaged with (uncapped; for exclude-seen)
``P u:<uid>:i``        zset    recent impressions: item -> event time, capped
``P i:<iid>:m``        hash    ``ts`` (latest event time reflected), ``fts`` (features event time),
                               ``cts`` (newest counter event time), ``deleted``, ``n`` (counter
                               changes), ``b`` (JSON percentile buckets at the last check), ``v``
                               (state version: +1 by each feature or counter change)
``P i:<iid>:f``        hash    feature -> JSON value (replaced by each newer item event)
``P i:<iid>:c:<sig>``  hash    hour bucket -> count, per signal (impressions, engagements)
``P dirty:<kind>``     zset    entities waiting for re-encoding -> wall-clock ms of first dirt
``P dirty:items:counts``  zset  items whose percentile bucket moved, the same (popped only after
                               ``dirty:items``: a new item never waits behind a wave of bucket moves)
``P inflight:<kind>``  zset    entities popped for re-encoding -> lease deadline (wall-clock ms)
``P lease:<kind>``     hash    entities popped for re-encoding -> the token of their current lease
``P quarantine:<kind>``  hash  entities whose re-encoding failed on their own data -> the reason
                               (out of the queues until retried or changed again)
``P vec:<model>:<kind>``  hash  entity -> state version of the newest vector written for it (an
                               older render arriving later is not written)
``P counted``          zset    items whose counters changed since their buckets were checked -> ``n``
``P pct``              hash    counter name -> PercentileTable JSON
``P pct:due``          string  set (with a TTL of the refit interval) by the worker that refits
=====================  ======  =====================================================================

One Redis primary is assumed: the scripts touch a user's, an item's and the queue keys together.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import redis

from core.settings import Settings
from streams.counters import COUNTER_NAMES, SIGNALS, PercentileTable, counters_as_of, fit_tables
from streams.events import Event
from streams.rules import RULES, HistoryEntry, ItemState, Keys, Rule, UserState, rule_for

Kind = Literal["users", "items"]
REJECTED = "REJECTED"  # prefix of the error an event script replies when the event's own data failed it


def rejected(exc: BaseException) -> bool:
    """True for a script's reply that this event failed on its own data: retrying cannot help."""
    return type(exc) is redis.ResponseError and str(exc).startswith(REJECTED + " ")


def _event_script(rule: Rule) -> str:
    """A rule's script: claim the event id (KEYS[1], TTL ARGV[1]; 0 when already applied), apply the
    rule's body under pcall, and on failure release the claim and reply REJECTED with the reason."""
    return rule.lua_helpers + f"""
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[1]) then return 0 end
local ok, err = pcall(function()
{rule.lua_body}
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


# Move up to ARGV[2] entities to inflight with a lease under token ARGV[5]: first those whose lease
# expired (a worker died or stalled mid-batch), then settled dirty ones, queue by queue, that are not
# under a live lease (another worker encodes them). A popped entity leaves every queue: one encode
# covers all its changes.
# KEYS: inflight, lease tokens, dirty queue 1, dirty queue 2, ...
# ARGV: settled_before_ms, limit, now_ms, lease_ms, token
_POP = """
local limit, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local deadline = now + tonumber(ARGV[4])
local out, seen = {}, {}
local function take(id)
  for q = 3, #KEYS do redis.call('ZREM', KEYS[q], id) end
  if not seen[id] then out[#out + 1] = id; seen[id] = true end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)) do take(id) end
for q = 3, #KEYS do
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


def _decode_features(raw: Mapping[bytes, bytes]) -> dict[str, Any]:
    return {k.decode(): json.loads(v) for k, v in raw.items()}


class StateStore:
    """Reads and writes the streaming state; one event = one script call, batches = one pipeline."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.p = settings.redis_key_prefix
        self.keys = Keys(self.p)
        self._scripts = {event_type: client.register_script(_event_script(rule)) for event_type, rule in RULES.items()}
        self._pop = client.register_script(_POP)
        self._release = client.register_script(_RELEASE)
        self._uncount = client.register_script(_UNCOUNT)
        self._claim = client.register_script(_CLAIM)

    @classmethod
    def from_settings(cls, settings: Settings) -> "StateStore":
        # A password in the URL wins over redis_password (redis-py lets the URL override keywords).
        password = settings.redis_password.get_secret_value() or None
        return cls(redis.Redis.from_url(settings.redis_url, password=password, health_check_interval=30), settings)

    # -- keys ---------------------------------------------------------------------------------
    def _u(self, uid: str, suffix: str) -> str:
        return self.keys.user(uid, suffix)

    def _i(self, iid: str, suffix: str) -> str:
        return self.keys.item(iid, suffix)

    def _q(self, name: str) -> str:
        return self.keys.shared(name)

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
        its place while the others are applied; any other error reply is raised."""
        now = _now_ms() if now_ms is None else now_ms
        s = self.settings
        pipe = self.r.pipeline(transaction=False)
        for ev in events:
            keys, args = rule_for(ev).redis_call(ev, self.keys, s, now)
            self._scripts[type(ev)](keys=[self.keys.event(ev), *keys], args=[s.dedup_ttl_s, *args], client=pipe)
        results = pipe.execute(raise_on_error=False)
        for res in results:
            if isinstance(res, Exception) and not rejected(res):
                raise res
        return [res if isinstance(res, redis.ResponseError) else bool(res) for res in results]

    # -- reads --------------------------------------------------------------------------------
    def users(self, ids: Sequence[str]) -> list[UserState | None]:
        """User states in the order of ``ids``; None for a user with no state. One snapshot
        (MULTI): the version read is the version of the history and profile read."""
        pipe = self.r.pipeline(transaction=True)
        for uid in ids:
            pipe.hgetall(self._u(uid, "m"))
            pipe.hgetall(self._u(uid, "p"))
            pipe.zrange(self._u(uid, "h"), 0, -1, withscores=True)
        res = pipe.execute()
        out: list[UserState | None] = []
        for n, uid in enumerate(ids):
            meta, profile, hist = res[3 * n: 3 * n + 3]
            if not meta:
                out.append(None)
                continue
            out.append(UserState(
                user_id=uid, profile=_decode_features(profile),
                history=[HistoryEntry(item.decode(), int(ts)) for item, ts in hist],
                updated_ms=int(meta.get(b"ts", -1)), version=int(meta.get(b"v", 0))))
        return out

    def items(self, ids: Sequence[str]) -> list[ItemState | None]:
        """Item states in the order of ``ids``; None for an item with no state (neither features nor
        counts). One snapshot (MULTI), as for ``users``."""
        pipe = self.r.pipeline(transaction=True)
        for iid in ids:
            pipe.hgetall(self._i(iid, "m"))
            pipe.hgetall(self._i(iid, "f"))
            for signal in SIGNALS:
                pipe.hgetall(self._i(iid, f"c:{signal}"))
        res = pipe.execute()
        width = 2 + len(SIGNALS)
        out: list[ItemState | None] = []
        for n, iid in enumerate(ids):
            meta, features, *buckets = res[width * n: width * (n + 1)]
            if not meta:
                out.append(None)
                continue
            counts = {signal: {int(b): int(c) for b, c in raw.items()} for signal, raw in zip(SIGNALS, buckets)}
            out.append(ItemState(item_id=iid, features=_decode_features(features),
                                 counters=counters_as_of(counts, int(meta.get(b"cts", -1))),
                                 deleted=meta.get(b"deleted") == b"1", updated_ms=int(meta.get(b"ts", -1)),
                                 version=int(meta.get(b"v", 0))))
        return out

    def _scan_ids(self, entity: str) -> Iterator[str]:
        head = f"{self.p}{entity}:"
        for key in self.r.scan_iter(match=f"{_glob_escape(head)}*:m", count=1000):
            yield key.decode()[len(head):-2]

    def user_ids(self) -> Iterator[str]:
        """Every user with any state (SCAN: may repeat an id; callers needing a set should make one)."""
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
        whose bucket moved (the buckets are part of the item's text)."""
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
        """Items whose counters changed: mark dirty those whose percentile bucket moved; returns them.

        The check is off the event path (so an event stays one script call) and crash-safe: an item
        leaves ``counted`` only after its new buckets are stored and its dirty mark is set.
        """
        tables = self.percentile_tables() if tables is None else tables
        pending = self.r.zrange(self._q("counted"), 0, limit - 1, withscores=True)
        if not pending or not tables:
            return []
        change_no = {m.decode(): int(n) for m, n in pending}
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
        pipe = self.r.pipeline(transaction=True)
        for st, prev in zip(states, previous):
            buckets = json.dumps({name: tables[name].bucket(st.counters[name]) for name in COUNTER_NAMES if name in tables},
                                 sort_keys=True)
            if prev is not None and prev.decode() == buckets:
                continue
            pipe.hset(self._i(st.item_id, "m"), "b", buckets)
            if st.features and not st.deleted:  # no stored buckets yet: its vector has none either
                moved.append(st.item_id)
        if moved:
            pipe.zadd(self._q("dirty:items:counts"), {iid: now for iid in moved}, nx=True)
        if change_no:
            self._uncount(keys=[self._q("counted")], args=[x for kv in change_no.items() for x in kv], client=pipe)
        pipe.execute()
        return moved

    def claim_writes(self, kind: Kind, model_version: str, versions: Mapping[str, int]) -> set[str]:
        """Record that vectors (or deletes) of these state versions are about to be written; returns
        the ids to write: those with no newer version written already. A slow worker's render of an
        older state, arriving after a newer one, is left out, so it cannot replace the newer vector."""
        if not versions:
            return set()
        fresh = self._claim(keys=[self._q(f"vec:{model_version}:{kind}")], args=[x for kv in versions.items() for x in kv])
        return {x.decode() for x in fresh}

    def durability_issue(self) -> str | None:
        """Why an event script's reply may come before its writes are on disk (the worker commits
        offsets after it), or None: the server must run with appendonly yes and appendfsync always."""
        try:
            conf = self.r.config_get("append*")
        except redis.ResponseError as exc:  # managed Redis may refuse CONFIG
            return f"cannot read the server's persistence settings ({exc})"
        got = {k: conf.get(k) for k in ("appendonly", "appendfsync")}
        return None if got == {"appendonly": "yes", "appendfsync": "always"} else f"persistence is {got}"

    def clear(self) -> int:
        """Delete every key under this store's prefix (and only those); returns how many."""
        deleted = 0
        batch: list[bytes] = []
        for key in self.r.scan_iter(match=f"{_glob_escape(self.p)}*", count=10_000):
            batch.append(key)
            if len(batch) == 10_000:
                deleted += self.r.delete(*batch)
                batch = []
        return deleted + (self.r.delete(*batch) if batch else 0)

    # -- dirty queues ---------------------------------------------------------------------------
    def mark_dirty(self, kind: Kind, ids_with_ts: Mapping[str, int]) -> None:
        """Queue entities for re-encoding; ``ids_with_ts`` maps id -> wall-clock ms of the change.
        A queued entity keeps its first time (the debounce window starts at the first change)."""
        if ids_with_ts:
            self.r.zadd(self._q(f"dirty:{kind}"), dict(ids_with_ts), nx=True)

    def pop_dirty(self, kind: Kind, limit: int, settled_before_ms: int) -> Lease:
        """Take up to ``limit`` entities dirty since before ``settled_before_ms`` (plus any whose
        lease expired), leased for ``refresh_lease_s`` under a new token: call ``ack_dirty`` after
        their vectors are upserted; unacknowledged ones return to the queue when the lease ends (a
        crashed worker), and then another popper's token replaces this one."""
        token = uuid.uuid4().hex
        out = self._pop(keys=[self._q(f"inflight:{kind}"), self._q(f"lease:{kind}"), *self._queues(kind)],
                        args=[settled_before_ms, limit, _now_ms(), int(self.settings.refresh_lease_s * 1000), token])
        return Lease([x.decode() for x in out], token)

    def ack_dirty(self, kind: Kind, lease: Lease, ids: Sequence[str] | None = None) -> list[str]:
        """The vectors of ``ids`` (default: all the lease's) are upserted: end their leases (and any
        quarantine: they are fine now). A change made meanwhile re-queued them. An id whose lease
        expired and was taken over is queued again instead (this write may be older than the
        other's) and returned: the leases lost."""
        return self._end_leases(kind, lease, lease.ids if ids is None else ids, "ack")

    def quarantine(self, kind: Kind, lease: Lease, reasons: Mapping[str, str]) -> None:
        """Set aside leased entities whose re-encoding failed on their own data, with the reason,
        ending their leases: they stop failing every batch they are in. A new event queues one
        again. An entity whose lease was taken over is left to its new holder."""
        for id_, reason in reasons.items():
            self._end_leases(kind, lease, [id_], reason)

    def _end_leases(self, kind: Kind, lease: Lease, ids: Sequence[str], outcome: str) -> list[str]:
        if not ids:
            return []
        lost = self._release(keys=[self._q(f"inflight:{kind}"), self._q(f"lease:{kind}"), self._q(f"quarantine:{kind}"),
                                   self._q(f"dirty:{kind}")],
                             args=[lease.token, outcome, _now_ms(), *ids])
        return [x.decode() for x in lost]

    def quarantined(self, kind: Kind) -> dict[str, str]:
        """Quarantined entities of ``kind`` -> the reason their re-encoding failed."""
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self._q(f"quarantine:{kind}")).items()}

    def retry_quarantined(self, kind: Kind, ids: Sequence[str] | None = None) -> list[str]:
        """Queue quarantined entities (all of ``kind`` when ``ids`` is None) for re-encoding again,
        after a fix; they stay listed until a refresh succeeds. Returns the ids queued."""
        held = self.quarantined(kind)
        queued = list(held) if ids is None else [i for i in ids if i in held]
        self.mark_dirty(kind, {i: _now_ms() for i in queued})
        return queued

    def dirty_count(self, kind: Kind) -> int:
        """Entities waiting or leased for re-encoding (zero = the vectors reflect all applied events)."""
        pipe = self.r.pipeline(transaction=False)
        for key in (self._q(f"inflight:{kind}"), *self._queues(kind)):
            pipe.zcard(key)
        return sum(pipe.execute())

    def _queues(self, kind: Kind) -> list[str]:
        """Dirty queues of ``kind`` in the order they are served."""
        return [self._q(f"dirty:{kind}")] + ([self._q("dirty:items:counts")] if kind == "items" else [])


def _glob_escape(s: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in s)
