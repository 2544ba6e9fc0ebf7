"""End to end through real worker processes (``onetower worker``) on the real Kafka, Redis and Milvus.

Workers run as subprocesses so that SIGKILL is real. Everything is polled with generous timeouts;
nothing asserts on timings.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import pytest
import requests
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from pymilvus.exceptions import MilvusException

from indexer.milvus import MilvusStore
from indexer.vectors import IndexUnavailable
from onetower.prefixes import purge
from core.settings import Settings
from streams.events import DeadLetter, EngagementEvent, Event, ImpressionEvent, ItemEvent, UserEvent
from streams.producer import EventProducer
from streams.state import StateStore
from onetower.prefixes import isolated as unique_settings

pytestmark = [pytest.mark.stack, pytest.mark.slow]

T = TypeVar("T")
POLL_S = 240.0


def poll(what: str, check: Callable[[], T | None], timeout: float = POLL_S) -> T:
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout``.
    Milvus being briefly unable to answer (a collection still loading) counts as not yet."""
    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while True:
        try:
            got = check()
        except (IndexUnavailable, MilvusException) as exc:
            got, error = None, exc
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (f" (Milvus, last time it failed: {error})" if error else ""))
        time.sleep(0.5)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA tower exported as an ONNX artifact (fast to load and encode)."""
    from models.export import export_artifact
    from models.testing import tiny_llama
    from models.tower import build_tower

    root = tmp_path_factory.mktemp("tiny")
    base = tiny_llama(root / "llama")
    export_artifact(build_tower(str(base), max_seq_length=128), root / "artifact", base_model=str(base), version="tiny_streams")
    return root / "artifact"


def onetower_env(settings: Settings) -> dict[str, str]:
    """The environment that gives an ``onetower`` subprocess these settings."""
    return {**os.environ, "ONETOWER_TOPIC_PREFIX": settings.topic_prefix, "ONETOWER_REDIS_KEY_PREFIX": settings.redis_key_prefix,
            "ONETOWER_MILVUS_PREFIX": settings.milvus_prefix, "ONETOWER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "ONETOWER_REDIS_URL": settings.redis_url, "ONETOWER_REDIS_CLUSTER": str(settings.redis_cluster),
            "ONETOWER_MILVUS_URI": settings.milvus_uri,
            "ONETOWER_WORKER_METRICS_PORT": "0", "ONETOWER_REFRESH_LEASE_S": str(settings.refresh_lease_s),
            "ONETOWER_REFRESH_DEBOUNCE_S": str(settings.refresh_debounce_s),
            "ONETOWER_TOPIC_PARTITIONS": str(settings.topic_partitions), "COLUMNS": "400"}


def onetower(settings: Settings, *args: str) -> str:
    """Run an ``onetower`` command with these settings; returns its output (fails the test if it fails)."""
    done = subprocess.run([sys.executable, "-c", "from onetower.cli import app; app()", *args], env=onetower_env(settings),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


class Worker:
    """One ``onetower worker`` subprocess with its log and its metrics endpoint."""

    def __init__(self, settings: Settings, model: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", "from onetower.cli import app; app()", "worker", "--model", str(model)],
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT, env=onetower_env(settings))
        self.port = poll(f"worker metrics port in {log}", self._port, timeout=120)

    def _port(self) -> int | None:
        assert self.proc.poll() is None, f"worker exited early:\n{self.log.read_text()[-3000:]}"
        found = re.findall(r'"metrics_port": (\d+)', self.log.read_text())
        return int(found[-1]) if found else None

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        for attempt in range(5):  # the worker is busy on 2 cores: a scrape may be refused now and then
            try:
                text = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
                break
            except requests.ConnectionError:
                if attempt == 4:
                    raise
                time.sleep(1)
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def events(self, outcome: str) -> float:
        return sum(v for (name, labels), v in self.metrics().items()
                   if name == "onetower_events_total" and ("outcome", outcome) in labels)

    def partitions(self) -> set[tuple[str, str]]:
        return {(dict(labels)["topic"], dict(labels)["partition"])
                for (name, labels) in self.metrics() if name == "onetower_consumer_lag"}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=120)


@pytest.fixture()
def wsettings(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Settings]:
    """Per-test settings with short leases and debounce (on the private Redis Cluster when parametrized
    ``cluster``); drops the test's keys, topics and collections after."""
    if getattr(request, "param", "standalone") == "cluster":
        settings = settings.model_copy(update={"redis_url": request.getfixturevalue("redis_cluster").redis_url, "redis_cluster": True})
    s = settings.model_copy(update={"refresh_lease_s": 3.0, "refresh_debounce_s": 0.2})
    yield s
    purge(s)


