"""Incremental re-encoding for causal towers: a refresh computes the tokens after the first one that changed.

A causal LM's states for a prefix do not change when tokens after it change. A user's text only grows
at its end when an engagement arrives (see ``models/render.py``); an item's text changes in its
counters, which come after its features. So per entity the token ids encoded so far, their
keys/values and the running sums of the last layer's states (mean pooling) are kept; a new text
reuses the longest prefix it shares with the cached ids and only the rest goes through the model, on
top of the prefix's keys/values. An append (the cached ids are a prefix of the new ones) is a hit; a
text that changed inside (a user's profile, a history trimmed at the token budget, an item's
counters) is a miss by reason "diverged" that still reuses the shared prefix; an absent entry or
another model version is a full encode. Trimming in blocks (``models/render.py``) makes a user's
divergence rare. The tower's own modules after pooling (Dense or Truncate, Normalize) make the
vector, so it equals the full path's. Entries live in an LRU cache bounded in bytes: keys/values are
large (SmolLM2-135M in fp32: 46 KB a token), so only recently active entities stay cached.

The model runs as a ``Decoder``: the artifact's ONNX graph with past keys/values in and out on
onnxruntime where the artifact has one (faster on CPU), else the torch model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import psutil
import torch
from cachetools import LRUCache
from prometheus_client import Counter, Gauge
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from transformers import DynamicCache, PreTrainedModel

from models.artifact import ModelArtifact
from models.encoder import plan_batches
from models.errors import ModelError
from models.tower import is_causal

HITS = Counter("onetower_incremental_hits_total", "re-encodes whose text extended the cached one (an append)")
MISSES = Counter("onetower_incremental_misses_total",
                 "re-encodes that were not an append, by reason (absent: not cached; diverged: the text changed "
                 "inside, e.g. a profile, a history trimmed at the token budget or an item's counters, and only "
                 "the shared prefix was reused; version: another model version)", ["reason"])
CACHE_BYTES = Gauge("onetower_incremental_cache_bytes", "bytes held by the incremental encoder's cache")
CACHE_USERS = Gauge("onetower_incremental_cache_users", "entities (users and items) held by the incremental encoder's cache")
TOKENS_COMPUTED = Counter("onetower_incremental_tokens_computed_total", "tokens run through the model by the incremental encoder")
TOKENS_FULL = Counter("onetower_incremental_tokens_full_total", "tokens a full encode of the same users would have run")

Present = list[tuple[np.ndarray, np.ndarray]]  # per layer: keys, values (batch, kv heads, past + new, head dim)


def default_cache_bytes() -> int:
    """An eighth of this machine's memory: room for the model, the worker and the OS besides."""
    return psutil.virtual_memory().total // 8


class Decoder(Protocol):
    """One forward of the tower's causal LM over new tokens on top of past keys/values."""

    kv_shape: tuple[int, int, int]  # layers, key/value heads, head dim

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 past: np.ndarray) -> tuple[np.ndarray, Present]:
        """``past``: float32 (layers, 2, batch, heads, past, head dim). Returns the last layer's states
        (batch, new, hidden) in float32 and each layer's keys/values over past and new tokens."""
        ...


