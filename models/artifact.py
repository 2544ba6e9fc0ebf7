"""A model version as a directory: Hugging Face / sentence-transformers files, ONNX graphs, and a manifest."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError
from sentence_transformers import SentenceTransformer

from models.errors import ArtifactError
from models.render import PROMPT_FORMAT_VERSION

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
    history_block: int = Field(default=1, ge=1, description="entries a user's history is trimmed by at the token budget (models/render.py)")
    training_data_range: tuple[datetime, datetime] | None = None
    created_at: datetime
    onnx: dict[Literal["fp32", "int8", "fp16"], OnnxFile]
    decoder: OnnxFile | None = Field(default=None, description="a causal tower's decoder graph with past keys/values, "
                                     "for incremental re-encoding (models/incremental.py)")
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
        for entry in [*manifest.onnx.values(), *([manifest.decoder] if manifest.decoder else [])]:
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

    @property
    def decoder_path(self) -> Path:
        if self.manifest.decoder is None:
            raise ArtifactError(f"model {self.version} has no decoder graph (only causal towers exported by this version have one)")
        return self.path / self.manifest.decoder.file

    def load_sentence_transformer(self, device: str | None = None) -> SentenceTransformer:
        """The torch tower, e.g. to fine-tune it further."""
        model = SentenceTransformer(str(self.path), device=device or "cpu")
        model.eval()
        return model


def default_version(base_model: str) -> str:
    """``<base>_<UTC time>``, e.g. minilm_20250101_120000."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(base_model.rstrip("/")).name).strip("_").lower() or "model"
    return f"{slug[:40]}_{datetime.now(UTC):%Y%m%d_%H%M%S}"
