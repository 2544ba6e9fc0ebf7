"""Blue/green re-index of every item and user into a new model version's collections.

Steps (each recorded in the version's metadata record, so a restart knows where it stands):

1. ``building``: finish any interrupted alias swap; drop abandoned builds of other versions and a
   previous version past its grace period; create the new collections.
2. Sync items and users into them: every entity whose stored ``updated_at`` differs from its state
   is (re-)encoded, every stored id that left the state is deleted. A first pass writes everything;
   a restarted build writes only what is missing or changed (it resumes); a second pass catches the
   changes that streamed in during the first.
3. Check: stored counts equal what the last pass saw, and a sample of stored vectors equals a fresh
   encoding of the same texts. Flush and wait for the HNSW index, mark ``ready``.
With ``live_recall_gate`` N > 0, between 3 and 4 the workers' shadow scoring must show the new
version's live recall@10 not below the active one's on N engagements scored in both (waiting up to
``live_recall_wait_s``); otherwise the version stays ``ready`` and the aliases stay.

4. Swap both aliases (``VectorStore.activate``: intent recorded first, rolled forward after a crash),
   sync once more (changes between step 2 and the swap), mark ``active``. The old version stays as
   the previous one for ``onetower rollback`` until ``reindex_grace_s`` has passed.

Items come from Redis state, or from the compacted items topic (read to its end offsets) when Redis
holds no items. One re-index at a time per Milvus prefix.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from core.errors import OnetowerError
from core.settings import Settings
from indexer import state_vectors
from indexer.state_vectors import entity_id, fields
from indexer.store import open_store
from indexer.vectors import VectorStore, VersionError
from models.encoder import Encoder
from streams.events import InvalidEvent, ItemEvent, parse_event
from streams.state import ItemState, Kind, StateStore

SAMPLE_MIN_COSINE = 0.99  # a stored vector against a fresh encoding of the same text (fp32 ONNX: ~1.0)
INDEX_WAIT_S = 1800.0


class ReindexError(OnetowerError):
    """The re-index cannot start or its checks failed; the aliases were not moved."""


@dataclass
class ReindexReport:
    """What a re-index did."""

    version: str
    previous: str | None
    items: int
    users: int
    resumed: bool
    item_source: str  # "redis" or "kafka"
    indexed: bool  # the HNSW index covered every row before the swap
    dropped: list[str] = field(default_factory=list)
    live_recall: str | None = None  # the promotion check's figures, when one was required


def latest_items(settings: Settings, poll_ms: int = 1000) -> dict[str, ItemEvent]:
    """The newest event per item on the compacted items topic, read to its end offsets; deleted items
    are left out, as are records that fail validation (the stream workers dead-letter those)."""
    from kafka import KafkaConsumer, TopicPartition

    topic = settings.topic("items")
    consumer = KafkaConsumer(**settings.kafka_client_config(), enable_auto_commit=False, group_id=None,
                             client_id="onetower-reindex")
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return {}
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        latest: dict[str, ItemEvent] = {}
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            for records in consumer.poll(timeout_ms=poll_ms).values():
                for record in records:
                    try:
                        event = parse_event("items", record.value)
                    except InvalidEvent:
                        continue
                    if event.item_id not in latest or event.ts >= latest[event.item_id].ts:
                        latest[event.item_id] = event
        return {item_id: ev for item_id, ev in latest.items() if not ev.deleted}
    finally:
        consumer.close()


@dataclass
class _Kind:
    """One kind of entity to index: its ids, how to read their states, texts and scalar fields."""

    name: Kind
    ids: Callable[[], list[str]]
    states: Callable[[Sequence[str]], list[Any]]
    texts: Callable[[Sequence[Any]], list[str | None]]
    sample: dict[str, str] = field(default_factory=dict)  # a reservoir of (id -> text) for the check
    written: int = 0  # entities encoded and upserted so far
    seen: int = 0  # entities with a text in the last pass (what the collection must hold)


class Reindexer:
    """Builds, checks and activates one model version; see the module docstring."""

    def __init__(self, settings: Settings, encoder: Encoder, *, index: VectorStore | None = None,
                 store: StateStore | None = None, show_progress: bool = False) -> None:
        if encoder.dim != settings.embedding_dim:
            raise ReindexError(f"the model writes {encoder.dim}-d vectors; the index holds {settings.embedding_dim}-d")
        self.settings = settings
        self.encoder = encoder
        self.version = encoder.version
        self.index = index or open_store(settings)
        self.store = store or StateStore.from_settings(settings)
        self.show_progress = show_progress
        self._rng = random.Random(0)
        self.gate_figures: str | None = None

    def run(self, model_dir: Path, *, restart: bool = False, live_recall_gate: int = 0,
            live_recall_wait_s: float = 900.0) -> ReindexReport:
        index, version = self.index, self.version
        index.recover()
        if index.active_version() == version:
            raise ReindexError(f"version {version} is already active; the stream refresher keeps it fresh")
        resumed = bool(index.version_info(version)) and index.has_version(version) and not restart
        if not resumed:
            index.drop_version(version)
            index.record_version(version, state="building", model_dir=str(model_dir.resolve()),
                                        started_ms=int(time.time() * 1000))
        dropped = index.collect_garbage(self.settings.reindex_grace_s, keep=[version])
        index.ensure_version(version)

        items, source = self._items()
        users = _Kind("users", lambda: list(dict.fromkeys(self.store.user_ids())), self.store.users,
                      lambda states: state_vectors.texts("users", states, self.store, {}, self.encoder))
        for _ in range(2):  # the second pass catches what streamed in during the first
            self._sync(items)
            self._sync(users)
        if items.seen == 0:
            raise ReindexError("no items to index: Redis holds no item state and the items topic is empty")
        for kind in (items, users):
            self._check(kind)
        index.flush(version)
        indexed = index.wait_indexed(version, INDEX_WAIT_S)
        index.record_version(version, state="ready", items=items.seen, users=users.seen)

        previous = index.active_version()
        if live_recall_gate > 0 and previous is not None:
            self._gate(previous, live_recall_gate, live_recall_wait_s)
        index.activate(version)
        self._sync(items)  # what changed between the last pass and the swap
        self._sync(users)
        index.record_version(version, state="active", activated_ms=int(time.time() * 1000),
                             items=items.seen, users=users.seen)
        dropped += index.collect_garbage(self.settings.reindex_grace_s)
        return ReindexReport(version=version, previous=previous, items=items.seen, users=users.seen,
                             resumed=resumed, item_source=source, indexed=indexed, dropped=dropped,
                             live_recall=self.gate_figures)

    def _gate(self, active: str, n: int, wait_s: float) -> None:
        """Refuse the swap unless live recall says the new version is not worse (see the module docstring)."""
        from indexer.live_recall import promotion_check

        result = promotion_check(self.store, self.version, active, n, wait_s)
        figures = (f"live recall@{result.k} {result.candidate_recall:.3f} ({self.version}) vs {result.active_recall:.3f} "
                   f"({active}) on {result.engagements} engagements")
        if result.engagements < n:
            raise ReindexError(f"not promoted: only {result.engagements} of {n} engagements scored in both versions "
                               f"within {wait_s:.0f}s ({figures}); {self.version} stays ready")
        if not result.passed:
            raise ReindexError(f"not promoted: {figures}; {self.version} stays ready")
        self.gate_figures = figures

    def _items(self) -> tuple[_Kind, str]:
        """Items from Redis, or from the items topic when Redis holds none."""
        tables = self.store.percentile_tables()
        texts = lambda states: state_vectors.texts("items", states, self.store, tables, self.encoder)  # noqa: E731
        if next(iter(self.store.item_ids()), None) is not None:
            return _Kind("items", lambda: list(dict.fromkeys(self.store.item_ids())), self.store.items, texts), "redis"
        events = latest_items(self.settings)
        states = {i: ItemState(i, dict(ev.features), {}, False, ev.ts_ms) for i, ev in events.items()}
        return _Kind("items", lambda: list(states), lambda ids: [states.get(i) for i in ids], texts), "kafka"

    def _sync(self, kind: _Kind) -> None:
        """Write what differs between the state and the version's collection; see step 2."""
        stored = self.index.stored(kind.name, self.version)
        ids = kind.ids()
        live: set[str] = set()
        with self._progress() as progress:
            task = progress.add_task(f"{kind.name} {self.version}", total=len(ids))
            for start in range(0, len(ids), self.settings.reindex_batch):
                batch = ids[start:start + self.settings.reindex_batch]
                states = kind.states(batch)
                rows = [(st, text) for st, text in zip(states, kind.texts(states)) if text is not None]
                live.update(entity_id(st) for st, _ in rows)
                fresh = [(st, text) for st, text in rows if stored.get(entity_id(st)) != fields(st)["updated_at"]]
                if fresh:  # as the refresher: a newer vector is not replaced, and live recall reads a vector's lag
                    claimed = self.store.claim_writes(kind.name, self.version, {entity_id(st): st.version for st, _ in fresh})
                    fresh = [(st, text) for st, text in fresh if entity_id(st) in claimed]
                if fresh:
                    vectors = self.encoder.encode([text for _, text in fresh])
                    state_vectors.upsert(self.index, self.version, kind.name, [st for st, _ in fresh], vectors)
                    for st, text in fresh:
                        self._keep_sample(kind, entity_id(st), text)
                progress.advance(task, len(batch))
        gone = [i for i in stored if i not in live]
        state_vectors.delete(self.index, self.version, kind.name, gone)
        for i in gone:
            kind.sample.pop(i, None)
        kind.seen = len(live)

    def _keep_sample(self, kind: _Kind, id_: str, text: str) -> None:
        """Reservoir-sample the texts written (uniform over all writes), for the check."""
        kind.written += 1
        if id_ in kind.sample or len(kind.sample) < self.settings.reindex_sample:
            kind.sample[id_] = text
        elif self._rng.random() < self.settings.reindex_sample / kind.written:
            kind.sample.pop(self._rng.choice(list(kind.sample)))
            kind.sample[id_] = text

    def _check(self, kind: _Kind) -> None:
        """Counts equal what the last pass saw; sampled stored vectors equal a fresh encoding."""
        stored = self.index.count(kind.name, self.version)
        if stored != kind.seen:
            raise ReindexError(f"{kind.name}: {stored} vectors stored in version {self.version}, {kind.seen} expected")
        if not kind.sample:
            return
        ids = list(kind.sample)
        fresh = self.encoder.encode([kind.sample[i] for i in ids])
        got = self.index.get_vectors(kind.name, self.version, ids, strong=True)
        missing = [i for i in ids if i not in got]
        if missing:
            raise ReindexError(f"{kind.name}: {len(missing)} sampled vectors missing from version {self.version}, e.g. {missing[0]!r}")
        cosines = np.array([float(np.dot(got[i], f)) for i, f in zip(ids, fresh)])
        if cosines.min() < SAMPLE_MIN_COSINE:
            worst = ids[int(cosines.argmin())]
            raise ReindexError(f"{kind.name}: stored vector of {worst!r} differs from a fresh encoding "
                               f"(cosine {cosines.min():.4f} < {SAMPLE_MIN_COSINE})")

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        disable=not self.show_progress, transient=False)


def reindex(settings: Settings, model_dir: Path, *, restart: bool = False, show_progress: bool = False,
            live_recall_gate: int = 0, live_recall_wait_s: float = 900.0) -> ReindexReport:
    """Re-index every item and user with the model in ``model_dir`` and activate it (module docstring)."""
    from models.errors import ModelError

    try:
        encoder = Encoder.load(model_dir)
    except ModelError as exc:
        raise ReindexError(str(exc)) from None
    return Reindexer(settings, encoder, show_progress=show_progress).run(
        model_dir, restart=restart, live_recall_gate=live_recall_gate, live_recall_wait_s=live_recall_wait_s)


def rollback(settings: Settings) -> tuple[str, str | None]:
    """Re-activate the previous version; returns (now active, now previous)."""
    index = open_store(settings)
    try:
        active = index.rollback()
    except VersionError as exc:
        raise ReindexError(str(exc)) from None
    return active, index.previous_version()

