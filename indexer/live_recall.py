"""Live recall: was the item a user just engaged with among the candidates served to them just before?

Every engagement is a free relevance judgement. For a sampled fraction the worker, before applying
the event, takes the user's engaged set and state version (``snapshot``, one Redis round trip a
batch); then, off the event path, it reads the user's stored vector (unless the refresher already
wrote one from a newer state, which would show the engagement) and ranks the engaged item with the candidates code (ANN top-``DEPTH``, seen items excluded as
serving excludes them) in the active version and in a version a re-index is building (shadow), and
ranks it by popularity (the items' 7-day engagement counters, same exclusion; the order is re-read from
the counters alone every ``POPULARITY_RELOAD_S``) for a baseline. Hits are
added to per-minute Redis hashes, so every worker and ``onetower quality`` read the same sliding
windows; shadow and active ranks of the same engagement are also kept as pairs, which is what a
re-index compares before promoting (``promotion_check``).

Live recall measures the model and the freshness of its vectors together: a vector written before the
user's last engagements ranks with a history that misses them. The vector's lag (the user's state
changes since the state it was written from) is recorded for every probe, and the probes whose vector
was current (lag 0) are also counted apart (``fresh``), so a low figure says which of the two is short.

Redis keys (``P`` = ``settings.redis_key_prefix``): ``P lr:<version>:<minute>`` hash of
``n`` (scored) and ``m<k>`` / ``p<k>`` (model / popularity hits at k), the same prefixed ``f`` for
probes with a current vector, expiring after the longest window; ``P lr:versions`` set of versions scored; ``P lr:pairs:<version>`` list of
"active rank,shadow rank" (0 = beyond ``DEPTH``), newest first, capped.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from indexer.candidates import Retriever
from indexer.vectors import VectorStore
from core.settings import Settings
from streams import metrics
from streams.events import EngagementEvent
from streams.state import StateStore

log = logging.getLogger("onetower.live_recall")

KS = (10, 50, 100)
DEPTH = max(KS)  # ranks beyond this are recorded as misses
WINDOWS_S = {"1h": 3600, "24h": 24 * 3600}
MINUTE_S = 60
VERSIONS_RELOAD_S = 10.0  # how stale this worker's idea of the active and shadow versions may get
POPULARITY_RELOAD_S = 60.0  # how stale the popularity order may get (7-day counts barely move in a minute)
POPULARITY_COUNTER = "engagements_7d"
SHADOW_STATES = ("building", "ready")
PAIRS_KEEP = 10_000
BACKOFF_S = 30.0  # scoring pauses this long after a failure, so a Milvus outage never slows the event path


@dataclass(frozen=True)
class Probe:
    """One sampled engagement as the user stood just before it: what serving would have seen."""

    user_id: str
    item_id: str
    seen: frozenset[str]
    state_version: int  # the user's state version then: a vector written from a newer one is too late
    active: str  # the version serving then
    versions: tuple[str, ...]  # the active version and the shadows then


@dataclass(frozen=True)
class Figures:
    """Live recall of one version over one window, with popularity on the same engagements; ``fresh``:
    the same over the engagements whose user vector was current (None in the ``fresh`` figures themselves)."""

    version: str
    window: str
    scored: int
    recall: dict[int, float]
    popularity: dict[int, float]
    fresh: Figures | None = None


@dataclass(frozen=True)
class Comparison:
    """Shadow against active recall@k on the same engagements (the promotion rule's figures)."""

    candidate: str
    active: str
    k: int
    engagements: int
    candidate_recall: float
    active_recall: float

    @property
    def passed(self) -> bool:
        return self.candidate_recall >= self.active_recall


def _hit_fields(prefix: str, rank: int | None) -> list[str]:
    return [f"{prefix}{k}" for k in KS if rank is not None and rank <= k]


class LiveRecall:
    """The worker's scorer; ``snapshot`` runs before the events are applied, ``score`` after, anywhere."""

    def __init__(self, settings: Settings, index: VectorStore, store: StateStore) -> None:
        self.settings = settings
        self.index = index
        self.store = store
        self.retriever = Retriever(settings, index, store)
        self._rng = random.Random()
        self._versions: tuple[str | None, list[str]] = (None, [])
        self._versions_at = -VERSIONS_RELOAD_S
        self._popular: list[str] = []
        self._popular_at = -POPULARITY_RELOAD_S
        self._off_until = 0.0
        self._lock = threading.Lock()
        self._tokens, self._tokens_at = settings.live_recall_max_per_s, time.monotonic()

    def snapshot(self, events: Sequence[EngagementEvent]) -> list[Probe]:
        """Probes for a sample of ``events`` (in order, none applied yet): an engagement's seen set and
        state version count the user's earlier ones in the batch too; an item already seen is skipped
        (serving never offers it)."""
        if time.monotonic() < self._off_until:
            return []
        sampled = [n for n in range(len(events)) if self._rng.random() < self.settings.live_recall_sample_rate]
        picked = set(sampled[:self._allow(len(sampled))])
        if len(picked) < len(sampled):
            metrics.LIVE_RECALL_SKIPPED.labels("rate").inc(len(sampled) - len(picked))
        active, shadows = self.versions() if picked else (None, [])
        if active is None:
            return []
        users = list(dict.fromkeys(events[n].user_id for n in sorted(picked)))
        pipe = self.store.r.pipeline(transaction=False)
        for uid in users:
            pipe.smembers(self.store._u(uid, "e"))
            pipe.hget(self.store._u(uid, "m"), "v")
        got = pipe.execute()
        seen = {uid: {m.decode() for m in got[2 * n]} for n, uid in enumerate(users)}
        state = {uid: int(got[2 * n + 1] or 0) for n, uid in enumerate(users)}
        probes: list[Probe] = []
        for n, ev in enumerate(events):
            before = seen.setdefault(ev.user_id, set())
            if n in picked:
                if ev.item_id in before:
                    metrics.LIVE_RECALL_SKIPPED.labels("seen").inc()
                else:
                    probes.append(Probe(ev.user_id, ev.item_id, frozenset(before), state[ev.user_id], active,
                                        (active, *shadows)))
            before.add(ev.item_id)
            if ev.user_id in state:
                state[ev.user_id] += 1  # every engagement bumps the user's state version (streams/rules.py)
        return probes

    def _allow(self, wanted: int) -> int:
        """How many of ``wanted`` samples ``live_recall_max_per_s`` lets through now (a token bucket one second deep)."""
        cap = self.settings.live_recall_max_per_s
        with self._lock:
            now = time.monotonic()
            self._tokens = min(cap, self._tokens + (now - self._tokens_at) * cap)
            self._tokens_at = now
            allowed = min(wanted, int(self._tokens))
            self._tokens -= allowed
            return allowed

    def score(self, probes: Sequence[Probe]) -> None:
        """Rank each probe's item in every version that holds a vector of the user from before the
        engagement, and by popularity; record."""
        vectors, written = self._vectors(probes)
        pipe = self.store.r.pipeline(transaction=False)
        minute = int(time.time()) // MINUTE_S
        ttl = max(WINDOWS_S.values()) + MINUTE_S
        for probe in probes:
            started = time.perf_counter()
            popular = self._popularity_rank(probe)
            # a vector written from a newer state than the probe's shows the engagement: the refresher got there first
            at = {v: written[v][probe.user_id] for v in probe.versions
                  if probe.user_id in vectors[v] and written[v][probe.user_id] <= probe.state_version}
            ranks = {v: self._rank(v, vectors[v][probe.user_id], probe) for v in at}
            if not ranks:
                metrics.LIVE_RECALL_SKIPPED.labels("no_vector").inc()
            for version, rank in ranks.items():
                key = self.store._q(f"lr:{version}:{minute}")
                lag = probe.state_version - at[version] if at[version] >= 0 else None  # None: not recorded
                fields = ["n", *_hit_fields("m", rank), *_hit_fields("p", popular)]
                for field in fields + ([f"f{f}" for f in fields] if lag == 0 else []):
                    pipe.hincrby(key, field, 1)
                if lag is not None:
                    metrics.LIVE_RECALL_VECTOR_LAG.labels(version).observe(lag)
                pipe.expire(key, ttl)
                pipe.sadd(self.store._q("lr:versions"), version)
                metrics.LIVE_RECALL_RANK.labels(version).observe(rank if rank is not None else DEPTH + 1)
                metrics.LIVE_RECALL_SCORED.labels(version).inc()
                if version != probe.active and probe.active in ranks:
                    pipe.lpush(self.store._q(f"lr:pairs:{version}"), f"{ranks[probe.active] or 0},{rank or 0}")
                    pipe.ltrim(self.store._q(f"lr:pairs:{version}"), 0, PAIRS_KEEP - 1)
            metrics.LIVE_RECALL_SECONDS.observe(time.perf_counter() - started)
        pipe.execute()

    def failed(self, exc: BaseException) -> None:
        """Count a failure and pause scoring for a while (the events are applied regardless)."""
        metrics.LIVE_RECALL_ERRORS.inc()
        self._off_until = time.monotonic() + BACKOFF_S
        log.warning("live recall scoring failed; paused", extra={"error": repr(exc), "pause_s": BACKOFF_S})

    def versions(self) -> tuple[str | None, list[str]]:
        """(active version, versions a re-index is building), re-read every ``VERSIONS_RELOAD_S``."""
        with self._lock:
            if time.monotonic() - self._versions_at >= VERSIONS_RELOAD_S:
                active = self.index.active_version()
                shadows = [v for v in self.index.versions() if v != active
                           and (self.index.version_info(v) or {}).get("state") in SHADOW_STATES]
                self._versions, self._versions_at = (active, shadows), time.monotonic()
            return self._versions

    def _vectors(self, probes: Sequence[Probe]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, int]]]:
        """Per version, the probes' users' stored vectors and the state version each was written from (-1:
        not recorded). The vector is read before its state version: writers record the version before they upsert."""
        users = list(dict.fromkeys(p.user_id for p in probes))
        versions = list(dict.fromkeys(v for p in probes for v in p.versions))
        found = {v: self.index.get_vectors("users", v, users) for v in versions}
        return found, {v: self.store.written_versions(v, "users", users) for v in versions}

    def _rank(self, version: str, vector: np.ndarray, probe: Probe) -> int | None:
        """1-based rank of the item among ``version``'s candidates for the user, None beyond DEPTH."""
        items = self.retriever.search(version, vector, DEPTH, set(probe.seen), None, False).items
        return next((n for n, (item, _) in enumerate(items, 1) if item == probe.item_id), None)

    def _popularity_rank(self, probe: Probe) -> int | None:
        rank = 0
        for item in self._popularity():
            if item in probe.seen:
                continue
            rank += 1
            if item == probe.item_id:
                return rank
            if rank >= DEPTH:
                return None
        return None

    def _popularity(self) -> list[str]:
        """Every servable item, most engaged first (``POPULARITY_COUNTER``, ties by id), re-read every
        ``POPULARITY_RELOAD_S`` from the counters alone."""
        if time.monotonic() - self._popular_at >= POPULARITY_RELOAD_S:
            ids = list(dict.fromkeys(self.store.item_ids()))
            counts = {iid: counters[POPULARITY_COUNTER] for start in range(0, len(ids), 1000)
                      for iid, counters in self.store.servable_counters(ids[start:start + 1000]).items()}
            self._popular = sorted(counts, key=lambda iid: (-counts[iid], iid))
            self._popular_at = time.monotonic()
        return self._popular


