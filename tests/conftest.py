"""Shared fixtures. Tests that need servers use the real local stack (``onetower stack up``), and
isolate themselves with unique topic, Redis-key and Milvus-collection prefixes instead of mocks."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from onetower import stack  # noqa: E402
from onetower.prefixes import isolated as unique_settings  # noqa: E402
from onetower.prefixes import purge  # noqa: E402
from core.settings import Settings  # noqa: E402


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


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory, base_settings: Settings) -> Iterator[Settings]:
    """Kafka and Redis on other ports and another state dir, so stopping them leaves the shared stack alone;
    whatever a test started on them is stopped afterwards, even when the test failed.

    Milvus standalone cannot run twice on one machine (its embedded etcd binds fixed ports), so this
    stack uses Milvus Lite; the server's own restart is tested on the shared stack, last.
    """
    state = tmp_path_factory.mktemp("stack")
    private = base_settings.model_copy(update={
        "state_dir": state, "kafka_bootstrap": "127.0.0.1:19092", "kafka_controller_port": 19093,
        "redis_url": "redis://127.0.0.1:16379/0", "milvus_uri": str(state / "lite.db"), "kafka_heap": "256m",
    })
    try:
        yield private
    finally:
        stack.down(private)


@pytest.fixture()
def settings(local_stack: Settings) -> Settings:
    """Per-test settings on the real stack, isolated by unique prefixes."""
    return unique_settings(local_stack)


@pytest.fixture()
def srv(settings: Settings) -> Iterator[Settings]:
    """Per-test settings that read their own writes, with the test's collections and keys dropped after.
    Strong, not Session: Milvus 2.3.5 returns no timestamp for a delete, so Session reads miss deletes."""
    s = settings.model_copy(update={"milvus_read_consistency": "Strong"})
    yield s
    purge(s)


import random  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A port p such that the local cluster's nodes (p, p+1, p+2) and their cluster bus ports (+10000) are free."""
    for base in random.sample(range(20000, 30000, stack.CLUSTER_NODES), 500):
        if all(_port_free(port) for n in range(stack.CLUSTER_NODES) for port in (base + n, base + n + 10000)):
            return base
    raise RuntimeError("no free ports for a private Redis Cluster")


@pytest.fixture()
def private_redis(local_stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    """The shared stack's settings but with a redis-server of the test's own (a free port, AOF on, as the
    stack runs it), so a test can stop and restart Redis without touching anyone else's; stopped after."""
    private = local_stack.model_copy(update={"state_dir": tmp_path / "private-redis",
                                             "redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    server = stack.Redis(private)
    server.start()
    try:
        yield private
    finally:
        server.stop()


def _cluster(base: Settings, state_dir: Path) -> Iterator[Settings]:
    """``base`` with Redis on a three-node Redis Cluster of its own (free ports, ``state_dir``), stopped after."""
    private = base.model_copy(update={"state_dir": state_dir, "redis_cluster": True,
                                      "redis_url": f"redis://127.0.0.1:{free_cluster_port()}/0"})
    try:
        stack.start_redis(private)
        yield private
    finally:
        for node in stack.cluster_nodes(private):
            node.stop()


@pytest.fixture(scope="session")
def redis_cluster(local_stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The shared stack's settings but with Redis on a private Redis Cluster, started once per session."""
    yield from _cluster(local_stack, tmp_path_factory.mktemp("redis-cluster"))


@pytest.fixture()
def private_redis_cluster(local_stack: Settings, tmp_path: Path) -> Iterator[Settings]:
    """A Redis Cluster of the test's own (it may stop and restart nodes), isolated by unique prefixes."""
    yield from _cluster(unique_settings(local_stack), tmp_path / "redis-cluster")


@pytest.fixture(params=["standalone", "cluster"])
def any_redis(request: pytest.FixtureRequest, local_stack: Settings) -> Settings:
    """Per-test settings isolated by unique prefixes, once on the shared redis-server and once on a private Redis Cluster."""
    return unique_settings(request.getfixturevalue("redis_cluster") if request.param == "cluster" else local_stack)
