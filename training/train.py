"""Fine-tuning the shared tower: InfoNCE with in-batch and hard negatives inside a Matryoshka loss.

The sentence-transformers trainer does the work (DDP under torchrun, checkpoints, progress bars);
this module turns a ``TrainConfig`` into its dataset, loss and arguments, and writes the curves,
the trained model and the ``models/`` artifact.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
from sentence_transformers.sentence_transformer.trainer import SentenceTransformerTrainer
from sentence_transformers.sentence_transformer.training_args import BatchSamplers, SentenceTransformerTrainingArguments
from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint

from core.errors import OnetowerError
from models.artifact import default_version
from models.tower import build_tower
from models.tuned import TunedTower, add_lora, load_tuned, merge_lora, read_tuned, save_tuned
from core.settings import Settings
from training.config import TrainConfig, save_config
from training.dataset import PointInTimeDataset, load_or_build
from training.evaluate import EvalSet, RecallEvaluator, widths_for
from training.losses import CachedLogQRankingLoss, LogQRankingLoss, SentenceOnlyMatryoshkaLoss

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
ARTIFACT_SUBDIR = "artifact"
TUNED_SUBDIR = "tuned"  # the adapter + head that ships (models/tuned.py)
EVAL_LOSS_EXAMPLES = 128


def pair_dataset(table, hard_negatives: int, *, logq: bool) -> Dataset:
    """(anchor, positive, negative_1..k, label): the layout the ranking loss reads; the label is the
    positive's log sampling frequency (0 without the logQ correction)."""
    columns = {"anchor": table.column("query").to_pylist(), "positive": table.column("positive").to_pylist()}
    for n in range(1, hard_negatives + 1):
        columns[f"negative_{n}"] = table.column(f"negative_{n}").to_pylist()
    columns["label"] = table.column("logq").to_pylist() if logq else [0.0] * table.num_rows
    return Dataset.from_dict(columns)


def make_loss(model: SentenceTransformer, config: TrainConfig) -> MatryoshkaLoss:
    """InfoNCE (scale = 1/temperature; negatives gathered across devices; logQ-corrected unless turned
    off; gradient-cached on request) summed over Matryoshka widths."""
    scale = 1.0 / config.temperature
    inner = LogQRankingLoss(model, scale=scale, gather_across_devices=True)
    if config.gradient_cache:
        inner = CachedLogQRankingLoss(inner, mini_batch_size=config.mini_batch_size)
    dims = widths_for(model.get_embedding_dimension(), config.matryoshka_widths)[::-1]
    return SentenceOnlyMatryoshkaLoss(model, inner, matryoshka_dims=dims)


class TimeBudget(TrainerCallback):
    """Ends training after ``minutes`` of wall time; the run is then saved and evaluated as if complete."""

    def __init__(self, minutes: float) -> None:
        self.deadline = time.monotonic() + 60 * minutes

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline:
            control.should_training_stop = True
        return control


