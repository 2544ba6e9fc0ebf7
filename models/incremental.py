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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from cachetools import LRUCache
from prometheus_client import Counter, Gauge
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from transformers import DynamicCache

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


def default_cache_bytes() -> int:
    """An eighth of this machine's memory: room for the model, the worker and the OS besides."""
    return psutil.virtual_memory().total // 8


def for_artifact(path: Path, *, max_bytes: int | None = None, kv_dtype: str = "float32") -> IncrementalEncoder | None:
    """The incremental encoder over an artifact's torch tower; None when the tower cannot reuse prefixes
    (bidirectional, or not mean pooled), so its users keep the full path."""
    artifact = ModelArtifact.load(path)
    tower = artifact.load_sentence_transformer()
    if not is_causal(tower) or artifact.manifest.pooling != "mean":
        return None
    return IncrementalEncoder(tower, version=artifact.version, max_bytes=max_bytes, kv_dtype=getattr(torch, kv_dtype))


@dataclass
class Entry:
    """One entity's cached state: what was encoded, its keys/values, the running sums and the last vector."""

    version: str
    ids: np.ndarray  # int32 token ids encoded so far
    cache: DynamicCache
    sums: torch.Tensor  # float32 (len(ids), hidden): row t is the sum of the last layer's states over ids[: t + 1]
    vector: np.ndarray

    @property
    def nbytes(self) -> int:
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)
        return kv + self.sums.nbytes + self.vector.nbytes + self.ids.nbytes

    def prefix(self, n: int) -> Entry:
        """This entry cut to its first ``n`` tokens (views: the next extend copies them out)."""
        cache = DynamicCache()
        for layer, item in enumerate(self.cache.layers if n else []):
            cache.update(item.keys[:, :, :n], item.values[:, :, :n], layer)
        return Entry(self.version, self.ids[:n], cache, self.sums[:n], np.zeros(0, dtype=np.float32))


class IncrementalEncoder:
    """Encodes users' texts through a per-user cache of keys/values (torch; appends of several users batched)."""

    def __init__(self, tower: SentenceTransformer, *, version: str, max_bytes: int | None = None,
                 kv_dtype: torch.dtype = torch.float32) -> None:
        """``kv_dtype`` is how keys/values are kept between appends (float16 halves the cache; the model
        still computes in its own dtype)."""
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
        self.kv_dtype = kv_dtype
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
        if not entries:
            return np.zeros((0, self.tower.get_embedding_dimension()), dtype=np.float32)
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
        empty = torch.zeros(0, self.model.config.hidden_size, dtype=torch.float32)
        return Entry(self.version, np.zeros(0, dtype=np.int32), DynamicCache(), empty, np.zeros(0, dtype=np.float32))

    @torch.inference_mode()
    def _extend(self, entries: list[Entry], ids: list[list[int]]) -> list[Entry]:
        """Run each row's tokens after its ``entry.ids`` in one batch on top of the cached keys/values.

        The past is left-padded to the longest (masked), new tokens right-padded (masked), and each row's
        positions continue from its own past, as batched generation does."""
        device = self.model.device
        past = [len(e.ids) for e in entries]
        new = [row[p:] for row, p in zip(ids, past)]
        width, length = max(past), max(map(len, new))
        input_ids = torch.full((len(new), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(new), width + length, dtype=torch.long)
        for r, (p, tokens) in enumerate(zip(past, new)):
            input_ids[r, : len(tokens)] = torch.tensor(tokens)
            mask[r, width - p : width + len(tokens)] = 1
        positions = torch.tensor(past)[:, None] + torch.arange(length)[None]
        TOKENS_COMPUTED.inc(sum(map(len, new)))
        out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                         past_key_values=_stack([e.cache for e in entries], past, width, self.model.dtype), use_cache=True)
        states = out.last_hidden_state.to(torch.float64).cpu()
        sums, totals = [], []
        for r, (e, tokens) in enumerate(zip(entries, new)):
            running = (e.sums[-1].double() if len(e.sums) else 0.0) + states[r, : len(tokens)].cumsum(0)
            sums.append(torch.cat([e.sums, running.float()]))
            totals.append(running[-1])
        totals = torch.stack(totals)
        features = {"sentence_embedding": (totals / torch.tensor([len(row) for row in ids])[:, None]).float().to(device)}
        for module in self.head:
            features = module(features)
        vectors = features["sentence_embedding"].float().cpu().numpy()
        return [Entry(self.version, np.asarray(row, dtype=np.int32), _row(out.past_key_values, r, width - p, width + len(tokens), self.kv_dtype),
                      sums[r], vectors[r])
                for r, (row, p, tokens) in enumerate(zip(ids, past, new))]


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


def _stack(caches: list[DynamicCache], past: list[int], width: int, dtype: torch.dtype) -> DynamicCache:
    """One batch cache from per-user caches, each left-padded with zeros to ``width`` positions (an
    uncached user's row is all padding); one copy into a buffer allocated once per layer."""
    batch = DynamicCache()
    if width == 0:
        return batch
    for layer, item in enumerate(next(c for c, p in zip(caches, past) if p).layers):
        shape = (len(caches), item.keys.shape[1], width, item.keys.shape[3])
        keys, values = item.keys.new_zeros(shape, dtype=dtype), item.values.new_zeros(shape, dtype=dtype)
        for r, (cache, p) in enumerate(zip(caches, past)):
            if p:
                keys[r, :, width - p :] = cache.layers[layer].keys[0]
                values[r, :, width - p :] = cache.layers[layer].values[0]
        batch.update(keys, values, layer)
    return batch


def _row(cache: DynamicCache, r: int, start: int, stop: int, dtype: torch.dtype) -> DynamicCache:
    """Row ``r``'s keys/values at positions ``start:stop`` of a batch cache, copied out (no view keeps the batch alive)."""
    out = DynamicCache()
    for layer, item in enumerate(cache.layers):
        keys, values = (t[r : r + 1, :, start:stop].to(dtype, copy=True).contiguous() for t in (item.keys, item.values))
        out.update(keys, values, layer)
    return out
