"""The vector store on Milvus (server or Lite): versioned collections, aliases, a metadata collection.

Naming (every name starts with ``settings.milvus_prefix``):

- ``items__<v>`` and ``users__<v>`` hold model version ``<v>`` each (a version is 1-64 letters, digits
  or '_', as the model manifest requires, so it is a valid part of a Milvus name as it is).
- Aliases ``items`` and ``users`` point at the active version's collections.
- ``indexer_meta`` records what aliases cannot: each version's model directory and build state, the
  previous version (kept for rollback until a grace period ends) and an alias swap in flight, which
  ``recover()`` finishes after a crash so the two aliases never stay on different versions.

Serving reads resolve the version once (from the ``items`` alias) and then read the versioned
collections by name, so one request never mixes versions even while the aliases move. Serving reads
use ``settings.milvus_read_consistency`` (Bounded by default: Strong costs 200-400 ms a search on
Milvus 2.3); reads that must see their own writes (counts, checks, metadata) use Strong.

Filters compile to Milvus boolean expressions over the JSON field ``attrs``; every value is a
literal that Milvus parses as data (``compile_filter``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.client.types import LoadState
from pymilvus.exceptions import MilvusException

from core.settings import Settings
from indexer.filters import AllOf, AnyOf, Condition, Filter, InvalidFilter, Not, Scalar
from indexer.vectors import KINDS, MAX_TOPK, Hit, IndexUnavailable, VectorStore, VersionError, check_version

# pymilvus logs a full traceback for every failed call, expected ones included; ours re-raise as
# one-line errors below, so its own logging only adds noise.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
log = logging.getLogger("onetower.indexer")

UPSERT_ROWS = 1000  # ~2 MB of 512-d vectors a call, far below gRPC's 64 MB message limit
_META_DIM = 2  # Milvus requires a vector field in every collection; the metadata one never searches it


def literal(value: Scalar) -> str:
    """``value`` as a Milvus literal. A string is a JSON string, which Milvus parses as a Go string
    literal, so quotes, backslashes and control characters stay data; not ASCII-escaped, because Go
    rejects JSON's surrogate pairs (``\\ud83d\\ude00``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)  # an int, or a finite float: Milvus reads 1e+300 and -0.0 as Python writes them


def id_filter(field: str, ids: Iterable[str]) -> str:
    """``field in [...]`` matching exactly ``ids`` (pymilvus' get and delete by ids paste ids between
    quotes unescaped: an id with a quote broke the expression)."""
    return f"{field} in [{', '.join(literal(str(id_)) for id_ in ids)}]"


def compile_filter(f: Filter) -> str:
    """The Milvus expression of a typed filter over ``attrs`` (field names are identifiers, values literals)."""
    match f:
        case Condition(field=field, op="in", value=list(values)):
            return f'attrs["{field}"] in [{", ".join(map(literal, values))}]'
        case Condition(field=field, op=op, value=value):
            return f'attrs["{field}"] {op} {literal(value)}'
        case AllOf(all=parts):
            return " and ".join(f"({compile_filter(part)})" for part in parts)
        case AnyOf(any=parts):
            return " or ".join(f"({compile_filter(part)})" for part in parts)
        case Not(not_=part):
            return f"not ({compile_filter(part)})"
    raise TypeError(f"not a filter: {f!r}")