def _bf16(config: TrainConfig) -> bool:
    if config.bf16 is not None:
        return config.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_args(config: TrainConfig, *, has_eval: bool) -> SentenceTransformerTrainingArguments:
    return SentenceTransformerTrainingArguments(
        output_dir=str(config.output_dir / "checkpoints"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_ratio=config.warmup_ratio,
        weight_decay=config.weight_decay,
        bf16=_bf16(config),
        gradient_checkpointing=config.gradient_checkpointing,
        batch_sampler=BatchSamplers.NO_DUPLICATES,  # a duplicate text in a batch would be a false in-batch negative
        dataloader_drop_last=True,  # equal batch shapes on every device for the gathered negatives
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        dataloader_num_workers=config.dataloader_workers,  # tokenisation in worker processes, off the training loop
        dataloader_persistent_workers=config.dataloader_workers > 0,
        seed=config.seed,
        report_to="none",
        disable_tqdm=False,
    )


def train(config: TrainConfig, settings: Settings, *, data: PointInTimeDataset | None = None) -> Path:
    """Train, save the model under ``output_dir/model``, curves and (optionally) the artifact; returns output_dir."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    args = training_args(config, has_eval=config.eval_during_training)
    with args.main_process_first(local=False, desc="point-in-time dataset"):  # under torchrun rank 0 builds, the others read the cache
        data = data or load_or_build(settings, config.dataset_options())
    train_table = data.splits["train"]
    if config.max_train_examples and train_table.num_rows > config.max_train_examples:
        pick = np.sort(np.random.default_rng(config.seed).choice(train_table.num_rows, config.max_train_examples, replace=False))
        train_table = train_table.take(pick)
    train_ds = pair_dataset(train_table, config.hard_negatives, logq=config.logq)
    val = data.splits["val"]
    has_eval = config.eval_during_training and val.num_rows > 0
    if not has_eval:
        args.eval_strategy = IntervalStrategy.NO
    eval_ds = pair_dataset(val.slice(0, EVAL_LOSS_EXAMPLES), config.hard_negatives, logq=config.logq) if has_eval else None
    evaluator = RecallEvaluator(EvalSet.from_dataset(data, "val", max_queries=config.eval_max_queries, seed=config.seed)) if has_eval else None

    model = initial_model(config, settings)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_ds,
                                         eval_dataset=eval_ds, loss=make_loss(model, config), evaluator=evaluator,
                                         callbacks=[TimeBudget(config.max_minutes)] if config.max_minutes else None)
    train_range = [_iso(t) for t in data.meta["train_range_ms"]]
    facts = {"dataset_fingerprint": data.meta.get("fingerprint"), "train_examples": train_ds.num_rows, "train_range": train_range}
    if trainer.is_world_process_zero():
        save_config(config, config.output_dir, facts)  # checkpoints are evaluable while training runs
    last = get_last_checkpoint(str(config.output_dir / "checkpoints")) if config.resume and (config.output_dir / "checkpoints").is_dir() else None
    if last:
        log.info("resuming from %s", last)
    # the step-0 point of the curves (the untuned tower); train() starts a fresh log, so it is kept here
    untuned = [{**trainer.evaluate(), "step": 0}] if has_eval and last is None else []
    trainer.train(resume_from_checkpoint=last)
    check_converged(trainer.state.log_history)
    if has_eval:
        trainer.evaluate()
    if not trainer.is_world_process_zero():
        return config.output_dir
    if config.lora:
        save_tuned(model, config.output_dir / TUNED_SUBDIR, tuned_facts(config, facts, trainer.state.global_step))
        merge_lora(model)
    model.save(str(config.output_dir / MODEL_SUBDIR))
    save_config(config, config.output_dir, {**facts, "steps": trainer.state.global_step})
    history = untuned + trainer.state.log_history
    (config.output_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    plot_curves(history, config.output_dir / "curves.png")
    if config.export:
        export(model, config, config.output_dir / ARTIFACT_SUBDIR, training_data_range=train_range)
    return config.output_dir


def initial_model(config: TrainConfig, settings: Settings) -> SentenceTransformer:
    """The tower training starts from: the untuned base (with a fresh adapter under LoRA), or a tuned
    tower's adapter and head (``init_from``), whose shape must be the config's."""
    if config.init_from is None:
        model = build_tower(config.base_model, dim=config.dim, max_seq_length=config.max_seq_length, pooling=config.pooling,
                            cache_dir=settings.cache_dir)
        if config.lora:
            add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
        return model
    tower = read_tuned(config.init_from)
    shape = {"base_model": config.base_model, "dim": config.dim, "max_seq_length": config.max_seq_length, "pooling": config.pooling}
    differ = {k: (getattr(tower, k), v) for k, v in shape.items() if getattr(tower, k) != v}
    if differ:
        raise OnetowerError(f"init_from {config.init_from} differs from the config in {differ} (tower, config)")
    return load_tuned(config.init_from, settings.cache_dir, trainable=True)


class TrainingDiverged(OnetowerError):
    """The loss or the gradient became NaN/inf: the weights are garbage and must not be saved as a model."""


def check_converged(history: list[dict]) -> None:
    """Refuse a run whose logged loss or gradient norm went non-finite (lower the learning rate)."""
    bad = next((h for h in history if any(k in h and not np.isfinite(h[k]) for k in ("loss", "grad_norm"))), None)
    if bad is not None:
        raise TrainingDiverged(f"training diverged at step {bad.get('step')} (loss {bad.get('loss')}, gradient norm "
                               f"{bad.get('grad_norm')}); lower learning_rate or raise warmup_ratio")


def tuned_facts(config: TrainConfig, facts: dict, steps: int) -> TunedTower:
    """The shipped tower's description: its base, shape and how it was trained."""
    recipe = config.model_dump(mode="json", exclude={"output_dir", "resume", "export"})
    return TunedTower(version=config.version or default_version(config.base_model), base_model=config.base_model,
                      dim=config.dim, max_seq_length=config.max_seq_length, history_block=config.history_block,
                      pooling=config.pooling, training={**recipe, **facts, "steps": steps})


def export(model: SentenceTransformer, config: TrainConfig, out_dir: Path, *, training_data_range: list[str] | None = None,
           version: str | None = None, int8: bool = False):
    """A trained tower as a ``models/`` artifact: HF files, ONNX graph, manifest with a new version."""
    from models.export import export_artifact

    span = tuple(datetime.fromisoformat(t) for t in training_data_range) if training_data_range else None
    return export_artifact(model, out_dir, version=version or config.version, base_model=config.base_model, int8=int8,
                           training_data_range=span, overwrite=True, history_block=config.history_block)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()


def plot_curves(history: list[dict], path: Path) -> None:
    """Training and validation loss, and validation recall@10 at every width, by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "validation loss")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax_loss.plot(*zip(*pts), marker="." if key == "eval_loss" else None, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("Matryoshka InfoNCE loss")
    ax_loss.legend()
    keys = sorted({k for h in history for k in h if k.startswith("eval_val_recall@10_")},
                  key=lambda k: (k.endswith("full"), int(k.rsplit("_", 1)[1]) if not k.endswith("full") else 0))
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        ax_rec.plot(*zip(*pts), marker="o", label=key.rsplit("_", 1)[1])
    ax_rec.set_xlabel("step")
    ax_rec.set_ylabel("validation recall@10")
    ax_rec.legend(title="width")
    for ax in (ax_loss, ax_rec):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)

