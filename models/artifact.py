"""A model version as a directory: Hugging Face / sentence-transformers files, ONNX graphs, and a manifest."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from models.errors import ArtifactError
from models.onnx_graph import convert_fp16, export_onnx, parameter_bytes, quantize_int8
from models.render import PROMPT_FORMAT_VERSION, render_item, render_user
from models.samples import sample_items, sample_users
from onetower.settings import get_settings

MANIFEST = "manifest.json"
ONNX_FILES = {"fp32": "model.onnx", "int8": "model_int8.onnx", "fp16": "model_fp16.onnx"}
MIN_FP32_PARITY = 0.999
VERSION_PATTERN = r"^[A-Za-z0-9_]{1,64}$"  # becomes part of Milvus collection names (items__<version>)


class OnnxFile(BaseModel):
    file: str
    bytes: int
    data_file: str | None = None
    data_bytes: int | None = None


class Manifest(BaseModel):
    """What a model version is: enough to refuse a mismatched one before it writes a single vector."""

    format: Literal[1] = 1
    version: str = Field(pattern=VERSION_PATTERN)
    base_model: str
    dim: int = Field(ge=1)
    widths: list[int]
    prompt_format_version: str
    pooling: Literal["mean", "lasttoken"]
    max_seq_length: int = Field(ge=1)
    training_data_range: tuple[datetime, datetime] | None = None
    created_at: datetime
    onnx: dict[Literal["fp32", "int8", "fp16"], OnnxFile]
    parity: dict[str, float | None] = Field(default_factory=dict, description="min cosine vs torch on probe texts")


@dataclass(frozen=True)
class ModelArtifact:
    path: Path
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @classmethod
    def load(cls, path: Path | str) -> ModelArtifact:
        """Read and check an artifact directory; anything missing, corrupt or mismatched is an ArtifactError."""
        path = Path(path)
        if not path.is_dir():
            raise ArtifactError(f"{path}: no model artifact here (not a directory); create one with `onetower model export`")
        try:
            manifest = Manifest.model_validate_json((path / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise ArtifactError(f"{path}: no {MANIFEST}, so this is not a model artifact (`onetower model export` makes one)") from None
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ArtifactError(f"{path / MANIFEST} is corrupt: {'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}") from None
        if manifest.prompt_format_version != PROMPT_FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: model {manifest.version} was trained on prompt format {manifest.prompt_format_version}, "
                f"this code renders format {PROMPT_FORMAT_VERSION}; export or train a model for this code"
            )
        if "fp32" not in manifest.onnx or not (path / "modules.json").is_file():
            raise ArtifactError(f"{path}: incomplete artifact (needs modules.json and an fp32 ONNX graph)")
        for entry in manifest.onnx.values():
            for name, size in ((entry.file, entry.bytes), (entry.data_file, entry.data_bytes)):
                if name is not None and (not (path / name).is_file() or (path / name).stat().st_size != size):
                    found = (path / name).stat().st_size if (path / name).is_file() else "no file"
                    raise ArtifactError(f"{path / name}: missing or truncated (manifest says {size} bytes, found {found})")
        return cls(path=path, manifest=manifest)

    def onnx_path(self, variant: str) -> Path:
        if variant not in self.manifest.onnx:
            raise ArtifactError(
                f"model {self.version} has no {variant} graph (it has {', '.join(self.manifest.onnx)}); "
                f"export with --{variant}"
            )
        return self.path / self.manifest.onnx[variant].file

    def load_sentence_transformer(self, device: str | None = None) -> SentenceTransformer:
        """The torch tower, e.g. to fine-tune it further."""
        model = SentenceTransformer(str(self.path), device=device or "cpu")
        model.eval()
        return model


def default_version(base_model: str) -> str:
    """``<base>_<UTC time>``, e.g. minilm_20250101_120000."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(base_model.rstrip("/")).name).strip("_").lower() or "model"
    return f"{slug[:40]}_{datetime.now(UTC):%Y%m%d_%H%M%S}"


