"""Event commands: ``onetower topics``, ``produce``, ``dataset movielens``, ``replay``, ``worker``,
``dlq list | replay``, ``quarantine list | retry``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import redis
import typer
from rich.table import Table

from onetower.cli_common import console, fail
from core.settings import get_settings
from streams.events import DLQ_KIND, EVENT_TYPES, DeadLetter, InvalidEvent, event_type, parse_event
from streams.topics import KafkaUnavailable, dead_letters, ensure_topics

if TYPE_CHECKING:
    from streams.state import StateStore

app = typer.Typer()
dataset_app = typer.Typer(no_args_is_help=True, help="Convert public data sets into onetower events.")
app.add_typer(dataset_app, name="dataset")
dlq_app = typer.Typer(no_args_is_help=True, help="Records the stream workers could not process: list, replay after a fix.")
app.add_typer(dlq_app, name="dlq")
quarantine_app = typer.Typer(no_args_is_help=True, help="Users and items whose re-encoding failed on their data.")
app.add_typer(quarantine_app, name="quarantine")
KINDS_HELP = ", ".join(EVENT_TYPES)


@app.command()
def topics() -> None:
    """Create onetower's topics (a no-op when they exist)."""
    try:
        created = ensure_topics(get_settings())
    except KafkaUnavailable as exc:
        raise fail(str(exc)) from None
    console.print(f"created {len(created)} topic(s): {', '.join(created)}" if created else "all topics exist")


@app.command()
def produce(
    file: Optional[Path] = typer.Argument(None, help=f"a JSONL file of events, each with a 'topic' field ({KINDS_HELP})"),
    topic: Optional[str] = typer.Option(None, help=f"for a single event: its topic kind ({KINDS_HELP})"),
    event: Optional[str] = typer.Option(None, "--event", help="for a single event: its JSON value"),
) -> None:
    """Send events to Kafka, from a JSONL file or one event given by flags."""
    from streams.producer import EventProducer

    if (file is None) == (event is None):
        raise fail("give either FILE or --topic with --event")
    try:
        events = [_parse(topic, event)] if event is not None else list(_read_jsonl(file))
    except InvalidEvent as exc:
        raise fail(str(exc)) from None
    try:
        with EventProducer(get_settings()) as producer:
            sent = producer.send_many(events)
    except KafkaUnavailable as exc:
        raise fail(str(exc)) from None
    console.print(f"sent {sent} event(s)")


def _parse(topic: Optional[str], raw: str):
    if topic is None:
        raise InvalidEvent("--event needs --topic")
    try:
        event_type(topic)
    except ValueError as exc:
        raise InvalidEvent(str(exc)) from None
    return parse_event(topic, raw)


def _read_jsonl(path: Path):
    """Events from a JSONL file; each line names its topic in a 'topic' field."""
    if not path.is_file():
        raise InvalidEvent(f"{path}: no such file")
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                topic = record.pop("topic")
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise InvalidEvent(f"{path}:{lineno}: expected a JSON object with a 'topic' field") from None
            try:
                yield _parse(topic, json.dumps(record))
            except InvalidEvent as exc:
                raise InvalidEvent(f"{path}:{lineno}: {exc}") from None


@dataset_app.command("movielens")
def dataset_movielens(out: Path = typer.Option(..., help="directory for the event files")) -> None:
    """Convert MovieLens-100k (shipped in the recbole wheel) into item, user, impression and engagement events."""
    from streams.movielens import MovieLensError, convert

    try:
        counts = convert(out, get_settings())
    except MovieLensError as exc:
        raise fail(str(exc)) from None
    _print_counts(counts, "events")


@app.command()
def replay(
    directory: Path = typer.Argument(..., help="a directory written by `onetower dataset movielens`"),
    speed: float = typer.Option(0.0, help="event-time speed-up (e.g. 3600 = an hour a second); 0 sends as fast as possible"),
    limit: Optional[int] = typer.Option(None, help="send only the first N events (in event-time order)"),
) -> None:
    """Send a converted data set to Kafka in event-time order."""
    from streams.movielens import MovieLensError, replay as do_replay

    try:
        counts = do_replay(directory, get_settings(), speed=speed, limit=limit)
    except (MovieLensError, KafkaUnavailable) as exc:
        raise fail(str(exc)) from None
    _print_counts(counts, "events sent")


def _print_counts(counts: dict[str, int], what: str) -> None:
    table = Table("topic", what)
    for kind, n in counts.items():
        table.add_row(kind, f"{n:,}")
    console.print(table)


