"""Text -> normalised embedding at serving speed: onnxruntime with token-budget batching, or torch for training."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.progress import Progress
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedTokenizerFast

from models.artifact import ModelArtifact
from models.errors import ArtifactError, ModelError
from models.onnx_graph import INPUT_NAMES

Variant = Literal["fp32", "int8", "fp16"]


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, *, max_padding: float = 0.1) -> list[list[int]]:
    """Group text indices so that little padding is computed and padded batches stay within the token budget.

    Longest first; a batch closes when the next text would push its padded size (rows x longest) past
    ``max_batch_tokens`` or when that text is shorter than ``1 - max_padding`` of the batch's longest,
    so at most ``max_padding`` of any batch is padding. A text longer than the budget runs alone.
    """
    if max_batch_tokens < 1:
        raise ModelError(f"max_batch_tokens is {max_batch_tokens}; it must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            longest = lengths[batches[-1][0]]
            if (len(batches[-1]) + 1) * longest <= max_batch_tokens and lengths[i] >= (1 - max_padding) * longest:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the computed token positions that are padding."""
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / computed if computed else 0.0


class _BatchingEncoder(ABC):
    """Tokenise, batch by token budget, run, and put rows back in input order; subclasses run one batch."""

    version: str
    dim: int
    tokenizer: PreTrainedTokenizerFast
    max_seq_length: int
    history_block: int  # how user texts for this model are trimmed (models/render.py)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids as the model sees them (special tokens added, cut at ``max_seq_length``)."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length)["input_ids"]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text with special tokens and without truncation, so an overflow shows."""
        return [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]

    def encode(self, texts: Sequence[str], *, max_batch_tokens: int = 8192, show_progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors, rows in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        batches = plan_batches([len(x) for x in ids], max_batch_tokens)
        with Progress(disable=not show_progress, transient=True) as progress:
            task = progress.add_task("encoding", total=len(texts))
            for batch in batches:
                out[batch] = self._run(*self._pad([ids[i] for i in batch]))
                progress.advance(task, len(batch))
        return out

    def _pad(self, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded int64 ids and attention mask (pooling reads the mask, so the side does not matter)."""
        input_ids = np.full((len(rows), max(map(len, rows))), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros_like(input_ids)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = row
            attention_mask[r, : len(row)] = 1
        return input_ids, attention_mask

    @abstractmethod
    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Embeddings of one padded batch."""


class Encoder(_BatchingEncoder):
    """The serving encoder: one onnxruntime session over an artifact's graph."""

    def __init__(self, artifact: ModelArtifact, session: object, tokenizer: PreTrainedTokenizerFast, variant: Variant) -> None:
        self.artifact = artifact
        self.session = session
        self.tokenizer = tokenizer
        self.variant = variant
        self.version = artifact.version
        self.dim = artifact.manifest.dim
        self.max_seq_length = artifact.manifest.max_seq_length
        self.history_block = artifact.manifest.history_block

    @classmethod
    def load(
        cls,
        model_dir: Path | str,
        *,
        provider: str = "auto",
        variant: Variant = "fp32",
        threads: int | None = None,
    ) -> Encoder:
        """Open an artifact; ``provider`` is 'auto' (CUDA when onnxruntime-gpu sees a GPU), 'cuda' or 'cpu'."""
        import onnxruntime as ort
        from transformers import AutoTokenizer

        artifact = ModelArtifact.load(model_dir)
        graph = artifact.onnx_path(variant)
        available = ort.get_available_providers()
        if provider == "auto":
            provider = "cuda" if "CUDAExecutionProvider" in available else "cpu"
        if provider not in ("cuda", "cpu"):
            raise ModelError(f"provider is {provider!r}; expected 'auto', 'cuda' or 'cpu'")
        if provider == "cuda" and "CUDAExecutionProvider" not in available:
            raise ModelError("provider 'cuda' asked for, but onnxruntime has no CUDA provider (pip install 'onetower[gpu]')")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(graph), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable graphs
            raise ArtifactError(f"{graph}: onnxruntime cannot load this {variant} graph ({str(exc).splitlines()[0]})") from None
        if [i.name for i in session.get_inputs()] != INPUT_NAMES:
            raise ArtifactError(f"{graph}: the graph's inputs are not {INPUT_NAMES}")
        encoder = cls(artifact, session, AutoTokenizer.from_pretrained(artifact.path), variant)
        ids = np.array(encoder.tokenize(["a"]), dtype=np.int64)
        if encoder._run(ids, np.ones_like(ids)).shape != (1, encoder.dim):  # one real run before serving
            raise ArtifactError(f"{graph}: the graph's embeddings are not {encoder.dim}-d as the manifest says")
        return encoder

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self.session.run(None, feeds)[0].astype(np.float32, copy=False)


class TorchEncoder(_BatchingEncoder):
    """The same interface over a SentenceTransformer tower, for training and evaluation (and parity)."""

    def __init__(self, model: SentenceTransformer, *, version: str = "untuned", history_block: int = 1) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.version = version
        self.dim = model.get_embedding_dimension()
        self.max_seq_length = model.max_seq_length
        self.history_block = history_block

    @classmethod
    def load(cls, model_dir: Path | str, *, device: str | None = None) -> TorchEncoder:
        """The torch tower of an artifact."""
        artifact = ModelArtifact.load(model_dir)
        return cls(artifact.load_sentence_transformer(device=device), version=artifact.version,
                   history_block=artifact.manifest.history_block)

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        device = self.model.device
        features = {"input_ids": torch.from_numpy(input_ids).to(device), "attention_mask": torch.from_numpy(attention_mask).to(device)}
        was_training = self.model.training
        self.model.eval()  # no dropout in embeddings, even mid-training
        try:
            with torch.inference_mode():
                return self.model(features)["sentence_embedding"].float().cpu().numpy()
        finally:
            self.model.train(was_training)
