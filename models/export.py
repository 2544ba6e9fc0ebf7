"""Writing a model version: the sentence-transformers files, its ONNX graphs and a manifest, checked for parity.

Separate from ``models.artifact`` (reading a version) because the parity check runs the runtime
(``models.encoder``), which itself reads artifacts.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling

from core.settings import MATRYOSHKA_WIDTHS
from models.artifact import MANIFEST, MIN_FP32_PARITY, ONNX_FILES, VERSION_PATTERN, Manifest, ModelArtifact, OnnxFile, default_version
from models.encoder import Encoder, TorchEncoder
from models.errors import ArtifactError
from models.onnx_graph import convert_fp16, export_decoder, export_onnx, parameter_bytes, quantize_int8
from models.render import PROMPT_FORMAT_VERSION, render_item, render_user
from models.samples import sample_items, sample_users
from models.tower import history_block_for, is_causal


def probe_texts() -> list[str]:
    """Item and user texts of varied lengths for the export's parity check (users overflow and get truncated)."""
    items = [render_item(f, c) for f, c in sample_items(12, seed=1)]
    users = [render_user(p, h) for p, h in sample_users(4, seed=1, history=(1, 40))]
    return items + users


def _onnx_entry(root: Path, file: str, data_file: str | None = None) -> OnnxFile:
    data = root / (data_file or f"{file}.data")
    return OnnxFile(
        file=file,
        bytes=(root / file).stat().st_size,
        data_file=str(data.relative_to(root)) if data.is_file() else None,
        data_bytes=data.stat().st_size if data.is_file() else None,
    )


def _parity(texts: list[str], reference: np.ndarray, root: Path, variants: list[str]) -> dict[str, float | None]:
    """Min cosine between each ONNX variant and torch's ``reference`` vectors of ``texts``; None where this
    machine cannot run the variant."""
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


def _decoder_parity(model: SentenceTransformer, texts: list[str], reference: np.ndarray, root: Path, file: str) -> float:
    """Min cosine between the incremental encoder on the ONNX decoder and torch's full encode of ``texts``
    (``reference``), each encoded twice: from an empty cache, then again after its first half (a past reused)."""
    from models.incremental import IncrementalEncoder, OnnxDecoder

    keys = [str(i) for i in range(len(texts))]
    encoder = IncrementalEncoder(model, version="parity", decoder=OnnxDecoder(root / file))
    first = encoder.encode(keys, texts)
    encoder.cache.clear()
    encoder.encode(keys, [text[: len(text) // 2] for text in texts])
    again = encoder.encode(keys, texts)
    return round(float(min(np.sum(reference * first, axis=1).min(), np.sum(reference * again, axis=1).min())), 6)


def export_artifact(
    model: SentenceTransformer,
    out_dir: Path,
    *,
    version: str | None = None,
    base_model: str,
    int8: bool = False,
    fp16: bool = False,
    decoder: bool = True,
    training_data_range: tuple[datetime, datetime] | None = None,
    widths: Sequence[int] = MATRYOSHKA_WIDTHS,
    external_data: bool | None = None,
    overwrite: bool = False,
    history_block: int | None = None,
) -> ModelArtifact:
    """Write a complete artifact atomically (a scratch directory renamed into place) and check its parity.

    The fp32 graph must match torch (min cosine >= 0.999 on probe texts) or nothing is written.
    ``decoder``: also write a causal, mean-pooled tower's decoder graph with past keys/values (for incremental
    re-encoding; as large as the model).
    ``history_block``: how the model's user texts are trimmed (default: ``history_block_for`` the tower);
    a trained tower passes what its training data was rendered with.
    """
    out_dir = Path(out_dir)
    version = version or default_version(base_model)
    if not re.fullmatch(VERSION_PATTERN, version):
        raise ArtifactError(f"version {version!r} may hold only letters, digits and '_' (64 at most): it names Milvus collections")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ArtifactError(f"{out_dir} is not empty; choose another directory or overwrite it")
    dim = model.get_embedding_dimension()
    pooling = next(m for m in model if isinstance(m, Pooling)).pooling_mode
    pooling = pooling[0] if isinstance(pooling, (list, tuple)) else pooling
    widths = sorted({dim, *(w for w in widths if w < dim)}, reverse=True)
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
        decoder_file = None
        if decoder and is_causal(model) and pooling == "mean":
            graph = export_decoder(model[0].auto_model, tmp / "decoder").relative_to(tmp)
            decoder_file = _onnx_entry(tmp, str(graph), f"{graph}_data")
        manifest = Manifest(
            version=version,
            base_model=base_model,
            dim=dim,
            widths=widths,
            prompt_format_version=PROMPT_FORMAT_VERSION,
            pooling=pooling,
            max_seq_length=model.max_seq_length,
            history_block=history_block or history_block_for(model),
            training_data_range=training_data_range,
            created_at=datetime.now(UTC),
            onnx={v: _onnx_entry(tmp, ONNX_FILES[v]) for v in variants},
            decoder=decoder_file,
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        texts = probe_texts()
        reference = TorchEncoder(model).encode(texts)
        manifest.parity = _parity(texts, reference, tmp, variants)
        if decoder_file is not None:
            manifest.parity["decoder"] = _decoder_parity(model, texts, reference, tmp, decoder_file.file)
        if min(manifest.parity[v] for v in ["fp32", *(["decoder"] if decoder_file else [])]) < MIN_FP32_PARITY:
            raise ArtifactError(f"ONNX export does not match torch: min cosine {manifest.parity} < {MIN_FP32_PARITY}")
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelArtifact.load(out_dir)
