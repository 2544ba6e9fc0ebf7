"""The stream worker (``onetower worker``): faust agents apply events to Redis; a refresher re-encodes.

Delivery is at-least-once and the effect exactly-once: an agent takes a batch of records from a
topic, applies the valid ones to Redis (each event one idempotent script, see ``streams.state``),
sends the invalid ones to the DLQ and waits for the broker's acknowledgement, and only then lets
faust acknowledge the batch, whose offsets are committed after that. Redis replies only after its
append-only file is fsynced (``appendfsync always``; the worker warns at start when the server says
otherwise), so a committed offset never covers an event a Redis crash can lose. A crash anywhere before the
commit replays the batch, and the replay changes nothing that was already applied (an event without
an id gets one derived from its record's coordinates). Failures of Redis are retried in place (the
batch is never acknowledged unapplied); a record that fails on its own goes to the DLQ with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import faust
import redis
from aiokafka.errors import IllegalStateError
from faust.types import EventT

from indexer.live_recall import LiveRecall, Probe, publish
from indexer.store import open_store
from indexer.vectors import IndexUnavailable
from core.settings import Settings
from streams import metrics
from streams.events import (DLQ_KIND, EVENT_TYPES, ORIGIN_HEADER, DeadLetter, EngagementEvent, Event, InvalidEvent, Origin,
                            parse_event)
from indexer.refresher import Refresher
from streams.state import StateStore, rejected
from streams.topics import ensure_topics

log = logging.getLogger("onetower.worker")

TAKE_MAX = 500  # records per agent batch: one Redis round trip
TAKE_WITHIN_S = 0.02  # longest wait to fill a batch
REDIS_RETRY_S = 0.5
LAG_EVERY_S = 5.0
REFRESHER_RETRY_S = 1.0
IDLE_SLEEP_S = 0.05  # refresher pause when nothing was dirty (bounds idle Redis polling)
LIVE_RECALL_PUBLISH_S = 15.0
LIVE_RECALL_BACKLOG = 64  # agent batches waiting to be scored; past it, samples are dropped (and counted)

T = TypeVar("T")


def app_id(settings: Settings) -> str:
    """The consumer group: workers with the same topic prefix split the partitions between them."""
    return f"onetower-worker-{settings.topic_prefix.rstrip('.') or 'default'}"


async def _finish(fut: Awaitable[T]) -> T:
    """Await ``fut`` to its end even if this task is cancelled meanwhile (a stop), then re-raise the
    cancellation: work that must not be cut in half (a batch, a micro-batch) completes first."""
    task = asyncio.ensure_future(fut)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


class EventApplier:
    """Applies one agent batch: parse, apply (retrying Redis), dead-letter what cannot be applied.

    Every record either changes the state (or is a recognised duplicate) or goes to the DLQ with its
    reason: an error of one record's own (invalid input, a script failing on its data, a bug) never
    stops the agent. Only Redis being unavailable stops progress, and then the batch is retried."""

    def __init__(self, store: StateStore, send_dlq: Callable[[bytes | None, bytes], Awaitable[Any]],
                 pool: ThreadPoolExecutor, scorer: LiveRecall | None = None) -> None:
        self.store = store
        self.send_dlq = send_dlq
        self.pool = pool
        self.scorer = scorer
        self._score_pool = ThreadPoolExecutor(1, thread_name_prefix="live-recall")
        self._backlog = threading.BoundedSemaphore(LIVE_RECALL_BACKLOG)

    async def handle(self, kind: str, records: Sequence[EventT]) -> None:
        valid: list[tuple[Event, EventT]] = []
        dead: list[tuple[EventT, str]] = []
        for rec in records:
            try:
                valid.append((parse_event(kind, rec.message.value, origin(rec.message)), rec))
            except InvalidEvent as exc:
                dead.append((rec, str(exc)))
            except Exception as exc:  # a parser bug costs one record, never the agent
                log.exception("parsing failed unexpectedly")
                dead.append((rec, f"parsing failed: {type(exc).__name__}: {exc}"))
        if valid:
            if self.scorer is not None and kind == EngagementEvent.kind:
                await self._score(self.scorer, [ev for ev, _ in valid if isinstance(ev, EngagementEvent)])
            results = await self._apply([ev for ev, _ in valid])
            for (ev, rec), res in zip(valid, results):
                if isinstance(res, Exception):
                    dead.append((rec, f"could not apply the event: {type(res).__name__}: {res}"))
                else:
                    metrics.EVENTS.labels(kind, "applied" if res else "duplicate").inc()
        for rec, reason in dead:
            msg = rec.message
            # A replayed record that fails again keeps its original coordinates: they give its id.
            letter = DeadLetter.of(*origin(msg), msg.key, msg.value, reason)
            await self.send_dlq(msg.key, letter.to_bytes())
            metrics.EVENTS.labels(kind, "invalid").inc()
            metrics.DLQ.labels(kind).inc()
            log.warning("dead-lettered", extra={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset,
                                                "reason": reason})

    async def _score(self, scorer: LiveRecall, events: list[EngagementEvent]) -> None:
        """Live recall: snapshot what serving saw before these events are applied, then rank off the
        event path. Nothing here fails the batch; a Milvus that hangs costs it one timeout, then scoring
        pauses (``LiveRecall.failed``)."""
        try:
            probes = await asyncio.get_running_loop().run_in_executor(self.pool, scorer.snapshot, events)
        except Exception as exc:
            scorer.failed(exc)
            return
        if not probes:
            return
        if not self._backlog.acquire(blocking=False):
            metrics.LIVE_RECALL_SKIPPED.labels("backlog").inc(len(probes))
            return
        self._score_pool.submit(self._rank, scorer, probes)

    def _rank(self, scorer: LiveRecall, probes: list[Probe]) -> None:
        try:
            scorer.score(probes)
        except Exception as exc:
            scorer.failed(exc)
        finally:
            self._backlog.release()

    async def _apply(self, events: list[Event]) -> list[bool | Exception]:
        """Apply in one round trip (an event its own data fails gets its error in its place); if the
        batch fails as a whole for a reason other than Redis, apply one by one to isolate the event."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                try:
                    return list(await loop.run_in_executor(self.pool, self.store.try_apply_many, events))
                except Exception as exc:
                    if _unavailable(exc):
                        raise
                    log.warning("batch failed; applying one by one", extra={"error": repr(exc), "events": len(events)})
                    return [await loop.run_in_executor(self.pool, self._apply_one, ev) for ev in events]
            except redis.RedisError as exc:  # Redis down, read-only, out of memory...: retry, unacknowledged
                metrics.REDIS_ERRORS.inc()
                log.warning("redis unavailable; retrying the batch", extra={"error": str(exc), "events": len(events)})
                await asyncio.sleep(REDIS_RETRY_S)

    def _apply_one(self, event: Event) -> bool | Exception:
        try:
            return self.store.try_apply_many([event])[0]
        except Exception as exc:
            if _unavailable(exc):
                raise
            return exc


