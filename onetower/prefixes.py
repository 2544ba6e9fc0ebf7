"""Prefixes isolate deployments sharing one Kafka, Redis and Milvus: topic names, Redis keys and
Milvus collections all start with them. Tests and benchmarks take fresh ones and purge them after.
"""

from __future__ import annotations

import uuid

from core.settings import Settings


def isolated(base: Settings, tag: str = "t", **overrides: object) -> Settings:
    """A copy of ``base`` whose topics, Redis keys and Milvus collections nothing else touches."""
    name = tag + uuid.uuid4().hex[:10]
    return base.model_copy(update={"topic_prefix": f"{name}.", "redis_key_prefix": f"{name}:",
                                   "milvus_prefix": f"{name}_", **overrides})


def purge(settings: Settings) -> None:
    """Drop the prefix's Milvus aliases and collections, Redis keys and Kafka topics."""
    from indexer.store import open_store
    from streams.state import StateStore
    from streams.topics import delete_topics

    open_store(settings).drop_all()
    StateStore.from_settings(settings).clear()
    delete_topics(settings)
