"""Point-in-time training data read from the same Kafka topics the stream workers consume.

For every engagement at event time t the example holds what serving would have held just before t.
The events are replayed through ``streams.rules.ReferenceState`` (the rules the stream workers apply
to Redis, in Python) and the texts are made by ``models.texts``, the functions serving uses, so
training and serving cannot drift apart: the user text is the profile and the capped history (one
entry per item) before t, the item texts carry counters as of each item's newest counter event,
written as percentile buckets through tables refitted once per event-time hour. Events are applied
in groups of equal timestamps *after* the group's examples are emitted, so nothing at or after t
reaches an example, its negatives included: hard negatives are the user's recent impressions before
t that the user had not engaged with, the most recent first; random negatives (when too few were
shown) are catalogue items the user had not engaged with before t. ``history`` lists the items the
user had engaged with before t (what retrieval excludes). Each example also carries ``logq``, the log
of its positive's share of the training window's engagements, for the sampling-bias correction of
in-batch negatives. With ``counter_dropout`` a share of the training split's item texts (positives
and negatives) carry a never-engaged item's counters instead of their own, so the tower does not learn
to rank cold items out by their counters alone; validation and test examples are never changed.

The result is split by time (train < validation < test) and cached as parquet under a fingerprint
of the topics, their offsets and the options, so a rebuild happens only when the data or the recipe
changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from core.errors import OnetowerError
from core.settings import Settings
from models.render import PROMPT_FORMAT_VERSION, Tokenizer
from models.texts import has_text, item_state_texts, user_state_texts
from streams.counters import hour_bucket
from streams.events import (EVENT_TYPES, ORIGIN_HEADER, EngagementEvent, Event, InvalidEvent, ItemEvent, Origin, kind_rank,
                            parse_event)
from streams.rules import ReferenceState, UserState
from streams.topics import KafkaUnavailable

log = logging.getLogger(__name__)

DATASET_FORMAT_VERSION = "4"  # bump when the example recipe below changes: old caches are then ignored
SPLITS = ("train", "val", "test")
STALL_S = 60  # seconds without a record, while partitions are short of their end offsets, before giving up
OLD_CACHE_DEFAULTS = {"history_block": 1, "counter_dropout": 0.0}  # options added later, at the value older caches hold


class DatasetError(OnetowerError):
    """The topics could not be read or hold nothing to train on; the message says why."""


class DatasetOptions(BaseModel):
    """Everything besides the topics' content that changes the examples (all of it is fingerprinted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hard_negatives: int = Field(default=2, ge=0, le=8, description="hard-negative columns per example")
    counts_mode: Literal["bucket", "raw"] = Field(default="bucket", description="counters as percentile buckets (paper) or raw counts (ablation)")
    history_len: int = Field(default=50, ge=1, description="positives kept per user, as serving's settings.history_len: "
                             "the history rendered into the user text")
    recent_impressions_len: int = Field(default=100, ge=1, description="recent impressions kept per user, as serving's "
                                        "settings.recent_impressions_len: where hard negatives come from")
    base_model: str = Field(default="minilm", description="its tokenizer fits the user text into max_seq_length")
    max_seq_length: int = Field(default=256, ge=16)
    history_block: int = Field(default=1, ge=1, description="entries the user history is trimmed by at max_seq_length "
                               "(models/render.py), as the served tower's manifest says")
    counter_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of training item texts (positives and "
                                   "hard negatives) written with the counters of a never-engaged item, so that a cold "
                                   "item's counters do not by themselves rule it out")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    since_ms: int | None = Field(default=None, description="first event time read from impressions/engagements")
    until_ms: int | None = Field(default=None, description="events at or after this time are not read")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "DatasetOptions":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave room for training (< 1)")
        if self.since_ms is not None and self.until_ms is not None and self.since_ms >= self.until_ms:
            raise ValueError("since_ms must be before until_ms")
        return self


