"""``onetower demo``: the main job end to end on the local stack.

Stack up; MovieLens-100k converted and replayed; a tower exported (the untuned base, or quickly
fine-tuned with ``--train``); a stream worker applies the events and encodes users and items; the
version is checked and activated; the events held back from the replay streamed on, so the worker
scores the served version on engagements it meets live, and that live recall printed; one user's
candidates printed; a new engagement produced (after the live recall figure, which it must not enter:
the demo picks the user's top candidate); the same user's candidates printed again with the measured
freshness; everything stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import typer
from rich.table import Table

from core.errors import OnetowerError
from core.settings import Settings, get_settings
from onetower import stack
from onetower.cli_common import console, fail

app = typer.Typer()
T = TypeVar("T")
SHORT_EVENTS = 20_000
LIVE_EVENTS = 4_000  # events held back from the replay and streamed after activation: live recall scores their engagements


@app.command()
def demo(
    short: bool = typer.Option(False, help=f"replay only the first {SHORT_EVENTS:,} events (CI's mode)"),
    train: bool = typer.Option(False, help="fine-tune the tower briefly on the replayed topics before indexing"),
    keep_stack: bool = typer.Option(False, help="leave the servers running afterwards (they are left anyway if they ran before)"),
    timeout_s: float = typer.Option(1800.0, help="give up waiting for the worker after this long"),
) -> None:
    """Run the whole system once on MovieLens-100k and show a user's candidates change after an engagement."""
    try:
        _demo(get_settings(), short, train, keep_stack, timeout_s)
    except Exception as exc:  # one line, never a traceback; errors not ours also name their type
        raise fail(str(exc) if isinstance(exc, (OnetowerError, TimeoutError)) else f"{type(exc).__name__}: {exc}") from None


def _demo(settings: Settings, short: bool, train: bool, keep_stack: bool, timeout_s: float) -> None:
    was_running = all(s.ready for s in stack.status(settings))
    try:
        with console.status("starting Kafka, Redis and Milvus..."):
            stack.up(settings)
        console.print("[green]stack up[/]")
        live_from = _replay(settings, short)
        model_dir = _model(settings, train)
        with _worker(settings, model_dir):
            _run(settings, model_dir, timeout_s, live_from)
    finally:
        if not (keep_stack or was_running):
            stack.down(settings)
            console.print("stack down")


def _replay(settings: Settings, short: bool) -> int:
    """Replay MovieLens up to the live window (the last ``LIVE_EVENTS``, or those after ``SHORT_EVENTS``);
    returns where the live window starts."""
    from streams.inspect import topic_counts
    from streams.movielens import convert, replay

    data_dir = settings.state_dir / "movielens"
    counts = convert(data_dir, settings)
    console.print(f"MovieLens-100k converted into {data_dir}: {sum(counts.values()):,} events")
    live_from = SHORT_EVENTS if short else sum(counts.values()) - LIVE_EVENTS
    if sum(topic_counts(settings).values()) > 0:
        console.print("topics already hold events: not replaying again (the worker resumes where it stopped)")
    else:
        started = time.perf_counter()
        sent = replay(data_dir, settings, limit=live_from)
        took = time.perf_counter() - started
        console.print(f"replayed {sum(sent.values()):,} events in {took:.1f}s ({sum(sent.values()) / took:,.0f} events/s)")
    table = Table("topic", "events in Kafka")
    for kind, n in topic_counts(settings).items():
        table.add_row(settings.topic(kind), f"{n:,}")
    console.print(table)
    return live_from


def _model(settings: Settings, train: bool) -> Path:
    """The shipped tuned tower as an ONNX artifact (exported once), or a briefly fine-tuned one."""
    from models.artifact import ModelArtifact
    from models.tuned import read_tuned, served_artifact, shipped

    if train:
        return _finetuned(settings)
    with console.status(f"exporting the shipped tower {read_tuned(shipped()).version} to ONNX (once)..."):
        artifact = ModelArtifact.load(served_artifact(settings.state_dir / "models"))
    console.print(f"model {artifact.version} ({artifact.manifest.base_model}, tuned): ONNX fp32 parity "
                  f"{artifact.manifest.parity.get('fp32', 0):.4f}")
    return artifact.path


def _finetuned(settings: Settings, steps: int = 40) -> Path:
    """A few dozen InfoNCE + Matryoshka steps on the replayed topics: enough to see the pipeline move."""
    import training
    from training.config import load_config
    from training.train import ARTIFACT_SUBDIR, train

    version = time.strftime("minilm_demo_%Y%m%d_%H%M%S")
    out = settings.state_dir / "models" / version
    config = load_config(Path(training.__file__).parent / "configs" / "movielens-minilm.yaml",
                         {"output_dir": out, "max_steps": steps, "max_train_examples": steps * 32,
                          "eval_during_training": False, "save_steps": steps, "version": version, "export": True})
    console.print(f"fine-tuning MiniLM for {steps} steps on the replayed topics (CPU: a few minutes)...")
    train(config, settings)
    return out / ARTIFACT_SUBDIR


@contextmanager
def _worker(settings: Settings, model_dir: Path) -> Iterator[subprocess.Popen]:
    """A stream worker in its own process (as in production), stopped with SIGTERM."""
    log = settings.state_dir / "logs" / "demo-worker.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # the demo scores every engagement of its live window for live recall, where a production worker samples
    env = {**os.environ, **_env(settings.model_copy(update={"live_recall_sample_rate": 1.0}))}
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "onetower", "worker", "--model", str(model_dir)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env)
    console.print(f"stream worker started (pid {proc.pid}, log {log})")
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        console.print("stream worker stopped")