@pytest.fixture()
def workers(wsettings: Settings, tiny_model: Path, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    started: list[Worker] = []

    def start() -> Worker:
        w = Worker(wsettings, tiny_model, tmp_path / f"worker{len(started)}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL)


def now(offset_s: float = 0.0) -> datetime:
    return datetime.now(timezone.utc) + timedelta(seconds=offset_s)


def catalogue(n_items: int, n_users: int) -> list[Event]:
    return ([ItemEvent(item_id=f"m{i}", features={"title": f"Movie {i}", "genres": random.Random(i).choice(["crime", "comedy", "drama"])},
                       ts=now(-60)) for i in range(n_items)]
            + [UserEvent(user_id=f"u{u}", features={"age": 20 + u, "occupation": "writer"}, ts=now(-60)) for u in range(n_users)])


def activity(n: int, n_items: int, n_users: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    out: list[Event] = []
    for k in range(n):
        user, item, ts = f"u{rng.randrange(n_users)}", f"m{rng.randrange(n_items)}", now(-30 + k / n)
        out.append(ImpressionEvent(user_id=user, item_id=item, ts=ts))
        if rng.random() < 0.4:
            out.append(EngagementEvent(user_id=user, item_id=item, ts=ts))
    return out


def quiescent(store: StateStore, applied: Callable[[], float], expected: int) -> bool:
    """Every event applied and every dirty entity re-encoded."""
    return (applied() >= expected and store.dirty_count("users") == 0 and store.dirty_count("items") == 0
            and store.unchecked_count() == 0)


def semantic_state(store: StateStore, users: Sequence[str], items: Sequence[str]) -> tuple:
    return (store.users(users), store.items(items), [store.engaged_items(u) for u in users])


def vectors_reflect_state(index: MilvusStore, store: StateStore, version: str, users: Sequence[str], items: Sequence[str]) -> bool:
    """Every user's vector carries its state's latest event time; every item's vector is at least as new
    as its features (counter events re-encode an item only when its bucket moves)."""
    def rows(kind: str, ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        found = index.client.query(index.collection(kind, version), ids=list(ids), output_fields=["updated_at", "model_version"],
                                   consistency_level="Strong")
        return {r["id"]: (r["updated_at"], r["model_version"]) for r in found}

    if rows("users", users) != {st.user_id: (st.updated_ms, version) for st in store.users(users)}:
        return False
    got = rows("items", items)
    features_ms = [int(store.r.hget(store._i(i, "m"), "fts")) for i in items]
    return all(i in got and got[i][1] == version and got[i][0] >= fts for i, fts in zip(items, features_ms))


def reference_state(settings: Settings, events: Sequence[Event], users: Sequence[str], items: Sequence[str]) -> tuple:
    """The state of the same events applied once each by a single in-process writer (a fresh prefix)."""
    ref = StateStore.from_settings(unique_settings(settings))
    try:
        ref.apply_many(list(events))
        return semantic_state(ref, users, items)
    finally:
        ref.clear()


@pytest.mark.parametrize("wsettings", ["standalone", "cluster"], indirect=True)
def test_engagements_move_vectors_replays_change_nothing_and_bad_records_go_to_the_dlq(
        wsettings: Settings, workers: Callable[[], Worker]) -> None:
    store, index = StateStore.from_settings(wsettings), MilvusStore(wsettings)
    w = workers()
    version = "tiny_streams"
    first = catalogue(4, 2) + [EngagementEvent(user_id="u0", item_id="m0", ts=now(-10))]
    with EventProducer(wsettings) as producer:
        producer.send_many(first)
    poll("u0's first vector", lambda: index.has_version(version) and index.get_vectors("users", version, ["u0"], strong=True))
    v1 = index.get_vectors("users", version, ["u0"], strong=True)["u0"]

    # Malformed records go to the DLQ with a reason; the valid engagement after them moves u0's vector.
    raw = KafkaProducer(bootstrap_servers=wsettings.kafka_bootstrap, acks="all")
    raw.send(wsettings.topic("engagements"), key=b"u0", value=b"{not json")
    raw.send(wsettings.topic("engagements"), key=b"u0", value=json.dumps({"user_id": "u0"}).encode())
    raw.flush()
    raw.close()
    later = [EngagementEvent(user_id="u0", item_id="m2", ts=now(-5))]
    with EventProducer(wsettings) as producer:
        producer.send_many(later)
    poll("u0's history to show m2", lambda: [h.item_id for h in store.users(["u0"])[0].history] == ["m0", "m2"])
    v2 = poll("u0's vector to change", lambda: [v for v in index.get_vectors("users", version, ["u0"], strong=True).values()
                                               if not np.allclose(v, v1)])[0]
    assert float(np.dot(v2, v2)) == pytest.approx(1.0, abs=1e-3)

    consumer = KafkaConsumer(wsettings.topic("dlq"), bootstrap_servers=wsettings.kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=2000)
    letters: list[DeadLetter] = []
    poll("two dead letters", lambda: letters.extend(DeadLetter.model_validate_json(m.value) for m in consumer) or len(letters) >= 2)
    consumer.close()
    assert sorted(letter.raw for letter in letters) == sorted([b"{not json", b'{"user_id": "u0"}'])
    assert any("not JSON" in letter.error for letter in letters)
    assert any("item_id" in letter.error for letter in letters)
    assert all(letter.source_topic == wsettings.topic("engagements") for letter in letters)

    # Replaying every valid event changes nothing in Redis or in Milvus.
    users, items = ["u0", "u1"], [f"m{i}" for i in range(4)]
    poll("quiescence", lambda: quiescent(store, lambda: w.events("applied"), len(first) + len(later)))
    poll("vectors to reflect the state", lambda: vectors_reflect_state(index, store, version, users, items))
    before = semantic_state(store, users, items)
    vectors_before = {k: index.get_vectors(k, version, ids, strong=True) for k, ids in (("users", users), ("items", items))}
    with EventProducer(wsettings) as producer:
        producer.send_many(first + later)
    poll("the replay to be consumed", lambda: w.events("duplicate") >= len(first) + len(later))
    poll("quiescence after the replay", lambda: quiescent(store, lambda: w.events("applied"), len(first) + len(later)))
    assert w.events("applied") == len(first) + len(later)
    assert semantic_state(store, users, items) == before
    vectors_after = {k: index.get_vectors(k, version, ids, strong=True) for k, ids in (("users", users), ("items", items))}
    assert vectors_after.keys() == vectors_before.keys()
    for kind in vectors_before:
        assert vectors_after[kind].keys() == vectors_before[kind].keys()
        assert all(np.array_equal(vectors_after[kind][i], vectors_before[kind][i]) for i in vectors_before[kind])


def test_a_new_item_becomes_retrievable_through_candidates(wsettings: Settings, workers: Callable[[], Worker]) -> None:
    from indexer.candidates import Retriever

    workers()
    index = MilvusStore(wsettings)
    with EventProducer(wsettings) as producer:
        producer.send_many(catalogue(3, 1) + [EngagementEvent(user_id="u0", item_id="m0", ts=now(-5))])
    poll("u0's vector", lambda: index.has_version("tiny_streams") and index.get_vectors("users", "tiny_streams", ["u0"], strong=True))
    index.activate("tiny_streams")
    retriever = Retriever(wsettings, index=index)
    assert "fresh" not in {i for i, _ in retriever.candidates("u0", k=50).items}
    with EventProducer(wsettings) as producer:
        producer.send(ItemEvent(item_id="fresh", features={"title": "A brand new film", "genres": "drama"}))
    poll("the new item among u0's candidates", lambda: "fresh" in {i for i, _ in retriever.candidates("u0", k=50).items})


@pytest.mark.parametrize(("wsettings", "sig"), [("standalone", signal.SIGKILL), ("standalone", signal.SIGTERM), ("cluster", signal.SIGKILL)],
                         ids=["kill-9", "sigterm", "kill-9-cluster"], indirect=["wsettings"])
def test_a_stop_mid_stream_loses_nothing_and_counts_nothing_twice(wsettings: Settings, workers: Callable[[], Worker],
                                                                   sig: int) -> None:
    store, index = StateStore.from_settings(wsettings), MilvusStore(wsettings)
    n_items, n_users = 30, 20
    events = catalogue(n_items, n_users) + activity(6000, n_items, n_users, seed=1)
    users, items = [f"u{u}" for u in range(n_users)], [f"m{i}" for i in range(n_items)]
    w = workers()
    with EventProducer(wsettings) as producer:
        producer.send_many(events)
    # Kill once some, not all, events are applied and while the refresher has work.
    poll("the worker to be mid-stream", lambda: 0 < w.events("applied") < len(events) * 0.9, timeout=POLL_S)
    w.stop(sig)  # waits for the exit (a SIGTERM'd worker that does not drain and exit fails here)
    w2 = workers()
    # The restarted worker replays from the last commit; what it applies plus what was applied before
    # the kill must be every event exactly once (replayed duplicates are recognised, not re-applied).
    expected = reference_state(wsettings, events, users, items)
    poll("every event's effect", lambda: semantic_state(store, users, items) == expected)
    poll("quiescence", lambda: store.dirty_count("users") == 0 and store.dirty_count("items") == 0)
    poll("every entity's vector to reflect its state", lambda: vectors_reflect_state(index, store, "tiny_streams", users, items))
    assert semantic_state(store, users, items) == expected
    assert w2.events("applied") < len(events)  # the first worker's writes count: nothing was applied twice
    if sig == signal.SIGTERM:
        assert w2.events("duplicate") == 0  # a graceful stop committed everything it had applied


@pytest.mark.parametrize("wsettings", ["standalone", "cluster"], indirect=True)
def test_two_workers_split_partitions_and_reach_the_one_worker_state(wsettings: Settings, workers: Callable[[], Worker]) -> None:
    store, index = StateStore.from_settings(wsettings), MilvusStore(wsettings)
    n_items, n_users = 20, 16
    events = catalogue(n_items, n_users) + activity(2000, n_items, n_users, seed=2)
    users, items = [f"u{u}" for u in range(n_users)], [f"m{i}" for i in range(n_items)]
    a, b = workers(), workers()
    all_partitions = {(wsettings.topic(k), str(p)) for k in ("items", "users", "impressions", "engagements")
                      for p in range(wsettings.topic_partitions)}
    poll("the two workers to split the partitions",
         lambda: (pa := a.partitions()) and (pb := b.partitions()) and not pa & pb and pa | pb == all_partitions)
    with EventProducer(wsettings) as producer:
        producer.send_many(events)
    expected = reference_state(wsettings, events, users, items)
    poll("every event's effect", lambda: semantic_state(store, users, items) == expected)
    poll("quiescence", lambda: store.dirty_count("users") == 0 and store.dirty_count("items") == 0)
    poll("every entity's vector to reflect its state", lambda: vectors_reflect_state(index, store, "tiny_streams", users, items))
    assert a.events("applied") > 0 and b.events("applied") > 0
    assert a.events("applied") + b.events("applied") == len(events)


def dead_letters(settings: Settings, n: int) -> list[DeadLetter]:
    """The first ``n`` records of the DLQ topic (polls until there are that many)."""
    consumer = KafkaConsumer(settings.topic("dlq"), bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=2000)
    letters: list[DeadLetter] = []
    try:
        poll(f"{n} dead letters", lambda: letters.extend(DeadLetter.model_validate_json(m.value) for m in consumer) or len(letters) >= n)
    finally:
        consumer.close()
    return letters


def test_every_hostile_record_goes_to_the_dlq_with_its_reason_and_the_worker_keeps_applying(
        wsettings: Settings, workers: Callable[[], Worker]) -> None:
    store = StateStore.from_settings(wsettings)
    store.r.set(store._u("broken", "h"), "not a history")  # this user's own state fails the engagement script
    w = workers()
    eng, items = wsettings.topic("engagements"), wsettings.topic("items")
    hostile = {
        "Exceeds the limit (4300 digits)": (eng, b"u0", b'{"user_id": "u0", "item_id": ' + b"1" * 5000 + b"}"),
        "RecursionError": (eng, b"u0", b"[" * 100_000 + b"]" * 100_000),
        "NaN is not a JSON number": (items, b"m9", b'{"item_id": "m9", "features": {"year": NaN}}'),
        "tombstone": (items, b"m9", None),
        "REJECTED WRONGTYPE": (eng, b"broken", EngagementEvent(user_id="broken", item_id="m0", ts=now(-20)).to_bytes()),
    }
    valid = [EngagementEvent(user_id="u0", item_id=f"m{k}", ts=now(-10 + k)) for k in range(len(hostile))]
    raw = KafkaProducer(bootstrap_servers=wsettings.kafka_bootstrap, acks="all")
    for (topic, key, value), ev in zip(hostile.values(), valid):
        raw.send(topic, key=key, value=value)
        raw.send(eng, key=ev.key.encode(), value=ev.to_bytes())
    raw.send(items, key=b"m1", value=ItemEvent(item_id="m1", features={"title": "After the poison"}).to_bytes())
    raw.flush()
    raw.close()

    poll("every valid engagement applied", lambda: store.users(["u0"])[0] is not None
         and [h.item_id for h in store.users(["u0"])[0].history] == [ev.item_id for ev in valid])
    poll("the item after the poisoned ones applied", lambda: store.items(["m1"])[0] is not None and store.items(["m1"])[0].features)
    letters = dead_letters(wsettings, len(hostile))
    for reason, (topic, _, value) in hostile.items():
        (letter,) = [x for x in letters if reason in x.error]
        assert letter.source_topic == topic and letter.raw == value
    assert w.proc.poll() is None
    assert w.events("invalid") == len(hostile)


def test_a_poisoned_item_is_quarantined_while_the_rest_of_its_batch_is_refreshed(
        wsettings: Settings, workers: Callable[[], Worker]) -> None:
    store, index = StateStore.from_settings(wsettings), MilvusStore(wsettings)
    good = [f"m{i}" for i in range(6)]
    store.apply_many([ItemEvent(item_id=i, features={"title": f"Movie {i}"}, ts=now(-60)) for i in good + ["bad"]])
    store.r.hset(store._i("bad", "f"), "year", "NaN")  # stored before validation rejected NaN: rendering fails on it
    w = workers()  # the seven dirty items are one micro-batch
    poll("the good items' vectors", lambda: index.has_version("tiny_streams")
         and set(index.get_vectors("items", "tiny_streams", good, strong=True)) == set(good))
    poll("the poisoned item in quarantine", lambda: "bad" in store.quarantined("items"))
    assert "RenderError" in store.quarantined("items")["bad"] and "year" in store.quarantined("items")["bad"]
    poll("the quarantine counted", lambda: w.metrics().get(("onetower_quarantined_total", (("kind", "items"),))) == 1)
    listed = onetower(wsettings, "quarantine", "list")
    assert "bad" in listed and "RenderError" in listed
    assert store.dirty_count("items") == 0 and not index.get_vectors("items", "tiny_streams", ["bad"], strong=True)

    store.r.hset(store._i("bad", "f"), "year", "1995")  # the fix
    assert "1 items" in onetower(wsettings, "quarantine", "retry", "--kind", "items")
    poll("the fixed item's vector", lambda: index.get_vectors("items", "tiny_streams", ["bad"], strong=True))
    poll("the quarantine to empty", lambda: not store.quarantined("items"))
    assert w.proc.poll() is None


def test_dead_letters_are_listed_and_replayed_once_after_a_fix(wsettings: Settings, workers: Callable[[], Worker]) -> None:
    store = StateStore.from_settings(wsettings)
    store.r.set(store._u("broken", "h"), "not a history")  # the engagement fails on this user's state until the fix
    w = workers()
    raw = KafkaProducer(bootstrap_servers=wsettings.kafka_bootstrap, acks="all")
    value = json.dumps({"user_id": "broken", "item_id": "m0", "ts": now(-5).isoformat()}).encode()  # no event id
    raw.send(wsettings.topic("engagements"), key=b"broken", value=value)
    raw.flush()
    raw.close()
    (letter,) = dead_letters(wsettings, 1)
    listed = onetower(wsettings, "dlq", "list")
    assert f"{letter.source_topic} " in listed and f" {letter.offset} " in listed and "REJECTED WRONGTYPE" in listed

    store.r.delete(store._u("broken", "h"))  # the fix
    assert "replayed 1 record" in onetower(wsettings, "dlq", "replay")
    assert "replayed 1 record" in onetower(wsettings, "dlq", "replay", "--kind", "engagements")
    poll("the second replay seen as a duplicate", lambda: w.events("duplicate") >= 1)
    assert [h.item_id for h in store.users(["broken"])[0].history] == ["m0"]
    assert sum(int(n) for n in store.r.hvals(store._i("m0", "c:engagements"))) == 1  # counted once
    assert w.events("applied") == 1