@dataclass
class PointInTimeDataset:
    """The split examples plus the catalogue as it was at the start of the validation and test windows."""

    splits: dict[str, pa.Table]  # train / val / test examples, in event-time order
    catalogues: dict[str, pa.Table]  # val / test: item_id, text (counters as of the window start)
    meta: dict

    @property
    def directory(self) -> Path:
        return Path(self.meta["directory"])


# ---------------------------------------------------------------- reading the topics


def _consumer(settings: Settings) -> KafkaConsumer:
    try:
        return KafkaConsumer(**settings.kafka_client_config(), enable_auto_commit=False, group_id=None,
                             bootstrap_timeout_ms=10_000, request_timeout_ms=30_000, max_poll_records=5000,
                             fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
    except KafkaError:
        raise KafkaUnavailable(f"Kafka is unreachable at {settings.kafka_bootstrap} (is the stack up? `onetower stack up`)") from None


def _partitions(consumer: KafkaConsumer, settings: Settings) -> list[TopicPartition]:
    out = []
    for kind in EVENT_TYPES:
        topic = settings.topic(kind)
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise DatasetError(f"topic {topic} does not exist at {settings.kafka_bootstrap}; replay data first "
                               f"(`onetower dataset movielens --out DIR && onetower replay DIR`)")
        out += [TopicPartition(topic, p) for p in sorted(parts)]
    return out


def _offset_range(consumer: KafkaConsumer, parts: list[TopicPartition], options: DatasetOptions,
                  settings: Settings) -> dict[TopicPartition, tuple[int, int]]:
    """[start, end) per partition: end is fixed now, so records produced while reading are left out.

    Items and users are compacted state and always read from the beginning; impressions and
    engagements start at ``since_ms`` when one is given.
    """
    end = consumer.end_offsets(parts)
    start = consumer.beginning_offsets(parts)
    if options.since_ms is not None:
        events = [tp for tp in parts if tp.topic in (settings.topic("impressions"), settings.topic("engagements"))]
        for tp, found in consumer.offsets_for_times({tp: options.since_ms for tp in events}).items():
            start[tp] = found.offset if found is not None else end[tp]
    return {tp: (start[tp], end[tp]) for tp in parts}


@dataclass
class ReadStats:
    """What ``read_events`` skipped, per topic: invalid records (those the worker dead-letters for their
    content) and records whose event id was already read (the worker's idempotency applies those once)."""

    invalid: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)


def _origin(record: ConsumerRecord) -> Origin:
    """The coordinates that identify a record without an event id, as the worker takes them
    (``onetower.worker.origin``): a DLQ replay's original ones from its header, else its own."""
    header = dict(record.headers or ()).get(ORIGIN_HEADER)
    return Origin.from_header(header) or Origin(record.topic, record.partition, record.offset)


def read_events(settings: Settings, options: DatasetOptions, ranges: dict[TopicPartition, tuple[int, int]] | None = None,
                stats: ReadStats | None = None) -> Iterator[Event]:
    """Every valid event in the offset ranges, once per event id (per topic kind), judged as the worker
    judges it: an id missing from the record is derived from its coordinates, invalid records and
    repeated ids are skipped and counted in ``stats``."""
    stats = stats if stats is not None else ReadStats()
    seen: set[tuple[str, str]] = set()
    consumer = _consumer(settings)
    try:
        ranges = ranges or _offset_range(consumer, _partitions(consumer, settings), options, settings)
        todo = {tp: r for tp, r in ranges.items() if r[1] > r[0]}
        kind_of = {settings.topic(k): k for k in EVENT_TYPES}
        consumer.assign(list(todo))
        for tp, (begin, _) in todo.items():
            consumer.seek(tp, begin)
        last_progress = time.monotonic()
        while todo:
            batch = consumer.poll(timeout_ms=1000)
            if batch:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_S:
                raise KafkaUnavailable(f"no records from {settings.kafka_bootstrap} for {STALL_S}s with "
                                       f"{len(todo)} partition(s) still short of their end offsets")
            for tp, records in batch.items():
                stop = todo.get(tp, (0, -1))[1]
                for record in records:
                    if record.offset >= stop:
                        break
                    if options.until_ms is not None and record.timestamp >= options.until_ms:
                        continue
                    try:
                        event = parse_event(kind_of[tp.topic], record.value, _origin(record))
                    except InvalidEvent:
                        stats.invalid[tp.topic] += 1
                        continue
                    if (event.kind, event.key, event.event_id) in seen:  # ids are per key, as serving claims them
                        stats.duplicates[tp.topic] += 1
                        continue
                    seen.add((event.kind, event.key, event.event_id))
                    yield event
                if tp in todo and consumer.position(tp) >= stop:
                    del todo[tp]
                    consumer.pause(tp)
        for topic, n in sorted(stats.invalid.items()):
            log.warning("skipped %d invalid records of %s", n, topic)
    except KafkaError as exc:
        raise KafkaUnavailable(f"reading topics from {settings.kafka_bootstrap} failed: {exc}") from None
    finally:
        consumer.close()


