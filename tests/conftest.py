"""Shared fixtures. Tests that need servers use the real local stack (``onetower stack up``), and
isolate themselves with unique topic, Redis-key and Milvus-collection prefixes instead of mocks."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from onetower import stack  # noqa: E402
from onetower.settings import Settings  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that restart the shared stack run last, so no other test sees it go away."""
    items.sort(key=lambda item: item.get_closest_marker("restarts_stack") is not None)


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings of the shared local stack, as the environment gives them."""
    return Settings()


@pytest.fixture(scope="session")
def local_stack(base_settings: Settings) -> Settings:
    """Start (or find running) the real Kafka, Redis and Milvus servers once per session."""
    stack.up(base_settings)
    return base_settings


def unique_settings(base: Settings, **overrides: object) -> Settings:
    """A copy of ``base`` whose topics, Redis keys and Milvus collections no other test touches."""
    tag = "t" + uuid.uuid4().hex[:10]
    return base.model_copy(update={"topic_prefix": f"{tag}.", "redis_key_prefix": f"{tag}:",
                                   "milvus_prefix": f"{tag}_", **overrides})


@pytest.fixture()
def settings(local_stack: Settings) -> Settings:
    """Per-test settings on the real stack, isolated by unique prefixes."""
    return unique_settings(local_stack)