def probe_texts() -> list[str]:
    """Item and user texts of varied lengths for the export's parity check (users overflow and get truncated)."""
    items = [render_item(f, c) for f, c in sample_items(12, seed=1)]
    users = [render_user(p, h) for p, h in sample_users(4, seed=1, history=(1, 40))]
    return items + users


def _onnx_entry(root: Path, file: str) -> OnnxFile:
    data = root / f"{file}.data"
    return OnnxFile(
        file=file,
        bytes=(root / file).stat().st_size,
        data_file=data.name if data.is_file() else None,
        data_bytes=data.stat().st_size if data.is_file() else None,
    )


def _parity(model: SentenceTransformer, root: Path, variants: list[str]) -> dict[str, float | None]:
    """Min cosine between each ONNX variant and torch; None where this machine cannot run the variant."""
    from models.encoder import Encoder, TorchEncoder

    texts = probe_texts()
    reference = TorchEncoder(model).encode(texts)
    parity: dict[str, float | None] = {}
    for variant in variants:
        try:
            got = Encoder.load(root, variant=variant).encode(texts)
        except ArtifactError:
            if variant != "fp16":
                raise
            parity[variant] = None  # fp16 kernels are a GPU thing; onnxruntime's CPU provider may refuse the graph
            continue
        parity[variant] = round(float(np.min(np.sum(reference * got, axis=1))), 6)
    return parity


def export_artifact(
    model: SentenceTransformer,
    out_dir: Path,
    *,
    version: str | None = None,
    base_model: str,
    int8: bool = False,
    fp16: bool = False,
    training_data_range: tuple[datetime, datetime] | None = None,
    widths: list[int] | None = None,
    external_data: bool | None = None,
    overwrite: bool = False,
) -> ModelArtifact:
    """Write a complete artifact atomically (a scratch directory renamed into place) and check its parity.

    The fp32 graph must match torch (min cosine >= 0.999 on probe texts) or nothing is written.
    """
    out_dir = Path(out_dir)
    version = version or default_version(base_model)
    if not re.fullmatch(VERSION_PATTERN, version):
        raise ArtifactError(f"version {version!r} may hold only letters, digits and '_' (64 at most): it names Milvus collections")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ArtifactError(f"{out_dir} is not empty; choose another directory or overwrite it")
    dim = model.get_embedding_dimension()
    pooling = next(m for m in model if isinstance(m, Pooling)).pooling_mode
    widths = sorted({dim, *(w for w in (widths or get_settings().matryoshka_widths) if w < dim)}, reverse=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save(str(tmp))
        if external_data is None:
            external_data = parameter_bytes(model) >= 2**31
        export_onnx(model, tmp / ONNX_FILES["fp32"], external_data=external_data)
        if int8:
            quantize_int8(tmp / ONNX_FILES["fp32"], tmp / ONNX_FILES["int8"], external_data=external_data)
        if fp16:
            convert_fp16(tmp / ONNX_FILES["fp32"], tmp / ONNX_FILES["fp16"], external_data=external_data)
        variants = ["fp32"] + (["int8"] if int8 else []) + (["fp16"] if fp16 else [])
        manifest = Manifest(
            version=version,
            base_model=base_model,
            dim=dim,
            widths=widths,
            prompt_format_version=PROMPT_FORMAT_VERSION,
            pooling=pooling[0] if isinstance(pooling, (list, tuple)) else pooling,
            max_seq_length=model.max_seq_length,
            training_data_range=training_data_range,
            created_at=datetime.now(UTC),
            onnx={v: _onnx_entry(tmp, ONNX_FILES[v]) for v in variants},
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        manifest.parity = _parity(model, tmp, variants)
        if manifest.parity["fp32"] < MIN_FP32_PARITY:
            raise ArtifactError(f"ONNX export does not match torch: min cosine {manifest.parity['fp32']} < {MIN_FP32_PARITY}")
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelArtifact.load(out_dir)