# ---------------------------------------------------------------- building the examples


def _time_key(event: Event) -> tuple[int, int, str]:
    """Event time, then the application order of kinds, then id: partitions interleave arbitrarily, the examples must not."""
    return event.ts_ms, kind_rank(event.kind), event.event_id


class _Refits:
    """Refits the state's percentile tables once per event-time hour (serving refits periodically too)."""

    def __init__(self, state: ReferenceState, counts_mode: str) -> None:
        self.state = state
        self.enabled = counts_mode == "bucket"
        self.hour: int | None = None

    def at(self, now_ms: int) -> None:
        hour = hour_bucket(now_ms)
        if self.enabled and hour != self.hour:
            self.state.refresh_percentile_tables()
            self.hour = hour


def _catalogue(state: ReferenceState) -> list[str]:
    """The items that have a text (serving's index holds these), in id order."""
    ids = list(state.item_ids())
    return sorted((st.item_id for st in state.items(ids) if has_text(st)), key=_id_order)


def build_examples(events: list[Event], options: DatasetOptions, tokenizer: Tokenizer) -> PointInTimeDataset:
    """Point-in-time examples from events (any order; they are sorted by event time here)."""
    events = sorted(events, key=_time_key)
    engagements = [e for e in events if isinstance(e, EngagementEvent)]
    if not engagements:
        raise DatasetError("no engagement events in the topics (or in the chosen time range): nothing to train on")

    times = np.array([e.ts_ms for e in engagements])
    t_val = int(np.quantile(times, 1.0 - options.val_fraction - options.test_fraction, method="inverted_cdf"))
    t_test = int(np.quantile(times, 1.0 - options.test_fraction, method="inverted_cdf"))
    boundaries = {"val": t_val, "test": t_test}

    rng = np.random.default_rng(options.seed)
    dropout_rng = np.random.default_rng([options.seed, 1])  # its own stream: the other draws do not move with counter_dropout
    state = ReferenceState(options.history_len, options.recent_impressions_len)
    refits = _Refits(state, options.counts_mode)
    catalogue: list[str] = []
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    catalogues: dict[str, pa.Table] = {}
    skipped = 0
    i = 0
    progress = tqdm(total=len(events), desc="point-in-time examples", unit="event", mininterval=5)
    while i < len(events):
        t = events[i].ts_ms
        j = i
        while j < len(events) and events[j].ts_ms == t:
            j += 1
        progress.update(j - i)
        for split, boundary in boundaries.items():  # catalogue snapshot as the index would hold it at the window start
            if split not in catalogues and t >= boundary:
                refits.at(boundary)
                catalogues[split] = _catalogue_table(state, catalogue, options)
        group = [e for e in events[i:j] if isinstance(e, EngagementEvent)]
        if group:
            refits.at(t)
        split = "test" if t >= t_test else "val" if t >= t_val else "train"
        for e in group:  # examples see the state before this timestamp only
            cold = dropout_rng.random(1 + options.hard_negatives) < options.counter_dropout if split == "train" else None
            row = _example(e, state, catalogue, options, tokenizer, rng, cold)
            if row is None:
                skipped += 1
                continue
            rows[split].append(row)
        for e in events[i:j]:
            state.apply(e)
        if any(isinstance(e, ItemEvent) for e in events[i:j]):
            catalogue = _catalogue(state)
        i = j
    progress.close()
    for split, boundary in boundaries.items():
        if split not in catalogues:
            refits.at(boundary)
            catalogues[split] = _catalogue_table(state, catalogue, options)
    if skipped:
        log.warning("skipped %d engagements with items that had no text (unknown or deleted) at the time", skipped)
    if not rows["train"]:
        raise DatasetError("the time split left no training examples; lower val_fraction/test_fraction")
    _add_logq(rows)
    meta = {"t_val_ms": t_val, "t_test_ms": t_test, "skipped": skipped,
            "train_range_ms": [rows["train"][0]["ts_ms"], rows["train"][-1]["ts_ms"]],
            "counts": {s: len(r) for s, r in rows.items()}}
    return PointInTimeDataset({s: _to_table(r, options.hard_negatives) for s, r in rows.items()}, catalogues, meta)