def _env(settings: Settings) -> dict[str, str]:
    """The settings as ONETOWER_* variables, so a child process sees what the flags set here."""
    return {f"ONETOWER_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None and not isinstance(v, list)}


def _run(settings: Settings, model_dir: Path, timeout_s: float, live_from: int) -> None:
    from datetime import datetime, timezone

    from indexer.candidates import Retriever
    from indexer.reindex import reindex
    from indexer.store import open_store
    from models.artifact import ModelArtifact
    from streams.events import EngagementEvent
    from streams.producer import EventProducer
    from streams.state import StateStore
    from onetower.worker import app_id

    store, index = StateStore.from_settings(settings), open_store(settings)
    version = ModelArtifact.load(model_dir).version
    started = time.perf_counter()
    with console.status("the worker applies the events and encodes every dirty user and item...") as status:
        def caught_up() -> bool:
            lag = ready_group_lag(settings, app_id(settings))
            dirty = store.dirty_count("users") + store.dirty_count("items")
            status.update(f"worker: {lag:,} events to apply, {dirty:,} users/items to encode")
            return lag == 0 and dirty == 0
        _poll(caught_up, timeout_s, "the worker did not catch up")
    console.print(f"worker caught up in {time.perf_counter() - started:.0f}s")
    if index.active_version() != version:
        report = reindex(settings, model_dir, show_progress=True)
        console.print(f"version {report.version} checked and activated: {report.items:,} items, {report.users:,} users")

    _stream_on(settings, live_from)
    _poll(lambda: ready_group_lag(settings, app_id(settings)) == 0 and store.dirty_count("users") == 0, timeout_s,
          "the worker did not catch up with the live events")
    _live_recall(store, version)

    retriever = Retriever(settings, index, store)
    user = _busiest_user(store)
    before = retriever.candidates(user, 10)
    _show(store, user, before, "before")

    liked = before.items[0][0]
    event = EngagementEvent(user_id=user, item_id=liked, kind_="like", ts=datetime.now(timezone.utc))
    sent_at = time.perf_counter()
    with EventProducer(settings) as producer:
        producer.send(event)
    title = store.items([liked])[0].features.get("title", liked)
    console.print(f"\nuser {user} likes [bold]{title}[/] (event at {event.ts:%H:%M:%S.%f})")
    _poll(lambda: index.stored("users", version).get(user, 0) >= event.ts_ms, 120, "the user's vector was not refreshed")
    freshness = time.perf_counter() - sent_at
    after = retriever.candidates(user, 10)
    _show(store, user, after, f"after, vector refreshed {freshness:.2f}s after the engagement was sent")
    moved = len({i for i, _ in before.items} - {i for i, _ in after.items})
    console.print(f"{moved} of 10 candidates changed; freshness {freshness:.2f}s (event sent -> user vector upserted in Milvus)")


def _stream_on(settings: Settings, live_from: int) -> None:
    """Send the events held back from the replay: the served version meets engagements it has not seen."""
    from itertools import islice

    from streams.movielens import read_events
    from streams.producer import EventProducer

    with EventProducer(settings) as producer:
        producer.send_many(list(islice(read_events(settings.state_dir / "movielens"), live_from, live_from + LIVE_EVENTS)))
    console.print(f"\nsent the {LIVE_EVENTS:,} events held back from the replay; the worker scores a sample of their engagements for live recall")


def _live_recall(store, version: str) -> None:
    """One line: live recall@10 of the served version over the last 24 h, against popularity on the same engagements."""
    from indexer.live_recall import figures

    found = [f for f in figures(store) if f.version == version and f.window == "24h" and f.scored]
    if not found:
        console.print(f"live recall@10 of {version}: no engagement scored yet (`onetower quality` shows it as events arrive)")
        return
    f = found[0]
    console.print(f"live recall@10 of {version} (last 24 h): {f.recall[10]:.3f} on {f.scored:,} engagements scored "
                  f"(popularity {f.popularity[10]:.3f} on the same); with the user's vector current: "
                  f"{f.fresh.recall[10]:.3f} on {f.fresh.scored:,} (popularity {f.fresh.popularity[10]:.3f}); "
                  f"`onetower quality` for more")


def ready_group_lag(settings: Settings, group: str, timeout_s: float = 120.0) -> int:
    """``group_lag``, retried while Kafka answers with a retriable error for up to ``timeout_s``: a fresh
    broker creates its offsets topic on the first group request and has no coordinator for a while."""
    from kafka.errors import KafkaError

    from streams.inspect import group_lag

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return group_lag(settings, group)
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def _busiest_user(store) -> str:
    """The user with the longest history, so the demo shows a well-known taste."""
    ids = list(store.user_ids())
    states = [s for s in store.users(ids) if s is not None]
    return max(states, key=lambda s: (len(s.history), s.user_id)).user_id


def _show(store, user: str, result, label: str) -> None:
    items = store.items([i for i, _ in result.items])
    table = Table("#", "item", "title", "genres", "score", title=f"candidates for user {user} ({label}; model {result.version})")
    for rank, ((item_id, score), state) in enumerate(zip(result.items, items), 1):
        features = state.features if state else {}
        table.add_row(str(rank), item_id, str(features.get("title", "?")), str(features.get("genres", "")), f"{score:.3f}")
    console.print(table)


def _poll(check: Callable[[], T], timeout_s: float, message: str, every_s: float = 0.2) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every_s)
    raise TimeoutError(f"{message} within {timeout_s:.0f}s")
