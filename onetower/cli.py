"""The ``onetower`` command: one typer app joining the command groups of the application layer (``*_cli`` modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from core.settings import get_settings

app = typer.Typer(
    name="onetower",
    help="LLM-based candidate retrieval kept fresh in real time.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    state_dir: Optional[Path] = typer.Option(None, help="data and logs of the local stack [env ONETOWER_STATE_DIR]"),
    kafka_bootstrap: Optional[str] = typer.Option(None, help="Kafka bootstrap servers [env ONETOWER_KAFKA_BOOTSTRAP]"),
    topic_prefix: Optional[str] = typer.Option(None, help="prefix of every topic name [env ONETOWER_TOPIC_PREFIX]"),
    redis_url: Optional[str] = typer.Option(None, help="Redis URL [env ONETOWER_REDIS_URL]"),
    milvus_uri: Optional[str] = typer.Option(None, help="Milvus server URI, or a .db path for Milvus Lite [env ONETOWER_MILVUS_URI]"),
    model_dir: Optional[Path] = typer.Option(None, help="model artifact directory [env ONETOWER_MODEL_DIR]"),
) -> None:
    """Global flags override the ONETOWER_* environment variables for every sub-command."""
    overrides = {
        "state_dir": state_dir,
        "kafka_bootstrap": kafka_bootstrap,
        "topic_prefix": topic_prefix,
        "redis_url": redis_url,
        "milvus_uri": milvus_uri,
        "model_dir": model_dir,
    }
    apply_overrides({k: v for k, v in overrides.items() if v is not None})


def apply_overrides(overrides: dict) -> None:
    """Validate flag values through the settings model and set them on the process-wide settings."""
    from pydantic import ValidationError

    from core.settings import Settings

    settings = get_settings()
    try:
        checked = Settings.model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        raise typer.BadParameter(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    for key in overrides:
        setattr(settings, key, getattr(checked, key))


def _register() -> None:
    """Each package's commands join the top-level app (typer merges an unnamed sub-app)."""
    from onetower import stack_cli

    app.add_typer(stack_cli.app, name="stack", help="Start, stop and inspect the local Kafka, Redis and Milvus servers.")
    from onetower import demo

    app.add_typer(demo.app)
    from onetower import streams_cli

    app.add_typer(streams_cli.app)
    from onetower import training_cli

    app.add_typer(training_cli.app)
    from onetower import models_cli

    app.add_typer(models_cli.app, name="model", help="Build, export and benchmark the shared encoder tower.")
    from onetower import indexer_cli

    app.add_typer(indexer_cli.app)


_register()
