"""``onetower stack up | down | status``."""

from __future__ import annotations

import psutil
import typer
from rich.table import Table

from onetower import stack
from onetower.cli_common import console, fail
from core.settings import get_settings

app = typer.Typer(no_args_is_help=True)


def _table(rows: list[stack.ServiceStatus]) -> Table:
    table = Table("server", "address", "pid", "ready", "RSS MiB")
    for row in rows:
        rss = _group_rss_mib(row.pid) if row.pid else 0.0
        table.add_row(row.name, row.address, str(row.pid or "-"), "yes" if row.ready else "no", f"{rss:.0f}")
    return table


def _group_rss_mib(pid: int) -> float:
    """Resident memory of a server and its children (Milvus runs under a supervisor)."""
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.Error:
        return 0.0


@app.command()
def up() -> None:
    """Start Kafka, Redis (three Redis Cluster nodes with ONETOWER_REDIS_CLUSTER=1) and Milvus (unless already
    running) and wait until they answer."""
    settings = get_settings()
    try:
        with console.status("starting the local stack..."):
            rows = stack.up(settings)
    except stack.StackError as exc:
        raise fail(str(exc)) from None
    console.print(_table(rows))


@app.command()
def down() -> None:
    """Stop every server of the local stack; nothing is left running."""
    with console.status("stopping the local stack..."):
        stack.down(get_settings())
    console.print("stack stopped")


@app.command()
def status() -> None:
    """Show each server's pid, readiness and resident memory."""
    rows = stack.status(get_settings())
    console.print(_table(rows))
    if not all(row.ready for row in rows):
        raise typer.Exit(3)