def _id_order(item_id: str) -> tuple[int, str]:
    return (0, f"{int(item_id):020d}") if item_id.isdigit() else (1, item_id)


def _item_texts(state: ReferenceState, ids: list[str], options: DatasetOptions, cold: list[bool] | None = None) -> list[str | None]:
    """Item texts as of now; ``cold`` marks those written with the counters of a never-engaged item (all zero)."""
    states = state.items(ids)
    if cold is not None:
        states = [replace(st, counters=dict.fromkeys(st.counters, 0)) if st is not None and c else st for st, c in zip(states, cold)]
    return item_state_texts(states, state.percentile_tables(), options.counts_mode)


def _catalogue_table(state: ReferenceState, catalogue: list[str], options: DatasetOptions) -> pa.Table:
    return pa.table({"item_id": catalogue, "text": _item_texts(state, catalogue, options)})


def _example(e: EngagementEvent, state: ReferenceState, catalogue: list[str], options: DatasetOptions,
             tokenizer: Tokenizer, rng: np.random.Generator, cold: np.ndarray | None = None) -> dict | None:
    """One engagement as serving saw it just before t: the user text, the positive, negatives known
    before t (``cold``: which of the positive and negatives to write with a never-engaged item's
    counters). None when the positive had no text then (unknown or deleted item)."""
    cold = list(cold) if cold is not None else [False] * (1 + options.hard_negatives)
    (positive,) = _item_texts(state, [e.item_id], options, cold[:1])
    if positive is None:
        return None
    user = state.users([e.user_id])[0] or UserState(e.user_id, {}, [], -1)  # no state yet: the empty user text
    (query,) = user_state_texts(state, [user], tokenizer=tokenizer, max_tokens=options.max_seq_length,
                                history_block=options.history_block)
    engaged = state.engaged_items(e.user_id)
    excluded = engaged | {e.item_id}
    shown = (h.item_id for h in reversed(state.recent_impressions(e.user_id)) if h.item_id not in excluded)  # most recent first
    negatives = [st.item_id for st in islice((st for x in shown for st in state.items([x]) if has_text(st)), options.hard_negatives)]
    n_hard = len(negatives)
    if n_hard < options.hard_negatives:  # too few shown-but-skipped items: random items the user had not engaged with
        pool = [x for x in catalogue if x not in excluded and x not in negatives]
        if len(pool) < options.hard_negatives - n_hard:
            raise DatasetError(f"the catalogue has too few items for {options.hard_negatives} negatives per example")
        negatives += [str(x) for x in rng.choice(pool, options.hard_negatives - n_hard, replace=False)]
    row = {"ts_ms": e.ts_ms, "user_id": e.user_id, "item_id": e.item_id, "query": query, "positive": positive,
           "history": sorted(engaged, key=_id_order), "n_hard": n_hard, "negative_ids": negatives}
    for n, text in enumerate(_item_texts(state, negatives, options, cold[1:]), 1):
        row[f"negative_{n}"] = text
    return row