class TorchDecoder:
    """The decoder as the torch model itself (any device)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        config = model.config
        self.kv_shape = (config.num_hidden_layers, config.num_key_value_heads,
                         getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)

    @torch.inference_mode()
    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 past: np.ndarray) -> tuple[np.ndarray, Present]:
        device, dtype = self.model.device, self.model.dtype
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(past if past.shape[4] else []):
            cache.update(torch.from_numpy(keys).to(device, dtype), torch.from_numpy(values).to(device, dtype), layer)
        out = self.model(input_ids=torch.from_numpy(input_ids).to(device), attention_mask=torch.from_numpy(attention_mask).to(device),
                         position_ids=torch.from_numpy(position_ids).to(device), past_key_values=cache, use_cache=True)
        present = [(layer.keys.float().cpu().numpy(), layer.values.float().cpu().numpy()) for layer in out.past_key_values.layers]
        return out.last_hidden_state.float().cpu().numpy(), present


class OnnxDecoder:
    """The decoder as the artifact's ONNX graph with past keys/values (``models.onnx_graph.export_decoder``) on
    onnxruntime's CPU provider: on this CPU an append runs up to 2x faster than torch (README)."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        _, heads, _, head_dim = past[0].shape
        self.kv_shape = (len(past) // 2, heads, head_dim)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 past: np.ndarray) -> tuple[np.ndarray, Present]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for layer, (keys, values) in enumerate(past):
            feed[f"past_key_values.{layer}.key"], feed[f"past_key_values.{layer}.value"] = keys, values
        states, *present = self.session.run(None, feed)
        return states, list(zip(present[::2], present[1::2]))


def for_artifact(path: Path, *, max_bytes: int | None = None, kv_dtype: str = "float32") -> IncrementalEncoder | None:
    """The incremental encoder over an artifact's tower, on its ONNX decoder where it has one (else torch);
    None when the tower cannot reuse prefixes (bidirectional, or not mean pooled), so its users keep the
    full path."""
    artifact = ModelArtifact.load(path)
    tower = artifact.load_sentence_transformer()
    if not is_causal(tower) or artifact.manifest.pooling != "mean":
        return None
    decoder = OnnxDecoder(artifact.decoder_path) if artifact.manifest.decoder else None
    return IncrementalEncoder(tower, version=artifact.version, decoder=decoder, max_bytes=max_bytes, kv_dtype=kv_dtype)


@dataclass
class Entry:
    """One entity's cached state: what was encoded, its keys/values, the running sums and the last vector."""

    version: str
    ids: np.ndarray  # int32 token ids encoded so far
    kv: np.ndarray  # (layers, 2, kv heads, len(ids), head dim): keys and values
    sums: np.ndarray  # float32 (len(ids), hidden): row t is the sum of the last layer's states over ids[: t + 1]
    vector: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.sums.nbytes + self.vector.nbytes + self.ids.nbytes

    def prefix(self, n: int) -> Entry:
        """This entry cut to its first ``n`` tokens (views: the next extend copies them out)."""
        return Entry(self.version, self.ids[:n], self.kv[:, :, :, :n], self.sums[:n], np.zeros(0, dtype=np.float32))


class IncrementalEncoder:
    """Encodes entities' texts through a per-entity cache of keys/values (appends of several entities batched)."""

    def __init__(self, tower: SentenceTransformer, *, version: str, decoder: Decoder | None = None,
                 max_bytes: int | None = None, kv_dtype: str = "float32") -> None:
        """``decoder`` runs the causal LM (default: the tower's own torch model); ``kv_dtype`` is how
        keys/values are kept between appends (float16 halves the cache; the model computes in its own dtype)."""
        if not isinstance(tower[0], Transformer) or not is_causal(tower):
            raise ModelError("incremental encoding needs a causal tower (LLaMA-shaped); this one attends both ways")
        if not isinstance(tower[1], Pooling) or tower[1].get_config_dict()["pooling_mode"] != "mean":
            raise ModelError("incremental encoding needs mean pooling (a running sum of the last layer's states)")
        self.tower = tower.eval()
        self.decoder = decoder or TorchDecoder(tower[0].auto_model)
        self.hidden = tower[0].auto_model.config.hidden_size
        self.head = list(tower.children())[2:]  # Dense or Truncate, then Normalize: as the full path applies them
        self.tokenizer = tower.tokenizer
        self.max_seq_length = tower.max_seq_length
        self.version = version
        self.kv_dtype = np.dtype(kv_dtype)
        self.cache: LRUCache[str, Entry] = LRUCache(max_bytes or default_cache_bytes(), getsizeof=lambda e: e.nbytes)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache.currsize)

    def encode(self, keys: Sequence[str], texts: Sequence[str], *, max_batch_tokens: int = 8192) -> np.ndarray:
        """(len(texts), dim) unit vectors equal to the full encode's, computing only the tokens after the
        prefix shared with the cached entry of each key (an entity, e.g. ``user:42``).

        Entities are batched by the tokens they compute (``plan_batches``), so appends run together and
        full encodes together; a batch also holds at most ``max_batch_tokens`` padded positions of past
        and new tokens, which bounds the keys/values copied into it."""
        if len(keys) != len(texts):
            raise ModelError(f"{len(keys)} keys for {len(texts)} texts")
        if not texts:
            return np.zeros((0, self.tower.get_embedding_dimension()), dtype=np.float32)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length)["input_ids"]
        entries = [self._lookup(key, row) for key, row in zip(keys, ids)]
        past = [len(entry.ids) for entry in entries]
        todo = [r for r, row in enumerate(ids) if len(row) > past[r]]
        for batch in plan_batches([len(ids[r]) - past[r] for r in todo], max_batch_tokens):
            for rows in _bounded([todo[b] for b in batch], past, [len(row) for row in ids], max_batch_tokens):
                for r, entry in zip(rows, self._extend([entries[r] for r in rows], [ids[r] for r in rows])):
                    entries[r] = entry
        for key, entry in zip(keys, entries):
            if entry.nbytes <= self.cache.maxsize:  # an entity larger than the whole cache is encoded, not kept
                self.cache[key] = entry
        CACHE_BYTES.set(self.cache.currsize)
        CACHE_USERS.set(len(self.cache))
        return np.stack([entry.vector for entry in entries])

    def _lookup(self, key: str, ids: list[int]) -> Entry:
        """The cached entry of ``key`` when ``ids`` extend it (a hit); else the prefix it shares with
        ``ids`` (at least one token left to compute, which makes the vector), or an empty entry."""
        entry = self.cache.pop(key, None)
        TOKENS_FULL.inc(len(ids))
        if entry is not None and entry.version == self.version:
            shared = shared_prefix(entry.ids, ids)
            if shared == len(entry.ids):
                HITS.inc()
                return entry
            MISSES.labels("diverged").inc()
            return entry.prefix(min(shared, len(ids) - 1))
        MISSES.labels("absent" if entry is None else "version").inc()
        layers, heads, head_dim = self.decoder.kv_shape
        return Entry(self.version, np.zeros(0, dtype=np.int32), np.zeros((layers, 2, heads, 0, head_dim), dtype=self.kv_dtype),
                     np.zeros((0, self.hidden), dtype=np.float32), np.zeros(0, dtype=np.float32))

    @torch.inference_mode()
    def _extend(self, entries: list[Entry], ids: list[list[int]]) -> list[Entry]:
        """Run each row's tokens after its ``entry.ids`` in one batch on top of the cached keys/values.

        The past is left-padded to the longest (masked), new tokens right-padded (masked), and each row's
        positions continue from its own past, as batched generation does."""
        past = [len(e.ids) for e in entries]
        new = [row[p:] for row, p in zip(ids, past)]
        width, length = max(past), max(map(len, new))
        input_ids = np.full((len(new), length), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(new), width + length), dtype=np.int64)
        for r, (p, tokens) in enumerate(zip(past, new)):
            input_ids[r, : len(tokens)] = tokens
            mask[r, width - p : width + len(tokens)] = 1
        positions = np.asarray(past, dtype=np.int64)[:, None] + np.arange(length)[None]
        TOKENS_COMPUTED.inc(sum(map(len, new)))
        states, present = self.decoder(input_ids, mask, positions, _stack(entries, width))
        sums, totals = [], []
        for r, (e, tokens) in enumerate(zip(entries, new)):
            running = (e.sums[-1].astype(np.float64) if len(e.sums) else 0.0) + states[r, : len(tokens)].astype(np.float64).cumsum(0)
            sums.append(np.concatenate([e.sums, running.astype(np.float32)]))
            totals.append(running[-1] / len(ids[r]))
        device = self.tower.device
        features = {"sentence_embedding": torch.from_numpy(np.stack(totals).astype(np.float32)).to(device)}
        for module in self.head:
            features = module(features)
        vectors = features["sentence_embedding"].float().cpu().numpy()
        # The past's keys/values come back unchanged: only the new tokens' are converted and appended.
        return [Entry(self.version, np.asarray(row, dtype=np.int32),
                      np.concatenate([e.kv, _row(present, r, width, width + len(tokens), self.kv_dtype)], axis=3), sums[r], vectors[r])
                for r, (e, row, tokens) in enumerate(zip(entries, ids, new))]


