"""One ONNX graph from (input_ids, attention_mask) to the final normalised embedding, and its variants."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedModel

ONNX_OPSET = 17
TWO_GB = 2**31
INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAME = "embedding"


class _EmbeddingGraph(torch.nn.Module):
    """The whole tower (transformer, pooling, projection/truncation, normalisation) as tensors in, tensor out."""

    def __init__(self, model: SentenceTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]


@contextmanager
def _traceable_masks() -> Iterator[None]:
    """transformers >= 4.53 builds attention masks with vmap, which TorchScript cannot trace; swap in
    optimum-onnx's vmap-free versions while exporting (what optimum's own exporter does)."""
    from optimum.exporters.onnx.model_patcher import (
        eager_mask_without_vmap,
        find_packed_sequence_indices_patched,
        sdpa_mask_without_vmap,
    )
    from transformers import masking_utils

    registry = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    saved = registry["sdpa"], registry["eager"], masking_utils.find_packed_sequence_indices
    registry.register("sdpa", sdpa_mask_without_vmap)
    registry.register("eager", eager_mask_without_vmap)
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices_patched
    try:
        yield
    finally:
        registry.register("sdpa", saved[0])
        registry.register("eager", saved[1])
        masking_utils.find_packed_sequence_indices = saved[2]


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def export_onnx(model: SentenceTransformer, path: Path, *, external_data: bool | None = None) -> Path | None:
    """Export the tower (moved to CPU, eval mode) with dynamic batch and sequence axes.

    Weights go to ``<name>.data`` beside the graph when ``external_data`` is set, or by default when they
    pass protobuf's 2 GB limit. Returns the data file, if any.
    """
    model.to("cpu").eval()
    tokenizer = model.tokenizer
    dummy = tokenizer(["an example", "a longer example text, padded"], padding=True, return_tensors="pt")
    if external_data is None:
        external_data = parameter_bytes(model) >= TWO_GB
    with (
        tempfile.TemporaryDirectory(dir=path.parent) as scratch,
        _traceable_masks(),
        torch.inference_mode(),
        warnings.catch_warnings(),
    ):
        # The tracer notes shapes it bakes in; the dummy batch is padded, so every baked branch is the
        # general masked one (parity is checked after export). The legacy exporter warns it is legacy.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")  # indices are never negative here
        raw = Path(scratch) / "raw.onnx"
        torch.onnx.export(
            _EmbeddingGraph(model),
            (dummy["input_ids"], dummy["attention_mask"]),
            str(raw),
            input_names=INPUT_NAMES,
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                OUTPUT_NAME: {0: "batch"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,  # the dynamo exporter needs onnxscript, which is not a dependency
            do_constant_folding=True,
        )
        if not external_data:
            shutil.move(raw, path)
            return None
        data = path.with_name(path.name + ".data")
        onnx.save_model(onnx.load(raw), path, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
        return data


def export_decoder(model: PreTrainedModel, directory: Path) -> Path:
    """Export a causal LM as one step of a decoder: (input_ids, attention_mask, position_ids, past keys/values)
    in, (last hidden states, present keys/values) out, for incremental re-encoding. optimum's exporter and
    its config for the architecture, with the past as inputs; writes ``model.onnx`` (and its
    ``model.onnx_data`` past 2 GB) into ``directory`` and returns the graph's path."""
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.tasks import TasksManager

    task = "feature-extraction-with-past"
    config = TasksManager.get_exporter_config_constructor("onnx", model=model, task=task, library_name="transformers")(
        model.config, use_past_in_inputs=True)
    model.to("cpu").eval()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes it bakes in are checked by the export's parity
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")  # indices are never negative here
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter warns it is legacy
        # A dummy of several new tokens over a past, so the traced masks are the general causal ones.
        onnx_export_from_model(model, output=scratch, task=task, custom_onnx_configs={"model": config},
                               do_validation=False, batch_size=2, sequence_length=7)
        graph = onnx.load(Path(scratch) / "model.onnx", load_external_data=False)
        # optimum declares one new token per step (generation); here a step appends a whole entry.
        graph.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "sequence_length"
        onnx.save_model(graph, directory / "model.onnx")
        if (Path(scratch) / "model.onnx_data").is_file():
            shutil.move(Path(scratch) / "model.onnx_data", directory / "model.onnx_data")
    return directory / "model.onnx"


def quantize_int8(fp32: Path, out: Path, *, external_data: bool) -> None:
    """Dynamic int8, MatMul only, per output channel: quantising every op cost far more accuracy here."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        fp32,
        out,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        use_external_data_format=external_data,
    )


def convert_fp16(fp32: Path, out: Path, *, external_data: bool) -> None:
    """fp16 weights and activations for GPUs; inputs and the output stay as they are."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(fp32), keep_io_types=True, disable_shape_infer=external_data)
    kwargs = {"save_as_external_data": True, "all_tensors_to_one_file": True, "location": out.name + ".data"}
    onnx.save_model(model, out, **(kwargs if external_data else {}))
