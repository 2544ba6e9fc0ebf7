"""The local stack's lifecycle on its own ports, and clients from settings doing a real write/read."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
import redis
from pymilvus import DataType, MilvusClient

from onetower import stack
from core.settings import Settings

pytestmark = pytest.mark.stack


def _family(pids: list[int]) -> list[int]:
    """The pids and all their descendants."""
    return [p.pid for pid in pids for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]]


def _alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_up_twice_is_a_no_op_and_down_leaves_no_process(private_stack: Settings) -> None:
    first = stack.up(private_stack)
    assert [s.name for s in first] == ["redis", "kafka"] and all(s.ready for s in first)
    pids = {s.name: s.pid for s in first}
    family = _family(list(pids.values()))

    second = stack.up(private_stack)
    assert {s.name: s.pid for s in second} == pids, "a second up must not start anything"

    stack.down(private_stack)
    assert _alive(family) == []
    assert not any(s.ready or s.pid for s in stack.status(private_stack))


@pytest.mark.restarts_stack
def test_milvus_server_stops_without_orphans_and_restarts(local_stack: Settings) -> None:
    """The Milvus wrapper orphans its child on SIGTERM; the supervisor must stop it through its API."""
    milvus = stack.Milvus(local_stack)
    before = milvus.start()
    family = _family([before.pid])
    assert len(family) >= 2, "milvus runs as a child of its supervisor"
    milvus.stop()
    assert _alive(family) == []
    after = milvus.start()
    assert after.ready and after.pid != before.pid


def test_up_refuses_a_port_that_something_else_holds(private_stack: Settings, local_stack: Settings) -> None:
    clash = private_stack.model_copy(update={"redis_url": local_stack.redis_url})
    with pytest.raises(stack.StackError, match="something else already listens on 127.0.0.1:6379"):
        stack.Redis(clash).start()


def test_redis_from_settings_writes_and_reads(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    key = f"{settings.redis_key_prefix}probe"
    client.set(key, "1", ex=60)
    assert client.get(key) == b"1"
    client.delete(key)


def test_milvus_from_settings_writes_and_reads(settings: Settings) -> None:
    client = MilvusClient(uri=settings.milvus_uri, token=settings.milvus_token)
    name = f"{settings.milvus_prefix}probe"
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=8)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="COSINE")
    client.create_collection(name, schema=schema, index_params=index)
    try:
        vec = np.eye(8, dtype=np.float32)
        client.insert(name, [{"id": f"v{i}", "vector": vec[i].tolist()} for i in range(8)])
        client.load_collection(name)
        hits = client.search(name, [vec[3].tolist()], limit=1, consistency_level="Strong")
        assert hits[0][0]["id"] == "v3"
    finally:
        client.drop_collection(name)
