"""Candidate retrieval: "which items for this user, now?", answered from one model version per request.

The version is resolved once (the ``items`` alias) and both the user vector and the item search use
that version's collections by name, so an alias swap mid-request cannot mix versions. A user who is
not indexed yet is encoded on the fly from Redis state with that same version's encoder (cold start).
Already-engaged items are dropped after an ANN search oversampled by their number, so ``k`` results
survive whenever the catalogue (after the filter) holds ``k`` unseen items.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

import numpy as np
import redis

from core.errors import OnetowerError, Unavailable
from core.settings import Settings
from indexer import state_vectors
from indexer.filters import Filter
from indexer.store import open_store
from indexer.vectors import MAX_TOPK, VectorStore
from models.texts import user_text
from streams.state import StateStore

if TYPE_CHECKING:
    from models.encoder import Encoder

T = TypeVar("T")


class UnknownUser(OnetowerError, LookupError):
    """The user has neither a vector in the active version nor any state to encode one from."""


class InvalidRequest(OnetowerError, ValueError):
    """A parameter out of range (k); the message says which."""


class ServiceUnavailable(Unavailable):
    """A dependency other than the vector store (Redis, the encoder of the active version) cannot serve."""


@dataclass(frozen=True)
class CandidateResult:
    """Top items for a user, all scored in one model version."""

    version: str
    items: list[tuple[str, float]]
    cold_start: bool = False  # the user vector was encoded on the fly, not read from the vector store


class Retriever:
    """Candidates on one vector store and one Redis state store; thread-safe, shared by the API."""

    def __init__(self, settings: Settings, index: VectorStore | None = None, store: StateStore | None = None) -> None:
        self.settings = settings
        self.index = index or open_store(settings)
        self.store = store or StateStore.from_settings(settings)
        self._encoders: dict[str, Encoder] = {}
        self._lock = threading.Lock()

    def candidates(self, user_id: str, k: int, exclude_seen: bool = True, filter: Filter | None = None) -> CandidateResult:
        """Top-``k`` (item_id, cosine) for a known user; raises UnknownUser when there is nothing to go on."""
        self._check_k(k)
        version = self.index.require_active()
        vector = self.index.get_user_vector(user_id, version)
        cold = vector is None
        if cold:
            state = self._state(lambda: self.store.users([user_id])[0])
            if state is None:
                raise UnknownUser(f"unknown user {user_id!r}: no vector in version {version} and no state in Redis")
            encoder = self.encoder(version)
            text = self._state(lambda: state_vectors.texts("users", [state], self.store, {}, encoder)[0])
            vector = encoder.encode([text])[0]
        seen = self._state(lambda: self.store.engaged_items(user_id)) if exclude_seen else set()
        return self.search(version, vector, k, seen, filter, cold)

    def candidates_for(self, features: Mapping[str, Any], history: Sequence[str], k: int,
                       exclude_seen: bool = True, filter: Filter | None = None) -> CandidateResult:
        """Top-``k`` for a user given by value (profile features, engaged item ids oldest first)."""
        self._check_k(k)
        version = self.index.require_active()
        encoder = self.encoder(version)
        text = self._state(lambda: user_text(self.store, features, history, tokenizer=encoder.tokenizer,
                                             max_tokens=encoder.max_seq_length,
                                             history_block=encoder.history_block))
        return self.search(version, encoder.encode([text])[0], k, set(history) if exclude_seen else set(), filter, True)

    def search(self, version: str, vector: np.ndarray, k: int, seen: set[str], filter: Filter | None,
               cold: bool) -> CandidateResult:
        """Top-``k`` of ``version`` for a user vector, ``seen`` dropped: serving's rule, shared with live recall."""
        hits = self.index.search_items(vector, min(k + len(seen), MAX_TOPK), filter=filter, version=version)
        items = [(hit.id, hit.score) for hit in hits if hit.id not in seen][:k]
        return CandidateResult(version=version, items=items, cold_start=cold)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.settings.candidates_max_k:
            raise InvalidRequest(f"k must be between 1 and {self.settings.candidates_max_k}, got {k}")

    def _state(self, read: Callable[[], T]) -> T:
        """Run a Redis read; a Redis failure becomes ServiceUnavailable with one line."""
        try:
            return read()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis at {self.settings.redis_url_masked} failed: {exc}", public="Redis failed to answer") from None

    def encoder(self, version: str) -> Encoder:
        """The encoder of ``version``: ``settings.model_dir`` when it holds that version, else the model
        directory the re-index recorded for it. Loaded once per version."""
        with self._lock:
            if version not in self._encoders:
                self._encoders[version] = self._load_encoder(version)
            return self._encoders[version]

    def _load_encoder(self, version: str) -> Encoder:
        from models.artifact import ModelArtifact
        from models.encoder import Encoder
        from models.errors import ModelError

        recorded = (self.index.version_info(version) or {}).get("model_dir")
        for path in (self.settings.model_dir, recorded):
            if path is None:
                continue
            try:
                if ModelArtifact.load(Path(path)).version == version:
                    return Encoder.load(Path(path))
            except ModelError:
                continue
        raise ServiceUnavailable(f"no model directory holds the active version {version} "
                                 f"(recorded: {recorded}; set ONETOWER_MODEL_DIR) to encode a user not indexed yet",
                                 public=f"the encoder of version {version} is not available to encode a user not indexed yet")