def _add_logq(rows: dict[str, list[dict]]) -> None:
    """``logq`` = log of the positive's share of training engagements, on every row (validation and test
    rows reuse the training frequencies; items unseen in training get the rarest training item's)."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows["train"]:
        counts[r["item_id"]] += 1
    total = max(sum(counts.values()), 1)
    floor = np.log(min(counts.values(), default=1) / total)
    for split_rows in rows.values():
        for r in split_rows:
            r["logq"] = float(np.log(counts[r["item_id"]] / total)) if r["item_id"] in counts else float(floor)


def _to_table(rows: list[dict], hard_negatives: int) -> pa.Table:
    names = ["ts_ms", "user_id", "item_id", "query", "positive", *(f"negative_{n}" for n in range(1, hard_negatives + 1)),
             "n_hard", "negative_ids", "history", "logq"]
    types = {"ts_ms": pa.int64(), "n_hard": pa.int32(), "negative_ids": pa.list_(pa.string()),
             "history": pa.list_(pa.string()), "logq": pa.float64()}
    return pa.table({n: pa.array([r[n] for r in rows], type=types.get(n, pa.string())) for n in names})


# ---------------------------------------------------------------- cache


def fingerprint(ranges: dict[TopicPartition, tuple[int, int]], options: DatasetOptions) -> str:
    """A digest of what the examples depend on: topic offsets, options, prompt and recipe versions."""
    payload = {
        "offsets": sorted([tp.topic, tp.partition, *r] for tp, r in ranges.items()),
        # defaults that render what datasets built before these fields existed hold: their caches stay valid
        "options": options.model_dump(mode="json", exclude={k for k, v in OLD_CACHE_DEFAULTS.items() if getattr(options, k) == v}),
        "prompt_format": PROMPT_FORMAT_VERSION,
        "dataset_format": DATASET_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_or_build(settings: Settings, options: DatasetOptions, *, cache_dir: Path | None = None) -> PointInTimeDataset:
    """The dataset for the topics as they are now: from the cache when its fingerprint matches, else built."""
    from models.tower import build_tower

    consumer = _consumer(settings)
    try:
        ranges = _offset_range(consumer, _partitions(consumer, settings), options, settings)
    finally:
        consumer.close()
    digest = fingerprint(ranges, options)
    root = (cache_dir or settings.cache_dir / "datasets") / digest
    if (root / "meta.json").is_file():
        return load_prepared(root)
    stats = ReadStats()
    events = list(read_events(settings, options, ranges, stats))
    tokenizer = build_tower(options.base_model, max_seq_length=options.max_seq_length).tokenizer
    data = build_examples(events, options, tokenizer)
    data.meta.update({"fingerprint": digest, "options": options.model_dump(mode="json"),
                      "topics": [settings.topic(k) for k in EVENT_TYPES], "events": len(events),
                      "invalid_records": {settings.topic(k): stats.invalid[settings.topic(k)] for k in EVENT_TYPES},
                      "duplicate_records": {settings.topic(k): stats.duplicates[settings.topic(k)] for k in EVENT_TYPES}})
    tmp = root.with_name(f".{digest}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split, table in data.splits.items():
        pq.write_table(table, tmp / f"{split}.parquet")
    for split, table in data.catalogues.items():
        pq.write_table(table, tmp / f"catalogue_{split}.parquet")
    (tmp / "meta.json").write_text(json.dumps(data.meta, indent=2))
    if root.exists():  # a concurrent builder finished first: its files are identical
        shutil.rmtree(tmp)
    else:
        tmp.replace(root)
    return load_prepared(root)


def load_prepared(root: Path) -> PointInTimeDataset:
    """A dataset directory written by ``load_or_build`` (``onetower train --prepare-only``), e.g. copied to a
    GPU machine that cannot reach the topics."""
    if not (Path(root) / "meta.json").is_file():
        raise DatasetError(f"{root} is not a prepared dataset (no meta.json); make one with `onetower train --prepare-only`")
    meta = json.loads((root / "meta.json").read_text())
    meta["directory"] = str(root)
    return PointInTimeDataset({s: pq.read_table(root / f"{s}.parquet") for s in SPLITS},
                              {s: pq.read_table(root / f"catalogue_{s}.parquet") for s in ("val", "test")}, meta)
