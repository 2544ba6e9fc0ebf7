"""The vector store: item and user vectors per model version, and which version is active.

What the refresher, the re-index, candidates and live recall need from a store, and nothing of how
one stores it: ``indexer/milvus.py`` implements it on Milvus (server or Lite), ``indexer.store.open_store``
picks the implementation from the settings. The contract every implementation keeps:

- A version (1-64 letters, digits or '_', as model manifests require) holds one ``items`` and one
  ``users`` set of vectors, each row with ``updated_at`` (event time, ms) and ``attrs`` (features).
- One version is active at a time. ``activate`` records its intent first, so a crash mid-swap is
  finished by ``recover``; the version it left stays ``previous`` for rollback until dropped.
- Serving reads name their version, so one request never mixes versions while the active one moves.
- Failures of the store itself raise ``IndexUnavailable``; bad versions ``VersionError``; filters the
  store rejects ``InvalidFilter``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from core.errors import OnetowerError, Unavailable
from indexer.filters import Filter

KINDS = ("items", "users")
MAX_TOPK = 16384  # the largest k a search takes (Milvus' limit)
_VERSION_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


class IndexUnavailable(Unavailable):
    """The vector store cannot answer (down, timed out, or no active version yet); the message says which."""


class VersionError(OnetowerError, ValueError):
    """A version that does not exist, cannot be named, or cannot be dropped or activated."""


@dataclass(frozen=True)
class Hit:
    """One search result: an item id, its cosine similarity, and the model version that produced it."""

    id: str
    score: float
    model_version: str


def check_version(version: str) -> str:
    """``version`` if it can name a version (letters, digits, '_'; model manifests enforce the same)."""
    if not _VERSION_RE.fullmatch(version or ""):
        raise VersionError(f"model version {version!r} must be 1-64 letters, digits or '_' (it names collections)")
    return version


class VectorStore(Protocol):
    """Item and user vectors per model version, the active version, and a record per version."""

    # -- versions
    def ensure_version(self, version: str) -> None:
        """Make the version's items and users ready for writes and reads (idempotent, resumes a half-made one)."""

    def has_version(self, version: str) -> bool: ...

    def versions(self) -> list[str]:
        """Every version held, in name order."""

    def drop_version(self, version: str) -> None:
        """Drop a version that is not active, with its record; VersionError for the active one."""

    def collect_garbage(self, grace_s: float, keep: Sequence[str] = ()) -> list[str]:
        """Drop every version but the active one, ``keep``, and the previous one for ``grace_s`` after its
        swap; returns the versions dropped."""

    def drop_all(self) -> None:
        """Drop everything this store's settings name (tests, and `onetower reindex --drop-all`)."""

    # -- writes
    def upsert_items(self, version: str, ids: Sequence[str], vectors: np.ndarray,
                     fields: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Insert or replace item vectors; ``fields`` per row may give ``updated_at`` (ms) and ``attrs``."""

    def upsert_users(self, version: str, ids: Sequence[str], vectors: np.ndarray,
                     fields: Sequence[Mapping[str, Any]] | None = None) -> int: ...

    def delete_items(self, version: str, ids: Sequence[str]) -> None: ...

    def delete_users(self, version: str, ids: Sequence[str]) -> None: ...

    def flush(self, version: str) -> None:
        """Persist the version's writes so that its index can cover them."""

    # -- reads
    def count(self, kind: str, version: str) -> int:
        """Live rows of ``kind`` (deletes applied), seeing every write made before."""

    def stored(self, kind: str, version: str, batch: int = 5000) -> dict[str, int]:
        """Every stored id of ``kind`` with the ``updated_at`` it reflects."""

    def wait_indexed(self, version: str, timeout_s: float) -> bool:
        """Wait until the ANN index covers the flushed rows; False when ``timeout_s`` passed first."""

    def get_vectors(self, kind: str, version: str, ids: Sequence[str], *, strong: bool = False) -> dict[str, np.ndarray]:
        """Stored vectors by id (missing ids are absent); ``strong`` to see this process's own writes."""

    def get_user_vector(self, user_id: str, version: str | None = None) -> np.ndarray | None:
        """The user's vector in ``version`` (default: the active one), or None when not indexed."""

    def search_items(self, vector: np.ndarray, k: int, filter: Filter | None = None,
                     version: str | None = None) -> list[Hit]:
        """Top-``k`` (1 to MAX_TOPK) items by cosine similarity in ``version`` (default: active) that pass ``filter``."""

    # -- the active version
    def active_version(self) -> str | None: ...

    def require_active(self) -> str:
        """The active version; IndexUnavailable when there is none."""

    def previous_version(self) -> str | None:
        """The version active before the current one, while it is kept for rollback."""

    def activate(self, version: str) -> None:
        """Make ``version`` the active one; the one it leaves becomes the previous one."""

    def recover(self) -> None:
        """Finish a swap that a crash interrupted."""

    def rollback(self) -> str:
        """Re-activate the previous version and return it; VersionError when there is none."""

    # -- the record of each version (what the re-index wrote: model_dir, state, counts)
    def version_info(self, version: str) -> dict[str, Any] | None: ...

    def record_version(self, version: str, **info: Any) -> dict[str, Any]:
        """Merge ``info`` into the version's record and return it."""

    def ping(self) -> None:
        """IndexUnavailable unless the store answers a cheap call."""

    def close(self) -> None: ...
