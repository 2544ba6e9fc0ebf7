"""The refresher: drains dirty users and items in micro-batches, encodes them, upserts their vectors.

A micro-batch is bounded by ``refresh_batch`` entities and waits ``refresh_debounce_s`` after an
entity's first change, so a burst of events on one user costs one encode. Dirty marks are leased on
pop and acknowledged only after Milvus took the vectors: a worker that dies mid-batch leaves its
entities to come back when the lease ends, so every dirty entity gets its vector. A worker that only
stalls past its lease may then write after the one that took over: each write is checked against the
state version of the newest vector written for that entity (an older render is skipped), and its ack,
finding the lease under another token, queues the entity once more (closing the gap between the
check and the upsert).

Order of a round: catalogue changes, users, then items whose popularity buckets moved (by
``bucket_hysteresis`` points: ``streams/state.py``), in batches of 1/``COUNTER_TRICKLE`` of the
others'. A popularity change can wait and a user's new engagement should not: a user waits behind
at most one small batch of moves, and a wave of moves (a percentile refit) drains round by round
without holding users back or being starved by them.

With ``incremental_users`` on and a causal tower served, users are re-encoded through cached keys/values
(``models/incremental.py``: only a new history entry's tokens are computed; same vectors); with
``incremental_items`` too, items are (only the tokens from the first changed counter on); the rest,
and every entity of a bidirectional tower, keep the full path.

A micro-batch that fails on its data (not on Redis or Milvus being unavailable) is bisected: the good
entities are still refreshed, and each one that fails on its own is quarantined with the reason
(``onetower quarantine list | retry``). Nothing a refresh raises stops the worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import redis
from prometheus_client import Counter

from core.settings import Settings
from indexer import state_vectors
from indexer.vectors import IndexUnavailable, VectorStore
from streams import metrics
from streams.state import Kind, Lease, StateStore

if TYPE_CHECKING:
    from models.encoder import Encoder
    from models.incremental import IncrementalEncoder
    from streams.counters import PercentileTable

log = logging.getLogger("onetower.refresher")
STALE_WRITES = Counter("onetower_stale_writes_skipped_total",
                       "vectors (or deletes) not written because one of a newer state version was written first", ["kind"])

TABLES_RELOAD_S = 1.0  # how stale this worker's copy of the percentile tables may get
BUCKET_CHECK_S = 1.0  # how often items whose counters changed are checked for a bucket move
ERROR_BACKOFF_S = 1.0
COUNTER_TRICKLE = 8  # items whose buckets moved are refreshed 1/8 of a batch a round


@dataclass(frozen=True)
class Rendered:
    """A micro-batch read and encoded, not written yet."""

    ids: list[str]
    live: list[tuple[str, Any]]  # (id, state) per row of ``vectors``
    vectors: np.ndarray
    gone: dict[str, int]  # ids to delete (no state, or a deleted item) -> their state version


class Refresher:
    """Re-encodes dirty entities with one model version; ``run_once`` is one step of the loop."""

    def __init__(self, settings: Settings, store: StateStore, encoder: "Encoder", index: VectorStore) -> None:
        self.settings = settings
        self.store = store
        self.encoder = encoder
        self.index = index
        self.version = encoder.version
        self.incremental = self._incremental() if settings.incremental_users else None
        self._tables: dict[str, PercentileTable] = {}
        self._tables_loaded = 0.0
        self._buckets_checked = 0.0

    def _incremental(self) -> "IncrementalEncoder | None":
        from models.incremental import for_artifact

        incremental = for_artifact(self.encoder.artifact.path, max_bytes=self.settings.incremental_cache_bytes,
                                   kv_dtype=self.settings.incremental_kv_dtype)
        log.info("users re-encoded incrementally" if incremental else "incremental re-encoding off: the tower is not causal",
                 extra={"version": self.version, "decoder": type(incremental.decoder).__name__ if incremental else None})
        return incremental

    def start(self) -> None:
        """Create the version's collections (or finish ones a killed worker left half made) and fit
        the percentile tables if none exist yet."""
        self.index.ensure_version(self.version)
        self._tables = self.store.percentile_tables()
        if self.store.claim_percentile_refresh(self.settings.percentile_refresh_s) or not self._tables:
            self._tables = self.store.refresh_percentile_tables()
        self._tables_loaded = time.monotonic()

    def run_once(self) -> int:
        """Refit the tables when due, queue items whose buckets moved, then one micro-batch each of:
        catalogue changes (first: users' texts show item features), users, and a small one of items
        whose buckets moved (see the module's docstring). Returns the entities handled."""
        try:
            self._maintain_tables()
            batch = self.settings.refresh_batch
            settled = int((time.time() - self.settings.refresh_debounce_s) * 1000)
            done = self._refresh_queued("items", batch, settled, counter_moves=False)
            done += self._refresh_queued("users", batch, settled)
            done += self._refresh_queued("items", max(batch // COUNTER_TRICKLE, 1), settled)
            for kind in ("items", "users"):
                metrics.DIRTY.labels(kind).set(self.store.dirty_count(kind))
            return done
        except redis.RedisError as exc:
            metrics.REDIS_ERRORS.inc()
            log.warning("redis call failed; retrying", extra={"error": str(exc)})
        except IndexUnavailable as exc:
            metrics.MILVUS_ERRORS.inc()
            log.warning("milvus call failed; the batch returns when its lease ends", extra={"error": str(exc)})
        except Exception:  # a bug outside any one entity's refresh: log it, keep the worker alive, retry
            metrics.REFRESH_ERRORS.inc()
            log.exception("refresh step failed; retrying")
        time.sleep(ERROR_BACKOFF_S)
        return 0

    def _refresh_queued(self, kind: Kind, limit: int, settled: int, *, counter_moves: bool = True) -> int:
        """Pop up to ``limit`` settled entities of ``kind`` and refresh them; the entities handled."""
        lease = self.store.pop_dirty(kind, limit, settled, counter_moves=counter_moves)
        return self.refresh_isolating(kind, lease) if lease.ids else 0

    def refresh_isolating(self, kind: Kind, lease: Lease, ids: Sequence[str] | None = None) -> int:
        """``refresh``, bisecting a batch that fails on its data so that one bad entity costs only
        itself (quarantined with the reason) and about log2(len(ids)) extra batches."""
        ids = lease.ids if ids is None else ids
        try:
            return self.refresh(kind, lease, ids)
        except (redis.RedisError, IndexUnavailable):
            raise
        except Exception as exc:
            if len(ids) > 1:
                mid = len(ids) // 2
                return self.refresh_isolating(kind, lease, ids[:mid]) + self.refresh_isolating(kind, lease, ids[mid:])
            reason = f"{type(exc).__name__}: {exc}"
            self.store.quarantine(kind, lease, {ids[0]: reason})
            metrics.QUARANTINED.labels(kind).inc()
            log.warning("quarantined", extra={"kind": kind, "id": ids[0], "reason": reason})
            return 1

    def _maintain_tables(self) -> None:
        if self.store.claim_percentile_refresh(self.settings.percentile_refresh_s):
            self._tables = self.store.refresh_percentile_tables()
            self._tables_loaded = time.monotonic()
            log.info("percentile tables refitted", extra={"items": max((t.n for t in self._tables.values()), default=0)})
        elif time.monotonic() - self._tables_loaded > TABLES_RELOAD_S:
            self._tables = self.store.percentile_tables()
            self._tables_loaded = time.monotonic()
        if time.monotonic() - self._buckets_checked > BUCKET_CHECK_S:
            self.store.check_buckets(limit=10 * self.settings.refresh_batch, tables=self._tables)
            self._buckets_checked = time.monotonic()

    def refresh(self, kind: Kind, lease: Lease, ids: Sequence[str] | None = None) -> int:
        """Encode and upsert (or delete) ``ids`` (default: the lease's), then acknowledge their dirty
        marks; those whose lease expired and was taken over meanwhile are queued again."""
        return self.write(kind, lease, self.encode(kind, lease.ids if ids is None else ids))

    def encode(self, kind: Kind, ids: Sequence[str]) -> Rendered:
        """Read the states of ``ids`` once (the text encoded, the updated_at and the version stored
        with it describe the same state) and encode those that have a text."""
        if kind == "items" and not self._tables:
            # No tables yet (no item when they were last fitted): fit them now that items exist. Not on
            # a timer: the fit scans the keyspace, and an idle worker would scan it every second.
            self._tables = self.store.percentile_tables() or self.store.refresh_percentile_tables()
        states: Sequence[Any] = self.store.items(ids) if kind == "items" else self.store.users(ids)
        live = [(i, st, text) for i, st, text in zip(ids, states, state_vectors.texts(kind, states, self.store, self._tables, self.encoder))
                if text is not None]
        vectors = np.zeros((0, self.settings.embedding_dim), dtype=np.float32)
        if live:
            started = time.perf_counter()
            texts = [text for _, _, text in live]
            if self.incremental is not None and (kind == "users" or self.settings.incremental_items):
                vectors = self.incremental.encode([f"{kind}:{i}" for i, _, _ in live], texts)
            else:
                vectors = self.encoder.encode(texts)
            metrics.ENCODE_SECONDS.labels(kind).observe(time.perf_counter() - started)
            metrics.ENCODE_BATCH.labels(kind).observe(len(live))
        return Rendered(ids=list(ids), live=[(i, st) for i, st, _ in live], vectors=vectors,
                        gone={i: st.version if st else 0 for i, st in zip(ids, states)
                              if st is None or getattr(st, "deleted", False)})

    def write(self, kind: Kind, lease: Lease, batch: Rendered) -> int:
        """Upsert and delete what ``batch`` holds, except where a vector of a newer state version was
        written meanwhile (counted, skipped), then acknowledge the batch's leases."""
        fresh = self.store.claim_writes(kind, self.version, {**{i: st.version for i, st in batch.live}, **batch.gone})
        rows = [n for n, (i, _) in enumerate(batch.live) if i in fresh]
        gone = [i for i in batch.gone if i in fresh]
        if stale := len(batch.live) + len(batch.gone) - len(fresh):
            STALE_WRITES.labels(kind).inc(stale)
            log.info("older renders not written", extra={"kind": kind, "skipped": stale})
        if rows:
            live = [batch.live[n][1] for n in rows]
            state_vectors.upsert(self.index, self.version, kind, live, batch.vectors[rows])
            now_ms = time.time() * 1000
            for st in live:
                if st.updated_ms >= 0:
                    metrics.FRESHNESS.labels(kind).observe(max(now_ms - st.updated_ms, 0) / 1000)
        state_vectors.delete(self.index, self.version, kind, gone)
        lost = self.store.ack_dirty(kind, lease, batch.ids)
        if lost:
            log.warning("leases expired mid-batch; queued again", extra={"kind": kind, "ids": lost[:10], "lost": len(lost)})
        metrics.ENCODED.labels(kind).inc(len(rows) + len(gone))
        log.debug("refreshed", extra={"kind": kind, "encoded": len(rows), "deleted": len(gone), "popped": len(batch.ids)})
        return len(batch.ids)
