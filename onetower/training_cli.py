"""Training commands: ``onetower train``, ``onetower evaluate``, ``onetower export``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from onetower.cli_common import console, fail
from core.settings import get_settings

app = typer.Typer()


def _config(config: Optional[Path], overrides: dict):
    from training.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def _errors():
    """The errors a command turns into one line: bad data, config, model or unreachable Kafka."""
    from models.errors import ModelError
    from streams.topics import KafkaUnavailable
    from training.config import ConfigError
    from training.dataset import DatasetError
    from training.train import TrainingDiverged

    return (ModelError, KafkaUnavailable, ConfigError, DatasetError, TrainingDiverged, ValueError)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of TrainConfig fields (training/config.py)"),
    output_dir: Optional[Path] = typer.Option(None, help="checkpoints, curves, the trained model and its artifact"),
    base_model: Optional[str] = typer.Option(None, help="'minilm', 'smollm2', a HF name or a path"),
    pooling: Optional[str] = typer.Option(None, help="mean (paper) or lasttoken (ablation)"),
    counts_mode: Optional[str] = typer.Option(None, help="bucket (percentiles, paper) or raw (ablation)"),
    hard_negatives: Optional[int] = typer.Option(None, help="hard negatives per example: 0, 1 or 2"),
    max_seq_length: Optional[int] = typer.Option(None, help="token budget of a text"),
    max_train_examples: Optional[int] = typer.Option(None, help="train on a seeded sample of this many examples"),
    epochs: Optional[float] = typer.Option(None, help="passes over the training examples"),
    max_steps: Optional[int] = typer.Option(None, help="stop after this many steps (overrides epochs)"),
    batch_size: Optional[int] = typer.Option(None, help="examples per device and step (in-batch negatives)"),
    learning_rate: Optional[float] = typer.Option(None),
    temperature: Optional[float] = typer.Option(None, help="InfoNCE temperature (scale = 1/temperature)"),
    logq: Optional[bool] = typer.Option(None, "--logq/--no-logq", help="sampling-bias correction of in-batch negatives (default on)"),
    gradient_cache: Optional[bool] = typer.Option(None, "--gradient-cache/--no-gradient-cache", help="embed in mini-batches (GradCache): large batches in small memory"),
    mini_batch_size: Optional[int] = typer.Option(None, help="gradient cache: texts per forward pass"),
    lora: Optional[bool] = typer.Option(None, "--lora/--no-lora", help="LoRA adapters instead of full fine-tuning"),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    eval_during_training: Optional[bool] = typer.Option(None, "--validate/--no-validate", help="score the validation window during training"),
    eval_steps: Optional[int] = typer.Option(None, help="validate every N steps"),
    save_steps: Optional[int] = typer.Option(None, help="checkpoint every N steps"),
    torch_threads: Optional[int] = typer.Option(None, help="CPU threads for torch"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="continue from the last checkpoint"),
    export: Optional[bool] = typer.Option(None, "--export/--no-export", help="write the models/ artifact at the end"),
    version: Optional[str] = typer.Option(None, help="artifact version"),
    prepare_only: bool = typer.Option(False, "--prepare-only", help="build (or find) the dataset, print its size, stop"),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="train on a prepared dataset directory instead of reading the topics"),
) -> None:
    """Fine-tune the shared tower on point-in-time examples from the Kafka topics (torchrun-compatible)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in locals().items() if k not in ("config", "prepare_only", "dataset")}
    cfg = _config(config, overrides)
    from training.dataset import load_or_build, load_prepared
    from training.train import train as do_train

    try:
        if prepare_only:
            data = load_or_build(get_settings(), cfg.dataset_options())
            table = Table("split", "examples")
            for split, t in data.splits.items():
                table.add_row(split, f"{t.num_rows:,}")
            console.print(table)
            console.print(f"cached in {data.directory}")
            return
        out = do_train(cfg, get_settings(), data=load_prepared(dataset) if dataset else None)
    except _errors() as exc:
        raise fail(str(exc)) from None
    console.print(f"trained model in {out / 'model'}; curves in {out / 'curves.png'}")


@app.command()
def evaluate(
    config: Optional[Path] = typer.Option(None, "--config", help="the training config whose data and base model are evaluated"),
    model: list[str] = typer.Option([], "--model", help="LABEL=DIR: a training output (or checkpoint) to add as a row; repeatable"),
    out: Path = typer.Option(Path("runs/evaluation"), help="where evaluation.md and recall_by_width.png go"),
    max_queries: Optional[int] = typer.Option(2000, help="score a seeded sample of this many test engagements (0: all)"),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="popularity, ALS and the untuned tower"),
    split: str = typer.Option("test", help="test or val"),
    only: Optional[str] = typer.Option(None, "--slice", help="score only this slice's engagements ('cold items', "
                                       "'cold users'); with --max-queries 0, all of them"),
    torch_threads: Optional[int] = typer.Option(None, help="CPU threads for torch"),
) -> None:
    """Recall@10/50/100 and NDCG@10 over the whole catalogue, overall and on cold slices, at every width."""
    import torch

    from training.evaluate import run_evaluation

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if split not in ("test", "val"):
        raise fail(f"--split is {split!r}; expected test or val")
    models: dict[str, Path] = {}
    for spec in model:
        label, sep, directory = spec.rpartition("=")
        if not sep or not label:
            raise fail(f"--model {spec!r}: expected LABEL=DIR")
        models[label] = Path(directory)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    cfg = _config(config, {})
    try:
        table, _ = run_evaluation(get_settings(), cfg, models, out, max_queries=max_queries or None, baselines=baselines,
                                  split=split, only=only)
    except _errors() as exc:
        raise fail(str(exc)) from None
    console.print(table, markup=False, highlight=False)
    console.print(f"written to {out / 'evaluation.md'}, {out / 'evaluation.json'} and {out / 'recall_by_width.png'}")


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="a training output directory (or one of its checkpoints)"),
    out: Path = typer.Option(..., help="the artifact directory to write"),
    version: Optional[str] = typer.Option(None, help="artifact version (letters, digits, '_')"),
    int8: bool = typer.Option(False, "--int8", help="also write a MatMul-int8 graph"),
) -> None:
    """Turn a trained tower into a models/ artifact (HF files, ONNX, manifest) for `onetower reindex --model`."""
    from training.config import read_run
    from training.evaluate import load_trained
    from training.train import export

    try:
        cfg, facts = read_run(run_dir)
        artifact = export(load_trained(run_dir), cfg, out, training_data_range=facts.get("train_range"), version=version, int8=int8)
    except _errors() as exc:
        raise fail(str(exc)) from None
    console.print(f"model {artifact.version} written to {artifact.path}")
