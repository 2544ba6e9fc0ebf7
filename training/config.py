"""The training recipe: one YAML file (every field optional), overridable by CLI flags, checked up front."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import OnetowerError
from models.render import HISTORY_BLOCK_CAUSAL
from training.dataset import DatasetOptions

CONFIG_FILE = "training_config.json"  # written next to the trained model: evaluation rebuilds its inputs from it


class ConfigError(OnetowerError, ValueError):
    """A config file or flag that cannot be used; the message names the field."""


class TrainConfig(BaseModel):
    """Data, model and optimisation settings of one training run."""

    model_config = ConfigDict(extra="forbid")

    # data (see DatasetOptions)
    since: AwareDatetime | None = Field(default=None, description="first event time read (ISO 8601 with zone)")
    until: AwareDatetime | None = Field(default=None, description="events at or after this time are not read")
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    history_len: int = Field(default=50, ge=1)
    counts_mode: Literal["bucket", "raw"] = "bucket"
    hard_negatives: int = Field(default=2, ge=0, le=8, description="0/1/2 for the paper's ablation")
    max_train_examples: int | None = Field(default=None, ge=1, description="a seeded random sample of the training split")
    counter_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of training item texts written with a "
                                   "never-engaged item's counters (cold items)")

    # model
    base_model: str = "minilm"
    pooling: Literal["mean", "lasttoken"] = "mean"
    dim: int = Field(default=512, ge=8)
    max_seq_length: int = Field(default=256, ge=16)
    history_block: int = Field(default=1, ge=1, description="entries a user history is trimmed by (models/render.py): "
                               f"{HISTORY_BLOCK_CAUSAL} for a causal tower served with incremental re-encoding")
    lora: bool = Field(default=False, description="train LoRA adapters instead of all weights: the tower then ships as a few MB (models/tuned.py)")
    init_from: Path | None = Field(default=None, description="a tuned tower (models/tuned.py) whose adapter and head training "
                                   "continues from, e.g. models/shipped/minilm_logq_v1 (needs lora: true and its shape)")
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)

    # loss
    temperature: float = Field(default=0.05, gt=0.0, le=1.0, description="InfoNCE temperature; the loss scale is 1/temperature")
    matryoshka_widths: list[int] = Field(default=[64, 128, 256, 512], description="the full width is always added")
    logq: bool = Field(default=True, description="subtract log(sampling frequency) from in-batch logits (Yi et al. 2019)")
    gradient_cache: bool = Field(default=False, description="GradCache: embed mini_batch_size texts at a time, so a large "
                                 "batch (more in-batch negatives) fits in the memory of a small one; same loss, one more forward")
    mini_batch_size: int = Field(default=32, ge=1, description="gradient cache: texts per forward pass")

    # optimisation
    epochs: float = Field(default=1.0, gt=0.0)
    max_steps: int = Field(default=-1, description="stop after this many steps (-1: run the epochs)")
    max_minutes: float | None = Field(default=None, gt=0.0, description="stop (and save) after this much training time")
    batch_size: int = Field(default=32, ge=2)
    learning_rate: float = Field(default=5e-5, gt=0.0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    bf16: bool | None = Field(default=None, description="None: on where the GPU supports it")
    gradient_checkpointing: bool = False
    seed: int = 0
    torch_threads: int | None = Field(default=None, ge=1)
    dataloader_workers: int = Field(default=0, ge=0, description="processes that tokenise batches ahead of the GPU")

    # bookkeeping
    output_dir: Path = Path("runs/onetower")
    logging_steps: int = Field(default=10, ge=1)
    eval_during_training: bool = Field(default=True, description="score the validation window at the start, every eval_steps and at the end")
    eval_steps: int = Field(default=100, ge=1)
    eval_max_queries: int = Field(default=500, ge=1, description="validation queries scored at every evaluation")
    save_steps: int = Field(default=100, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    resume: bool = Field(default=True, description="continue from the last checkpoint in output_dir")
    export: bool = Field(default=True, description="write a models/ artifact (HF files, ONNX, manifest) at the end")
    version: str | None = Field(default=None, description="artifact version (default: derived by models.artifact)")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        bad = [w for w in self.matryoshka_widths if not 0 < w <= self.dim]
        if bad:
            raise ValueError(f"matryoshka_widths {bad} must lie in 1..dim ({self.dim})")
        if self.gradient_cache and self.mini_batch_size > self.batch_size:
            raise ValueError("mini_batch_size must not exceed batch_size")
        if self.init_from is not None and not self.lora:
            raise ValueError("init_from continues a tuned tower's LoRA adapter: pass lora: true with it")
        self.dataset_options()  # fail now on bad data options, not after loading a model
        return self

    def dataset_options(self) -> DatasetOptions:
        """The dataset recipe: negatives are always built for 2, training uses the first ``hard_negatives``."""
        return DatasetOptions(
            hard_negatives=max(2, self.hard_negatives), counts_mode=self.counts_mode, history_len=self.history_len,
            base_model=self.base_model, max_seq_length=self.max_seq_length, history_block=self.history_block,
            counter_dropout=self.counter_dropout, val_fraction=self.val_fraction,
            test_fraction=self.test_fraction, seed=self.seed,
            since_ms=_ms(self.since), until_ms=_ms(self.until),
        )


def _ms(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp() * 1000)


def _error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    where = ".".join(map(str, err["loc"])) or "config"
    return ConfigError(f"{where}: {err['msg']}")


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The config file (when given) with flag overrides on top; raises ConfigError with one line."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise _error(exc) from None


def save_config(config: TrainConfig, directory: Path, extra: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps({**config.model_dump(mode="json"), **extra}, indent=2))


def read_run(directory: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The config a training output directory (or one of its ``checkpoints/checkpoint-N``) was made with,
    and the facts recorded with it (dataset fingerprint, training range, steps)."""
    path = next((d / CONFIG_FILE for d in (directory, directory.parent.parent) if (d / CONFIG_FILE).is_file()), None)
    if path is None:
        raise ConfigError(f"{directory} is not a training output (no {CONFIG_FILE}); train it with `onetower train`")
    data = json.loads(path.read_text())
    config = TrainConfig.model_validate({k: v for k, v in data.items() if k in TrainConfig.model_fields})
    return config, {k: v for k, v in data.items() if k not in TrainConfig.model_fields}