def _unavailable(exc: Exception) -> bool:
    """Redis' own state (down, OOM, READONLY, BUSY, cluster moves): retrying will help. A script
    rejecting the event (``rejected``) or a command that cannot be encoded (DataError) will not."""
    return isinstance(exc, redis.RedisError) and not isinstance(exc, redis.DataError) and not rejected(exc)


def origin(message: Any) -> Origin:
    """The coordinates that identify a record without an event id: its own, or for a record replayed
    from the DLQ those of the original (a header), so a replay is applied at most once."""
    headers = dict(message.headers or {})
    found = Origin.from_header(headers[ORIGIN_HEADER]) if ORIGIN_HEADER in headers else None
    return found or Origin(message.topic, message.partition, message.offset)


def broker_credentials(settings: Settings) -> faust.auth.Credentials | None:
    """The Kafka security settings as faust (aiokafka) takes them: TLS with the CA file (or the
    system's), SASL with its mechanism; None for PLAINTEXT."""
    protocol = settings.kafka_security_protocol
    context = None
    if protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None)
    if protocol.startswith("SASL_"):
        return faust.SASLCredentials(username=settings.kafka_sasl_username, password=settings.kafka_sasl_password.get_secret_value(),
                                     mechanism=settings.kafka_sasl_mechanism, ssl_context=context)
    return faust.SSLCredentials(context) if context is not None else None


