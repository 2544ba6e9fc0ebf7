"""A fine-tuned tower shipped as a few MB: a LoRA adapter plus the head over a base model from a wheel.

The directory holds ``adapter/`` (peft: LoRA on the attention and MLP projections, and the marker
tokens' embedding rows), ``head.safetensors`` (the trained modules after pooling, e.g. the
projection) and ``tuned.json`` (the base and the tower's shape). Loading rebuilds the untuned tower
with ``build_tower`` (deterministic: seeded marker rows and projection), applies the adapter and
merges it, so the result is a plain sentence-transformers model that exports to one ONNX graph.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

from core.settings import DEFAULT_CACHE_DIR
from models.errors import ModelError
from models.render import PROMPT_FORMAT_VERSION
from models.tower import build_tower

TUNED_FILE = "tuned.json"
ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"


class TunedTower(BaseModel):
    """What ``build_tower`` needs to rebuild the base the adapter was trained on."""

    version: str
    base_model: str
    dim: int
    max_seq_length: int
    history_block: int = 1  # as its training data was rendered (models/render.py)
    pooling: Literal["mean", "lasttoken"]
    prompt_format_version: str = PROMPT_FORMAT_VERSION
    training: dict = {}


def add_lora(model: SentenceTransformer, *, r: int, alpha: int, dropout: float) -> None:
    """LoRA on every linear layer of the transformer; the added marker tokens' rows stay trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    transformer = model[0]
    base = transformer.auto_model
    embeddings = base.get_input_embeddings()
    embed_name = next(name for name, module in base.named_modules() if module is embeddings).split(".")[-1]
    markers = list(transformer.tokenizer.additional_special_tokens_ids)
    config = LoraConfig(task_type=TaskType.FEATURE_EXTRACTION, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="all-linear", trainable_token_indices={embed_name: markers})
    transformer.model = get_peft_model(base, config)  # auto_model is a read-only view of .model


def merge_lora(model: SentenceTransformer) -> None:
    """Fold the adapter into the weights: the saved model and its ONNX graph are plain."""
    transformer = model[0]
    if hasattr(transformer.auto_model, "merge_and_unload"):
        transformer.model = transformer.auto_model.merge_and_unload()


def _head(model: SentenceTransformer) -> torch.nn.Module:
    return torch.nn.ModuleList(list(model)[1:])


def save_tuned(model: SentenceTransformer, out_dir: Path, tower: TunedTower) -> Path:
    """Write the adapter, the head and ``tuned.json``; the model must still carry its (unmerged) adapter."""
    auto = model[0].auto_model
    if not hasattr(auto, "peft_config"):
        raise ModelError("the tower has no LoRA adapter to save (train with lora: true)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the base's resized embeddings are rebuilt by build_tower (seeded); only the marker rows' deltas ship
    auto.save_pretrained(str(out_dir / ADAPTER_DIR), save_embedding_layers=False)
    (out_dir / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's model-card template, empty here
    weights = out_dir / ADAPTER_DIR / "adapter_model.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}, str(weights))  # half the bytes; LoRA deltas are small
    head = {k: v.detach().cpu().contiguous() for k, v in _head(model).state_dict().items()}
    save_file(head, str(out_dir / HEAD_FILE))
    (out_dir / TUNED_FILE).write_text(tower.model_dump_json(indent=2))
    return out_dir


def read_tuned(path: Path) -> TunedTower:
    try:
        return TunedTower.model_validate_json((Path(path) / TUNED_FILE).read_bytes())
    except FileNotFoundError:
        raise ModelError(f"{path}: not a tuned tower (no {TUNED_FILE})") from None


def load_tuned(path: Path, cache_dir: Path = DEFAULT_CACHE_DIR, *, trainable: bool = False) -> SentenceTransformer:
    """The merged tuned tower on CPU, in eval mode (``cache_dir``: where converted base models live); with
    ``trainable`` the adapter stays unmerged and trainable, for training to continue from it."""
    from peft import PeftModel

    path = Path(path)
    tower = read_tuned(path)
    if tower.prompt_format_version != PROMPT_FORMAT_VERSION:
        raise ModelError(f"{path}: trained on prompt format {tower.prompt_format_version}, this code renders {PROMPT_FORMAT_VERSION}")
    model = build_tower(tower.base_model, dim=tower.dim, max_seq_length=tower.max_seq_length, pooling=tower.pooling,
                        cache_dir=cache_dir)
    transformer = model[0]
    adapted = PeftModel.from_pretrained(transformer.auto_model, str(path / ADAPTER_DIR), is_trainable=trainable)
    transformer.model = adapted if trainable else adapted.merge_and_unload()
    _head(model).load_state_dict(load_file(str(path / HEAD_FILE)), strict=True)
    if not trainable:
        model.eval()
    return model


# ---------------------------------------------------------------- the towers that ship with onetower

SHIPPED_DIR = Path(__file__).parent / "shipped"
DEFAULT_TOWER = "minilm_logq_v2"  # served when no model directory is given; see models/shipped/README.md


def shipped(name: str = DEFAULT_TOWER) -> Path:
    """A tuned tower committed under ``models/shipped/``."""
    path = SHIPPED_DIR / name
    if not (path / TUNED_FILE).is_file():
        known = sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / TUNED_FILE).is_file()) if SHIPPED_DIR.is_dir() else []
        raise ModelError(f"no shipped tower {name!r} (shipped: {', '.join(known) or 'none'})")
    return path


def served_artifact(models_dir: Path, tuned_dir: Path | None = None, *, int8: bool = False,
                    cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The ONNX artifact of a tuned tower (default: the shipped default), exported once into
    ``models_dir/<version>`` and reused; the adapter is merged into the graph."""
    from models.artifact import MANIFEST, ModelArtifact
    from models.export import export_artifact

    tuned_dir = tuned_dir or shipped()
    tower = read_tuned(tuned_dir)
    out = Path(models_dir) / tower.version
    if (out / MANIFEST).is_file():
        return ModelArtifact.load(out).path
    span = tower.training.get("train_range")
    artifact = export_artifact(load_tuned(tuned_dir, cache_dir), out, version=tower.version, base_model=tower.base_model, int8=int8,
                               history_block=tower.history_block, training_data_range=tuple(datetime.fromisoformat(t) for t in span) if span else None)
    return artifact.path