def shared_prefix(cached: np.ndarray, ids: list[int]) -> int:
    """How many leading tokens ``ids`` shares with ``cached``."""
    n = min(len(cached), len(ids))
    differ = np.flatnonzero(cached[:n] != np.asarray(ids[:n], dtype=cached.dtype))
    return int(differ[0]) if len(differ) else n


def _bounded(rows: list[int], past: list[int], total: list[int], budget: int) -> list[list[int]]:
    """``rows`` in parts of at most ``budget`` padded positions (rows x (longest past + longest new)); a
    row over the budget on its own runs alone."""
    parts: list[list[int]] = [[]]
    for r in rows:
        part = [*parts[-1], r]
        if parts[-1] and len(part) * (max(past[i] for i in part) + max(total[i] - past[i] for i in part)) > budget:
            parts.append([r])
        else:
            parts[-1] = part
    return parts


def _stack(entries: list[Entry], width: int) -> np.ndarray:
    """One float32 batch past (layers, 2, batch, heads, width, head dim) from the entries' keys/values, each
    left-padded with zeros to ``width`` positions (an uncached entity's row is all padding)."""
    layers, _, heads, _, head_dim = entries[0].kv.shape
    batch = np.zeros((layers, 2, len(entries), heads, width, head_dim), dtype=np.float32)
    for r, entry in enumerate(entries):
        if len(entry.ids):
            batch[:, :, r, :, width - len(entry.ids) :] = entry.kv
    return batch


def _row(present: Present, r: int, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
    """Row ``r``'s keys/values at positions ``start:stop`` of a batch's, copied out in ``dtype``."""
    kv = np.empty((len(present), 2, present[0][0].shape[1], stop - start, present[0][0].shape[3]), dtype=dtype)
    for layer, (keys, values) in enumerate(present):
        kv[layer, 0], kv[layer, 1] = keys[r, :, start:stop], values[r, :, start:stop]
    return kv