def build_app(settings: Settings, refresher: Refresher | None, store: StateStore | None = None) -> faust.App:
    """The faust app: one agent per event topic, a lag timer, and the refresher loop (when given)."""
    store = store or StateStore.from_settings(settings)
    datadir = tempfile.mkdtemp(prefix="onetower-faust-")  # memory store: faust keeps nothing of value here
    app = faust.App(
        app_id(settings),
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=broker_credentials(settings),
        store="memory://",
        datadir=datadir,
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=True,
    )
    dlq = app.topic(settings.topic(DLQ_KIND), key_serializer="raw", value_serializer="raw")

    async def send_dlq(key: bytes | None, value: bytes) -> None:
        fut = await dlq.send(key=key, value=value)
        await fut  # delivered before the source record may be acknowledged

    scorer = LiveRecall(settings, open_store(settings), store) if settings.live_recall_sample_rate > 0 else None
    applier = EventApplier(store, send_dlq, ThreadPoolExecutor(len(EVENT_TYPES), thread_name_prefix="apply"), scorer)

    def agent_for(kind: str) -> None:
        topic = app.topic(settings.topic(kind), key_serializer="raw", value_serializer="raw")

        async def consume(stream: faust.StreamT) -> None:
            async for records in stream.take_events(TAKE_MAX, within=TAKE_WITHIN_S):
                # faust acknowledges the batch when this body returns, even when a stop cancels it:
                # the shield keeps a stop from acknowledging a batch that is not applied (or not
                # dead-lettered) yet. With Redis down a stop waits; a kill then replays the batch.
                await _finish(applier.handle(kind, records))

        app.agent(topic, name=f"apply-{kind}")(consume)

    for kind in EVENT_TYPES:  # one agent per registered event kind
        agent_for(kind)

    reported: set[tuple[str, str]] = set()

    @app.timer(LAG_EVERY_S)
    async def report_lag() -> None:
        """Lag of the partitions this worker holds now (revoked ones leave the metric)."""
        consumer = app.consumer
        held: set[tuple[str, str]] = set()
        for tp in consumer.assignment():
            # Both are None for a partition still being assigned (a rebalance): report it next time. One
            # revoked meanwhile (a member joined or left) raises: it is no longer held. Left to raise, it
            # would crash this timer and with it the whole worker.
            try:
                position, highwater = await consumer.position(tp), consumer.highwater(tp)
            except (IllegalStateError, AssertionError):  # position's and highwater's "not assigned"
                continue
            if position is not None and highwater is not None:
                labels = (tp.topic, str(tp.partition))
                metrics.LAG.labels(*labels).set(max(highwater - position, 0))
                held.add(labels)
        for labels in reported - held:
            metrics.LAG.remove(*labels)
        reported.clear()
        reported.update(held)

    if scorer is not None:
        @app.timer(LIVE_RECALL_PUBLISH_S)
        async def report_live_recall() -> None:
            """The live recall gauges, from the windows every worker shares in Redis."""
            try:
                await asyncio.get_running_loop().run_in_executor(None, publish, store)
            except redis.RedisError as exc:
                log.warning("live recall figures not read", extra={"error": str(exc)})

    if refresher is not None:
        pool = ThreadPoolExecutor(1, thread_name_prefix="refresh")

        @app.task
        async def refresh_loop() -> None:
            loop = asyncio.get_running_loop()
            while True:  # Milvus or Redis down (or slow) at start: retry, never leave the worker without a refresher
                try:
                    await _finish(loop.run_in_executor(pool, refresher.start))
                    break
                except (IndexUnavailable, redis.RedisError) as exc:
                    log.warning("refresher cannot start yet; retrying", extra={"error": str(exc)})
                    await asyncio.sleep(REFRESHER_RETRY_S)
            log.info("refresher started", extra={"model_version": refresher.version})
            while True:
                done = await _finish(loop.run_in_executor(pool, refresher.run_once))
                if not done:
                    await asyncio.sleep(IDLE_SLEEP_S)

    return app


def warn_unless_durable(store: StateStore) -> None:
    """Offsets are committed once the scripts reply: say so when a reply may come before the fsync."""
    try:
        issue = store.durability_issue()
    except redis.RedisError as exc:  # Redis down at start: the agents retry; the check is advice only
        issue = f"could not be checked ({exc})"
    if issue:
        log.warning("a Redis crash may lose events whose offsets are committed: run Redis with appendonly yes and "
                    "appendfsync always", extra={"issue": issue})


def run_worker(settings: Settings, refresher: Refresher | None, loglevel: str = "info") -> None:
    """Run until SIGTERM/SIGINT: faust stops the agents after their current batch (applied and
    acknowledged), commits the offsets, and the refresher finishes its current micro-batch."""
    metrics.setup_logging(loglevel)
    ensure_topics(settings)
    port = metrics.serve(settings.worker_metrics_port)
    store = StateStore.from_settings(settings)
    warn_unless_durable(store)
    app = build_app(settings, refresher, store)
    log.info("worker starting", extra={"app_id": app.conf.id, "metrics_port": port, "topic_prefix": settings.topic_prefix,
                                      "redis_key_prefix": settings.redis_key_prefix, "redis_url": settings.redis_url_masked,
                                      "started": time.time()})
    worker = faust.Worker(app, loglevel=loglevel, override_logging=False, quiet=True)
    worker.execute_from_commandline()