@app.command()
def worker(
    model: Optional[Path] = typer.Option(None, "--model", help="model artifact directory [env ONETOWER_MODEL_DIR; default: the shipped tuned tower]"),
    refresh: bool = typer.Option(True, "--refresh/--no-refresh", help="re-encode dirty users and items (off: state updates only)"),
    loglevel: str = typer.Option("info", help="debug, info, warning or error"),
) -> None:
    """Run a stream worker: apply events to Redis, re-encode what changed, upsert vectors (until SIGTERM)."""
    from onetower.worker import run_worker

    settings = get_settings()
    refresher = None
    if refresh:
        from indexer.store import open_store
        from models.encoder import Encoder
        from models.errors import ModelError
        from indexer.refresher import Refresher
        from streams.state import StateStore

        from models.tuned import served_artifact

        try:
            encoder = Encoder.load(model or settings.model_dir or served_artifact(settings.state_dir / "models"))
        except ModelError as exc:
            raise fail(str(exc)) from None
        refresher = Refresher(settings, StateStore.from_settings(settings), encoder, open_store(settings))
    try:
        run_worker(settings, refresher, loglevel=loglevel)
    except KafkaUnavailable as exc:
        raise fail(str(exc)) from None


@dlq_app.command("list")
def dlq_list(kind: Optional[str] = typer.Option(None, help=f"only records from this topic kind ({KINDS_HELP})")) -> None:
    """Dead letters, oldest first per partition: where the record came from and why it failed."""
    settings = get_settings()
    table = Table("source topic", "partition", "offset", "key", "reason", "dead-lettered at")
    try:
        for letter in _letters(kind):
            table.add_row(letter.source_topic, str(letter.partition), str(letter.offset), letter.key or "", letter.error,
                          letter.ts.isoformat(timespec="seconds"))
    except KafkaUnavailable as exc:
        raise fail(str(exc)) from None
    console.print(table)
    console.print(f"{table.row_count} dead letter(s) in {settings.topic(DLQ_KIND)}")


@dlq_app.command("replay")
def dlq_replay(kind: Optional[str] = typer.Option(None, help=f"only records from this topic kind ({KINDS_HELP})")) -> None:
    """Send dead letters back to their source topics, after a fix. Idempotent: each record carries its
    original coordinates, which give a record without event id the same id every time."""
    from streams.producer import EventProducer

    sent = skipped = 0
    try:
        with EventProducer(get_settings()) as producer:
            for letter in _letters(kind):
                if letter.raw is None:
                    skipped += 1
                    continue
                producer.replay(letter)
                sent += 1
    except KafkaUnavailable as exc:
        raise fail(str(exc)) from None
    console.print(f"replayed {sent} record(s)" + (f"; skipped {skipped} without a value (tombstones, or too large to keep)"
                                                  if skipped else ""))


def _letters(kind: Optional[str]) -> Iterator[DeadLetter]:
    """The DLQ's letters, those of ``kind``'s topic only when given."""
    settings = get_settings()
    if kind is not None and kind not in EVENT_TYPES:
        raise fail(f"unknown kind {kind!r}; expected one of {', '.join(EVENT_TYPES)}")
    topic = None if kind is None else settings.topic(kind)
    return (letter for letter in dead_letters(settings) if topic is None or letter.source_topic == topic)


@quarantine_app.command("list")
def quarantine_list() -> None:
    """Quarantined users and items, with the reason their re-encoding failed."""
    store = _store()
    table = Table("kind", "id", "reason")
    try:
        for kind in ("items", "users"):
            for entity, reason in sorted(store.quarantined(kind).items()):
                table.add_row(kind, entity, reason)
    except redis.RedisError as exc:
        raise fail(f"Redis at {store.settings.redis_url_masked} failed: {exc}") from None
    console.print(table)


@quarantine_app.command("retry")
def quarantine_retry(
    ids: Optional[list[str]] = typer.Argument(None, help="ids to retry (default: every quarantined one of the kinds)"),
    kind: Optional[str] = typer.Option(None, help="items or users (default: both)"),
) -> None:
    """Queue quarantined entities for re-encoding again, after a fix; each leaves the list once it succeeds."""
    if kind not in (None, "items", "users"):
        raise fail(f"unknown kind {kind!r}; expected items or users")
    store = _store()
    try:
        queued = {k: store.retry_quarantined(k, ids or None) for k in ((kind,) if kind else ("items", "users"))}
    except redis.RedisError as exc:
        raise fail(f"Redis at {store.settings.redis_url_masked} failed: {exc}") from None
    console.print(", ".join(f"{len(v)} {k}" for k, v in queued.items()) + " queued for re-encoding")


def _store() -> "StateStore":
    from streams.state import StateStore

    return StateStore.from_settings(get_settings())