def figures(store: StateStore, now_s: float | None = None) -> list[Figures]:
    """Live recall of every version scored, over each of ``WINDOWS_S`` up to ``now_s``."""
    now_minute = int(time.time() if now_s is None else now_s) // MINUTE_S
    versions = sorted(m.decode() for m in store.r.smembers(store._q("lr:versions")))
    longest = max(WINDOWS_S.values()) // MINUTE_S
    pipe = store.r.pipeline(transaction=False)
    for version in versions:
        for back in range(longest):
            pipe.hgetall(store._q(f"lr:{version}:{now_minute - back}"))
    rows = pipe.execute()
    out: list[Figures] = []
    for n, version in enumerate(versions):
        minutes = rows[n * longest:(n + 1) * longest]  # newest first
        for window, seconds in WINDOWS_S.items():
            total: dict[str, int] = {}
            for bucket in minutes[:seconds // MINUTE_S]:
                for field, count in bucket.items():
                    total[field.decode()] = total.get(field.decode(), 0) + int(count)
            out.append(replace(_figures(version, window, total, ""), fresh=_figures(version, window, total, "f")))
    return out


def _figures(version: str, window: str, total: dict[str, int], prefix: str) -> Figures:
    scored = total.get(f"{prefix}n", 0)
    rate = lambda field: total.get(f"{prefix}{field}", 0) / scored if scored else 0.0  # noqa: E731
    return Figures(version, window, scored, {k: rate(f"m{k}") for k in KS}, {k: rate(f"p{k}") for k in KS})


def compare(store: StateStore, candidate: str, active: str, n: int, k: int = 10) -> Comparison:
    """Recall@k of ``candidate`` and ``active`` on the newest ``n`` (or fewer) engagements both ranked."""
    pairs = [tuple(int(x) for x in raw.split(b",")) for raw in store.r.lrange(store._q(f"lr:pairs:{candidate}"), 0, n - 1)]
    hit = lambda rank: 0 < rank <= k  # noqa: E731
    count = len(pairs) or 1
    return Comparison(candidate, active, k, len(pairs), sum(hit(c) for _, c in pairs) / count,
                      sum(hit(a) for a, _ in pairs) / count)


def promotion_check(store: StateStore, candidate: str, active: str, n: int, timeout_s: float,
                    k: int = 10) -> Comparison:
    """Forget the pairs scored while ``candidate`` was being built (its index was partial), then wait up to
    ``timeout_s`` for the workers to score ``n`` engagements in both versions; the figures so far."""
    store.r.delete(store._q(f"lr:pairs:{candidate}"))
    deadline = time.monotonic() + timeout_s
    while store.r.llen(store._q(f"lr:pairs:{candidate}")) < n and time.monotonic() < deadline:
        time.sleep(1.0)
    result = compare(store, candidate, active, n, k)
    log.info("live recall promotion check", extra={"candidate": candidate, "active": active, "k": k,
                                                    "engagements": result.engagements, "required": n,
                                                    "candidate_recall": result.candidate_recall,
                                                    "active_recall": result.active_recall,
                                                    "promote": result.passed and result.engagements >= n})
    return result


def publish(store: StateStore) -> None:
    """Set the live recall gauges from the shared Redis windows (every worker reports the same figures)."""
    for fig in figures(store):
        for k in KS:
            metrics.LIVE_RECALL.labels(fig.version, fig.window, str(k), "model").set(fig.recall[k])
            metrics.LIVE_RECALL.labels(fig.version, fig.window, str(k), "popularity").set(fig.popularity[k])
        metrics.LIVE_RECALL_WINDOW_SCORED.labels(fig.version, fig.window).set(fig.scored)
