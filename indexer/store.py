"""The one place that picks the vector store implementation from the settings."""

from __future__ import annotations

from core.settings import Settings
from indexer.milvus import MilvusStore
from indexer.vectors import VectorStore


def open_store(settings: Settings) -> VectorStore:
    """The vector store the settings name: Milvus, a server (``milvus_uri`` an URL) or Lite (a file path).
    Nothing connects until the first call, so a process can start while the store is down."""
    return MilvusStore(settings)
