"""Incremental re-encoding of users for causal towers: a refresh computes the new history entry's tokens only.

A causal LM's states for a prefix do not change when tokens are appended, and a user's text only grows
at its end when an engagement arrives (see ``models/render.py``). So per user the keys/values, the sum
of the last layer's states (mean pooling) and the token ids encoded so far are kept; when the new
text's ids start with the cached ids, only the rest goes through the model, on top of the cached
keys/values. Anything else (no entry, a different model version, a profile change or a history
trimmed at the token budget: the ids no longer start with the cached ones) is a full encode that
repopulates the entry. The tower's own modules after pooling (Dense or Truncate, Normalize) make the
vector, so it equals the full path's. Entries live in an LRU cache bounded in bytes: keys/values are
large (SmolLM2-135M in fp32: 46 KB a token), so only recently active users stay cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from cachetools import LRUCache
from prometheus_client import Counter, Gauge
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from transformers import DynamicCache

from models.errors import ModelError

HITS = Counter("onetower_incremental_hits_total", "user re-encodes that reused cached keys/values")
MISSES = Counter("onetower_incremental_misses_total",
                 "user re-encodes done in full, by reason (absent: not cached; diverged: the text's tokens no longer "
                 "start with the cached ones, e.g. a profile change or a history trimmed at the token budget; "
                 "version: another model version)", ["reason"])
CACHE_BYTES = Gauge("onetower_incremental_cache_bytes", "bytes held by the incremental encoder's cache")
CACHE_USERS = Gauge("onetower_incremental_cache_users", "users held by the incremental encoder's cache")
TOKENS_COMPUTED = Counter("onetower_incremental_tokens_computed_total", "tokens run through the model by the incremental encoder")
TOKENS_FULL = Counter("onetower_incremental_tokens_full_total", "tokens a full encode of the same users would have run")


def default_cache_bytes() -> int:
    """An eighth of this machine's memory: room for the model, the worker and the OS besides."""
    return psutil.virtual_memory().total // 8


def is_causal(tower: SentenceTransformer) -> bool:
    """Whether the tower's transformer attends causally (LLaMA-shaped), which the prefix reuse needs."""
    flags = [m.is_causal for m in tower[0].auto_model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


@dataclass
class Entry:
    """One user's cached state: what was encoded, its keys/values, the running sum and the last vector."""

    version: str
    ids: np.ndarray  # int32 token ids encoded so far
    cache: DynamicCache
    total: torch.Tensor  # float64 sum of the last layer's states over ``ids``
    vector: np.ndarray

    @property
    def nbytes(self) -> int:
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)
        return kv + self.total.nbytes + self.vector.nbytes + self.ids.nbytes


class IncrementalEncoder:
    """Encodes users' texts through a per-user cache of keys/values (torch, one user at a time)."""

    def __init__(self, tower: SentenceTransformer, *, version: str, max_bytes: int | None = None) -> None:
        if not isinstance(tower[0], Transformer) or not is_causal(tower):
            raise ModelError("incremental encoding needs a causal tower (LLaMA-shaped); this one attends both ways")
        if not isinstance(tower[1], Pooling) or tower[1].get_config_dict()["pooling_mode"] != "mean":
            raise ModelError("incremental encoding needs mean pooling (a running sum of the last layer's states)")
        self.tower = tower.eval()
        self.model = tower[0].auto_model
        self.head = list(tower.children())[2:]  # Dense or Truncate, then Normalize: as the full path applies them
        self.tokenizer = tower.tokenizer
        self.max_seq_length = tower.max_seq_length
        self.version = version
        self.cache: LRUCache[str, Entry] = LRUCache(max_bytes or default_cache_bytes(), getsizeof=lambda e: e.nbytes)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache.currsize)

    def encode_users(self, user_ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) unit vectors equal to the full encode's, computing only new tokens where cached."""
        if len(user_ids) != len(texts):
            raise ModelError(f"{len(user_ids)} user ids for {len(texts)} texts")
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length)["input_ids"]
        rows = [self._encode_one(user_id, row) for user_id, row in zip(user_ids, ids)]
        CACHE_BYTES.set(self.cache.currsize)
        CACHE_USERS.set(len(self.cache))
        return np.stack(rows) if rows else np.zeros((0, self.tower.get_embedding_dimension()), dtype=np.float32)

    def _encode_one(self, user_id: str, ids: list[int]) -> np.ndarray:
        entry = self.cache.pop(user_id, None)
        reason = self._miss_reason(entry, ids)
        TOKENS_FULL.inc(len(ids))
        if reason is None:
            HITS.inc()
            entry = self._extend(entry, ids)
        else:
            MISSES.labels(reason).inc()
            entry = self._extend(self._empty(), ids)
        if entry.nbytes <= self.cache.maxsize:  # a user larger than the whole cache is not kept
            self.cache[user_id] = entry
        return entry.vector

    def _empty(self) -> Entry:
        hidden = torch.zeros(self.model.config.hidden_size, dtype=torch.float64)
        return Entry(self.version, np.zeros(0, dtype=np.int32), DynamicCache(), hidden, np.zeros(0, dtype=np.float32))

    def _miss_reason(self, entry: Entry | None, ids: list[int]) -> str | None:
        if entry is None:
            return "absent"
        if entry.version != self.version:
            return "version"
        if len(ids) < len(entry.ids) or not np.array_equal(entry.ids, ids[: len(entry.ids)]):
            return "diverged"
        return None

    @torch.inference_mode()
    def _extend(self, entry: Entry, ids: list[int]) -> Entry:
        """Run the tokens after ``entry.ids`` on top of its keys/values; the vector from the running mean."""
        new = ids[len(entry.ids) :]
        if not new:
            return entry
        TOKENS_COMPUTED.inc(len(new))
        device = self.model.device
        out = self.model(
            input_ids=torch.tensor([new], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            past_key_values=entry.cache,
            use_cache=True,
        )
        total = entry.total + out.last_hidden_state[0].sum(0).to(torch.float64).cpu()
        features = {"sentence_embedding": (total / len(ids)).to(torch.float32)[None].to(device)}
        for module in self.head:
            features = module(features)
        vector = features["sentence_embedding"][0].float().cpu().numpy()
        return Entry(self.version, np.asarray(ids, dtype=np.int32), out.past_key_values, total, vector)