class MilvusStore(VectorStore):
    """Item and user vectors per model version on a Milvus server or Milvus Lite (one process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: MilvusClient | None = None
        self._connecting = threading.Lock()
        self._timeout = settings.milvus_timeout_s

    # -- names -------------------------------------------------------------------------------
    def alias(self, kind: str) -> str:
        return f"{self.settings.milvus_prefix}{kind}"

    def collection(self, kind: str, version: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        return f"{self.settings.milvus_prefix}{kind}__{check_version(version)}"

    @property
    def _meta(self) -> str:
        return f"{self.settings.milvus_prefix}indexer_meta"

    # -- connection and errors -----------------------------------------------------------------
    @property
    def client(self) -> MilvusClient:
        """The Milvus client, connected on first use (so a process can start while Milvus is down)."""
        with self._connecting:
            if self._client is None:
                with self._calls("connect"):
                    self._client = MilvusClient(uri=self.settings.milvus_uri, token=self.settings.milvus_token,
                                                timeout=self._timeout)
            return self._client

    @contextmanager
    def _calls(self, what: str) -> Iterator[None]:
        """Turn Milvus and gRPC failures into IndexUnavailable with one readable line."""
        try:
            yield
        except (MilvusException, grpc.RpcError) as exc:
            reason = getattr(exc, "message", None) or str(exc)
            raise IndexUnavailable(f"Milvus at {self.settings.milvus_uri} failed to {what}: {reason.splitlines()[0]}",
                                   public=f"Milvus failed to {what}") from None

    def ping(self) -> None:
        """Raise IndexUnavailable unless Milvus answers a cheap call."""
        with self._calls("list collections"):
            self.client.list_collections(timeout=self._timeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- collections -----------------------------------------------------------------------------
    def _index_params(self, client: MilvusClient):
        params = client.prepare_index_params()
        if self.settings.milvus_is_lite:
            params.add_index(field_name="vector", index_type="AUTOINDEX", metric_type="COSINE")
        else:
            params.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE",
                             params={"M": self.settings.hnsw_m, "efConstruction": self.settings.hnsw_ef_construction})
        return params

    def _search_params(self, limit: int) -> dict[str, Any]:
        if self.settings.milvus_is_lite:
            return {"metric_type": "COSINE"}
        return {"metric_type": "COSINE", "params": {"ef": max(self.settings.hnsw_ef, limit)}}

    def ensure_version(self, version: str) -> None:
        """Create, index and load the items and users collections of ``version`` where missing.

        Making a collection is three Milvus calls (create, index, load): a process killed between
        them leaves one that accepts every upsert and answers no read ("collection not loaded"), so
        an existing collection is finished too. Each step is idempotent; concurrent callers are fine.
        """
        client = self.client
        for kind in KINDS:
            name = self.collection(kind, version)
            with self._calls(f"create {name}"):
                if client.has_collection(name, timeout=self._timeout):
                    self._finish(name)
                    continue
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                                    description=f"onetower {kind} of model version {version}")
                schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=256)
                schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.settings.embedding_dim)
                schema.add_field("model_version", DataType.VARCHAR, max_length=256)
                schema.add_field("updated_at", DataType.INT64, description="event time (ms) of the state the vector reflects")
                schema.add_field("attrs", DataType.JSON, description="catalogue or profile fields, filterable as attrs[\"name\"]")
                client.create_collection(name, schema=schema, index_params=self._index_params(client),
                                         consistency_level="Bounded", timeout=self._timeout)

    def _finish(self, name: str) -> None:
        """Index and load an existing collection where its creator did not get to."""
        client = self.client
        if not client.list_indexes(name, field_name="vector", timeout=self._timeout):
            log.warning("collection %s has no index (its creator was stopped): indexing it", name)
            client.create_index(name, self._index_params(client), timeout=self._timeout)
        if client.get_load_state(name, timeout=self._timeout).get("state") != LoadState.Loaded:
            log.warning("collection %s is not loaded (its creator was stopped): loading it", name)
            client.load_collection(name, timeout=max(self._timeout, 60.0))

    def has_version(self, version: str) -> bool:
        with self._calls("list collections"):
            return all(self.client.has_collection(self.collection(kind, version), timeout=self._timeout) for kind in KINDS)

    def versions(self) -> list[str]:
        """Every version with an items collection under this prefix, oldest name first."""
        start = f"{self.settings.milvus_prefix}items__"
        with self._calls("list collections"):
            names = self.client.list_collections(timeout=self._timeout)
        return sorted(n[len(start):] for n in names if n.startswith(start))

    def drop_version(self, version: str) -> None:
        """Drop a version's collections (aliases on them first: dropping a collection keeps its alias)."""
        if version == self.active_version():
            raise VersionError(f"version {version!r} is active; activate or roll back to another first")
        client = self.client
        for kind in KINDS:
            name = self.collection(kind, version)
            with self._calls(f"drop {name}"):
                if not client.has_collection(name, timeout=self._timeout):
                    continue
                for alias in client.list_aliases(name, timeout=self._timeout).get("aliases", []):
                    client.drop_alias(alias, timeout=self._timeout)
                client.drop_collection(name, timeout=self._timeout)
        self._delete_meta(f"version:{version}")
        swap = self.swap_state()
        if swap.get("previous") == version:
            self._put_meta("aliases", {**swap, "previous": None, "retired_ms": None})

    # -- writes ---------------------------------------------------------------------------------
    def upsert_items(self, version: str, ids: Sequence[str], vectors: np.ndarray,
                     fields: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Insert or replace item vectors; ``fields`` per row may give ``updated_at`` (ms) and ``attrs``."""
        return self._upsert("items", version, ids, vectors, fields)

    def upsert_users(self, version: str, ids: Sequence[str], vectors: np.ndarray,
                     fields: Sequence[Mapping[str, Any]] | None = None) -> int:
        """Insert or replace user vectors; ``fields`` as for ``upsert_items``."""
        return self._upsert("users", version, ids, vectors, fields)

    def _upsert(self, kind: str, version: str, ids: Sequence[str], vectors: np.ndarray,
                fields: Sequence[Mapping[str, Any]] | None) -> int:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.settings.embedding_dim:
            raise ValueError(f"expected vectors of shape (n, {self.settings.embedding_dim}), got {vectors.shape}")
        if not len(ids) == len(vectors) == len(fields if fields is not None else ids):
            raise ValueError(f"{len(ids)} ids, {len(vectors)} vectors and {len(fields or [])} field rows must match")
        now = int(time.time() * 1000)
        extra: Sequence[Mapping[str, Any]] = fields if fields is not None else [{}] * len(ids)
        rows = [{"id": str(id_), "vector": vec.tolist(), "model_version": version,
                 "updated_at": int(row.get("updated_at", now)), "attrs": dict(row.get("attrs") or {})}
                for id_, vec, row in zip(ids, vectors, extra)]
        name = self.collection(kind, version)
        with self._calls(f"upsert into {name}"):
            for start in range(0, len(rows), UPSERT_ROWS):
                self.client.upsert(name, rows[start:start + UPSERT_ROWS], timeout=self._timeout)
        return len(rows)

    def delete_items(self, version: str, ids: Sequence[str]) -> None:
        self._delete("items", version, ids)

    def delete_users(self, version: str, ids: Sequence[str]) -> None:
        self._delete("users", version, ids)

    def _delete(self, kind: str, version: str, ids: Sequence[str]) -> None:
        if ids:
            name = self.collection(kind, version)
            with self._calls(f"delete from {name}"):
                self.client.delete(name, filter=id_filter("id", ids), timeout=self._timeout)

    def flush(self, version: str) -> None:
        """Seal the version's growing segments so that the HNSW index covers them."""
        for kind in KINDS:
            name = self.collection(kind, version)
            with self._calls(f"flush {name}"):
                self.client.flush(name, timeout=max(self._timeout, 60.0))

    # -- reads ------------------------------------------------------------------------------------
    def count(self, kind: str, version: str) -> int:
        """Live rows (deletes applied), read at Strong consistency."""
        name = self.collection(kind, version)
        with self._calls(f"count {name}"):
            res = self.client.query(name, filter="", output_fields=["count(*)"], consistency_level="Strong",
                                    timeout=self._timeout)
        return int(res[0]["count(*)"])

    def stored(self, kind: str, version: str, batch: int = 5000) -> dict[str, int]:
        """Every stored id with the ``updated_at`` it reflects (Strong), read in pages."""
        name = self.collection(kind, version)
        out: dict[str, int] = {}
        with self._calls(f"list ids of {name}"):
            it = self.client.query_iterator(name, batch_size=batch, output_fields=["updated_at"],
                                            consistency_level="Strong", timeout=self._timeout)
            try:
                while page := it.next():
                    out.update((row["id"], int(row["updated_at"])) for row in page)
            finally:
                it.close()
        return out

    def wait_indexed(self, version: str, timeout_s: float) -> bool:
        """Wait until the vector index covers every sealed row of the version (call after ``flush``);
        False when ``timeout_s`` passed first (searches still work, brute force on unindexed segments)."""
        deadline = time.monotonic() + timeout_s
        for kind in KINDS:
            name = self.collection(kind, version)
            while True:
                with self._calls(f"describe the index of {name}"):
                    info = self.client.describe_index(name, "vector", timeout=self._timeout)
                if int(info.get("pending_index_rows", 0)) == 0 and int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 0)):
                    break
                if time.monotonic() > deadline:
                    return False
                time.sleep(1.0)
        return True

    def get_vectors(self, kind: str, version: str, ids: Sequence[str], *, strong: bool = False) -> dict[str, np.ndarray]:
        """Stored vectors by id (missing ids are absent); ``strong`` to see this process's own writes."""
        if not ids:
            return {}
        name = self.collection(kind, version)
        with self._calls(f"read {name}"):
            rows = self.client.query(name, filter=id_filter("id", ids), output_fields=["vector"], timeout=self._timeout,
                                     consistency_level="Strong" if strong else self.settings.milvus_read_consistency)
        return {row["id"]: np.asarray(row["vector"], dtype=np.float32) for row in rows}

    def get_user_vector(self, user_id: str, version: str | None = None) -> np.ndarray | None:
        """The user's vector in ``version`` (default: the active one), or None when not indexed."""
        version = version or self.require_active()
        return self.get_vectors("users", version, [user_id]).get(user_id)

    def search_items(self, vector: np.ndarray, k: int, filter: Filter | None = None, version: str | None = None) -> list[Hit]:
        """Top-``k`` items by cosine similarity in ``version`` (default: active) that pass ``filter``."""
        if not 1 <= k <= MAX_TOPK:
            raise ValueError(f"k must be between 1 and {MAX_TOPK}, got {k}")
        version = version or self.require_active()
        name = self.collection("items", version)
        expr = compile_filter(filter) if filter is not None else ""
        try:
            with self._calls(f"search {name}"):
                res = self.client.search(name, data=[np.asarray(vector, dtype=np.float32).tolist()], limit=k,
                                         filter=expr, output_fields=["model_version"],
                                         search_params=self._search_params(k), timeout=self._timeout,
                                         consistency_level=self.settings.milvus_read_consistency)
        except IndexUnavailable as exc:
            if expr:
                self.ping()  # Milvus answers, so the failure was the expression's
                raise InvalidFilter(f"invalid filter {expr!r}: {str(exc).split(': ', 1)[-1]}") from None
            raise
        return [Hit(hit["id"], float(hit["distance"]), hit["entity"]["model_version"]) for hit in res[0]]

    # -- aliases and versions ----------------------------------------------------------------------
    def active_version(self) -> str | None:
        """The version the ``items`` alias points at (the one serving reads use), or None."""
        alias = self.alias("items")
        client = self.client
        try:
            target = client.describe_alias(alias, timeout=self._timeout)["collection_name"]
        except (MilvusException, grpc.RpcError):  # one round trip when the alias exists; tell "missing" from "down" only here
            with self._calls(f"resolve alias {alias}"):
                if alias not in client.list_aliases(timeout=self._timeout).get("aliases", []):
                    return None
                target = client.describe_alias(alias, timeout=self._timeout)["collection_name"]
        return target[len(f"{self.settings.milvus_prefix}items__"):]

    def require_active(self) -> str:
        version = self.active_version()
        if version is None:
            raise IndexUnavailable(f"no active model version under prefix {self.settings.milvus_prefix!r} (run `onetower reindex`)")
        return version

    def previous_version(self) -> str | None:
        """The version that was active before the current one, while it is kept for rollback."""
        return self.swap_state().get("previous")

    def swap_state(self) -> dict[str, Any]:
        """``{"active", "previous", "retired_ms", "swapping_to"}`` as last recorded (empty before any swap)."""
        return self._get_meta("aliases") or {}

    def activate(self, version: str) -> None:
        """Point both aliases at ``version``; the version they left becomes the previous one.

        The intent is recorded first, so a crash between the two alias moves is finished by ``recover()``.
        """
        self.recover()
        if not self.has_version(version):
            raise VersionError(f"version {version!r} has no collections under prefix {self.settings.milvus_prefix!r}")
        current = self.active_version()
        if current == version:
            return
        state = self.swap_state()
        self._put_meta("aliases", {**state, "active": current, "swapping_to": version})
        self._move_aliases(version)
        self._put_meta("aliases", {"active": version, "previous": current,
                                   "retired_ms": int(time.time() * 1000) if current else None, "swapping_to": None})

    def _move_aliases(self, version: str) -> None:
        client = self.client
        for kind in ("users", "items"):  # items last: serving resolves the version from it
            alias, target = self.alias(kind), self.collection(kind, version)
            with self._calls(f"point alias {alias} at {target}"):
                if alias in client.list_aliases(timeout=self._timeout).get("aliases", []):
                    client.alter_alias(target, alias, timeout=self._timeout)
                else:
                    client.create_alias(target, alias, timeout=self._timeout)

    def recover(self) -> None:
        """Finish an alias swap that a crash interrupted (roll forward: the target was checked)."""
        state = self.swap_state()
        target = state.get("swapping_to")
        if target:
            self._move_aliases(target)
            self._put_meta("aliases", {"active": target, "previous": state.get("active"),
                                       "retired_ms": int(time.time() * 1000), "swapping_to": None})

    def rollback(self) -> str:
        """Re-activate the previous version; returns it. The version left becomes the new previous."""
        previous = self.previous_version()
        if previous is None or not self.has_version(previous):
            raise VersionError("no previous version to roll back to (none was kept, or its grace period ended)")
        self.activate(previous)
        return previous

    # -- metadata (a tiny collection: key -> JSON) --------------------------------------------------
    def version_info(self, version: str) -> dict[str, Any] | None:
        """What the re-index recorded about ``version``: model_dir, state, started_ms, counts."""
        return self._get_meta(f"version:{version}")

    def record_version(self, version: str, **info: Any) -> dict[str, Any]:
        """Merge ``info`` into the version's record and return it."""
        merged = {**(self.version_info(version) or {}), **info, "version": version}
        self._put_meta(f"version:{version}", merged)
        return merged

    def _ensure_meta(self) -> None:
        client = self.client
        with self._calls(f"create {self._meta}"):
            if client.has_collection(self._meta, timeout=self._timeout):
                return
            schema = MilvusClient.create_schema(auto_id=False, description="onetower indexer metadata")
            schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=512)
            schema.add_field("value", DataType.JSON)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=_META_DIM)
            params = client.prepare_index_params()
            params.add_index(field_name="vector", index_type="FLAT", metric_type="L2")
            client.create_collection(self._meta, schema=schema, index_params=params, timeout=self._timeout)

    def _get_meta(self, key: str) -> dict[str, Any] | None:
        with self._calls(f"read {self._meta}"):
            if not self.client.has_collection(self._meta, timeout=self._timeout):
                return None  # reads create nothing (`onetower versions` on an empty prefix stays empty)
            rows = self.client.query(self._meta, filter=id_filter("key", [key]), output_fields=["value"],
                                     consistency_level="Strong", timeout=self._timeout)
        return rows[0]["value"] if rows else None

    def _put_meta(self, key: str, value: dict[str, Any]) -> None:
        self._ensure_meta()
        with self._calls(f"write {self._meta}"):
            self.client.upsert(self._meta, [{"key": key, "value": value, "vector": [1.0] + [0.0] * (_META_DIM - 1)}],
                               timeout=self._timeout)

    def _delete_meta(self, key: str) -> None:
        self._ensure_meta()
        with self._calls(f"write {self._meta}"):
            self.client.delete(self._meta, filter=id_filter("key", [key]), timeout=self._timeout)

    def collect_garbage(self, grace_s: float, keep: Sequence[str] = ()) -> list[str]:
        """Drop every version but the active one, ``keep``, and the previous one while its grace period
        lasts; returns the versions dropped."""
        state = self.swap_state()
        retired_ms = state.get("retired_ms") or 0
        kept = {self.active_version(), *keep}
        if state.get("previous") and time.time() * 1000 - retired_ms < grace_s * 1000:
            kept.add(state["previous"])
        dropped = [v for v in self.versions() if v not in kept]
        for version in dropped:
            self.drop_version(version)
        return dropped

    def drop_all(self) -> None:
        """Drop every alias and collection under this prefix (tests, and `onetower reindex --drop-all`)."""
        client = self.client
        prefix = self.settings.milvus_prefix
        with self._calls("drop collections"):
            for alias in client.list_aliases(timeout=self._timeout).get("aliases", []):
                if alias in (self.alias(kind) for kind in KINDS):
                    client.drop_alias(alias, timeout=self._timeout)
            for name in client.list_collections(timeout=self._timeout):
                if name == self._meta or any(name.startswith(f"{prefix}{kind}__") for kind in KINDS):
                    client.drop_collection(name, timeout=self._timeout)
