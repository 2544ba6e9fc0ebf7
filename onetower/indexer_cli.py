"""Index and serving commands: ``onetower reindex``, ``rollback``, ``versions``, ``candidates``, ``serve``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from onetower.cli_common import console, fail
from core.settings import get_settings

if TYPE_CHECKING:
    from indexer.live_recall import Figures

app = typer.Typer()


@app.command()
def reindex(
    model: Optional[Path] = typer.Option(None, "--model", help="model artifact directory [default: ONETOWER_MODEL_DIR, else the shipped tuned tower]"),
    restart: bool = typer.Option(False, help="drop a half-built copy of this version and start clean instead of resuming"),
    live_recall_gate: int = typer.Option(0, help="promote only if live recall@10 of the new version is not below the active "
                                                 "one's over this many engagements scored in both (0: no check)"),
    live_recall_wait: float = typer.Option(900.0, help="seconds to wait for those engagements to be scored"),
) -> None:
    """Encode every item and user with a model into new collections, check them, then swap the aliases."""
    from indexer.reindex import ReindexError
    from indexer.reindex import reindex as run
    from indexer.vectors import IndexUnavailable, VersionError

    from models.errors import ModelError
    from models.tuned import served_artifact

    settings = get_settings()
    try:
        model = model or settings.model_dir or served_artifact(settings.state_dir / "models")
        report = run(settings, model, restart=restart, show_progress=True, live_recall_gate=live_recall_gate,
                     live_recall_wait_s=live_recall_wait)
    except (ReindexError, IndexUnavailable, VersionError, ModelError) as exc:
        raise fail(str(exc)) from None
    console.print(f"version [bold]{report.version}[/] active: {report.items} items (from {report.item_source}), "
                  f"{report.users} users{' (resumed)' if report.resumed else ''}; previous: {report.previous or 'none'}"
                  + ("" if report.indexed else "; the HNSW index was still building at the swap")
                  + (f"; dropped {', '.join(report.dropped)}" if report.dropped else "")
                  + (f"; {report.live_recall}" if report.live_recall else ""))


@app.command()
def quality(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Live recall per model version and window, with popularity ranked on the same engagements."""
    import redis

    from indexer.live_recall import KS, figures
    from streams.state import StateStore

    settings = get_settings()
    try:
        rows = figures(StateStore.from_settings(settings))
    except redis.RedisError as exc:
        raise fail(f"Redis at {settings.redis_url_masked} failed: {exc}") from None
    if as_json:
        print(json.dumps([{**_figures_json(f), "fresh": _figures_json(f.fresh)} for f in rows]))
        return
    table = Table("version", "window", "scored", *(f"R@{k}" for k in KS), *(f"pop R@{k}" for k in KS),
                  "current vector", "R@10", "pop R@10",
                  title="live recall (engaged item among the candidates just before the engagement; "
                        "current vector: the engagements whose user vector missed none of the user's earlier ones)")
    for f in rows:
        table.add_row(f.version, f.window, str(f.scored), *(f"{f.recall[k]:.3f}" for k in KS),
                      *(f"{f.popularity[k]:.3f}" for k in KS), str(f.fresh.scored), f"{f.fresh.recall[10]:.3f}",
                      f"{f.fresh.popularity[10]:.3f}")
    console.print(table)


def _figures_json(f: Figures) -> dict:
    return {"version": f.version, "window": f.window, "scored": f.scored, "recall": {str(k): v for k, v in f.recall.items()},
            "popularity": {str(k): v for k, v in f.popularity.items()}}


@app.command()
def rollback() -> None:
    """Re-activate the previous model version (kept for reindex_grace_s after a swap)."""
    from indexer.reindex import ReindexError
    from indexer.reindex import rollback as run
    from indexer.vectors import IndexUnavailable

    try:
        active, previous = run(get_settings())
    except (ReindexError, IndexUnavailable) as exc:
        raise fail(str(exc)) from None
    console.print(f"version [bold]{active}[/] active again; previous: {previous}")


@app.command()
def versions(gc: bool = typer.Option(False, "--gc", help="drop versions neither active nor kept for rollback")) -> None:
    """List the model versions in the vector store: which is active, which is kept for rollback, build state."""
    from indexer.store import open_store
    from indexer.vectors import IndexUnavailable

    settings = get_settings()
    index = open_store(settings)
    try:
        if gc:
            dropped = index.collect_garbage(settings.reindex_grace_s)
            console.print(f"dropped {', '.join(dropped)}" if dropped else "nothing to drop")
        active, previous = index.active_version(), index.previous_version()
        table = Table("version", "role", "state", "items", "users", "model dir")
        for version in index.versions():
            info = index.version_info(version) or {}
            role = "active" if version == active else "previous" if version == previous else ""
            table.add_row(version, role, info.get("state", "?"), str(info.get("items", "")), str(info.get("users", "")),
                          str(info.get("model_dir", "")))
    except IndexUnavailable as exc:
        raise fail(str(exc)) from None
    console.print(table)


@app.command()
def candidates(
    user_id: str = typer.Argument(..., help="the user to retrieve for"),
    k: int = typer.Option(100, "-k", help="how many items"),
    include_seen: bool = typer.Option(False, "--include-seen", help="keep items the user already engaged with"),
    filter: Optional[str] = typer.Option(None, "--filter", help='a filter as JSON, as the API takes it, e.g. '
                                                               '\'{"field": "year", "op": ">=", "value": 1990}\''),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Top-k candidate items for a user, from the active model version."""
    from indexer.candidates import InvalidRequest, Retriever, ServiceUnavailable, UnknownUser
    from indexer.filters import InvalidFilter, parse_filter
    from indexer.vectors import IndexUnavailable

    try:
        result = Retriever(get_settings()).candidates(user_id, k, exclude_seen=not include_seen,
                                                      filter=parse_filter(filter) if filter else None)
    except (UnknownUser, InvalidRequest, InvalidFilter, IndexUnavailable, ServiceUnavailable) as exc:
        raise fail(str(exc)) from None
    if as_json:
        print(json.dumps({"version": result.version, "cold_start": result.cold_start,
                          "items": [{"item_id": i, "score": s} for i, s in result.items]}))
        return
    table = Table("#", "item", "score", title=f"{user_id}: version {result.version}{' (cold start)' if result.cold_start else ''}")
    for rank, (item_id, score) in enumerate(result.items, 1):
        table.add_row(str(rank), item_id, f"{score:.4f}")
    console.print(table)


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="[default: ONETOWER_API_HOST]"),
    port: Optional[int] = typer.Option(None, help="[default: ONETOWER_API_PORT]"),
) -> None:
    """Run the candidates HTTP service (FastAPI; OpenAPI at /docs)."""
    import uvicorn

    from indexer.api import create_app

    settings = get_settings()
    uvicorn.run(create_app(settings), host=host or settings.api_host, port=port or settings.api_port)
