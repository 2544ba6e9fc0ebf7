"""``onetower demo``: the main job end to end on the local stack."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from onetower import stack
from onetower.cli_common import console, fail
from onetower.settings import get_settings

app = typer.Typer()


@app.command()
def demo(
    short: bool = typer.Option(False, help="replay only the first 20,000 events (CI's mode)"),
    keep_stack: bool = typer.Option(False, help="leave the servers running afterwards (they are left anyway if they ran before)"),
) -> None:
    """Start the stack, convert and replay MovieLens-100k, count the events per topic, stop what it started."""
    from streams.inspect import topic_counts
    from streams.movielens import MovieLensError, convert, replay

    settings = get_settings()
    data_dir: Path = settings.state_dir / "movielens"
    was_running = all(s.ready for s in stack.status(settings))
    try:
        with console.status("starting Kafka, Redis and Milvus..."):
            stack.up(settings)
        console.print("[green]stack up[/]")
        counts = convert(data_dir, settings)
        console.print(f"MovieLens-100k converted into {data_dir}: {sum(counts.values()):,} events")
        started = time.perf_counter()
        sent = replay(data_dir, settings, limit=20_000 if short else None)
        took = time.perf_counter() - started
        console.print(f"replayed {sum(sent.values()):,} events in {took:.1f}s ({sum(sent.values()) / took:,.0f} events/s)")
        table = Table("topic", "sent now", "in Kafka")
        in_kafka = topic_counts(settings)
        for kind in in_kafka:
            table.add_row(settings.topic(kind), f"{sent.get(kind, 0):,}", f"{in_kafka[kind]:,}")
        console.print(table)
    except (stack.StackError, MovieLensError) as exc:
        raise fail(str(exc)) from None
    finally:
        if not (keep_stack or was_running):
            stack.down(settings)
            console.print("stack down")
