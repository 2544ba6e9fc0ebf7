"""What a worker treats as applied (a script's reply; its offsets are committed after) survives a Redis
crash: the local stack's redis-server replies after the AOF fsync, and restarts from that file."""

from __future__ import annotations

import os
import signal
from datetime import datetime, timezone
from typing import Iterator

import pytest

from onetower import stack
from core.settings import Settings
from streams.events import EngagementEvent, ItemEvent, UserEvent
from streams.state import StateStore

pytestmark = pytest.mark.stack


@pytest.fixture()
def own_redis(tmp_path, base_settings: Settings) -> Iterator[stack.Redis]:
    """A redis-server of the local stack's kind on its own port and state dir, stopped after."""
    server = stack.Redis(base_settings.model_copy(update={"state_dir": tmp_path, "redis_url": "redis://127.0.0.1:16479/0"}))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_an_acknowledged_batch_is_in_the_aof_and_survives_a_crash(own_redis: stack.Redis) -> None:
    store = StateStore.from_settings(own_redis.settings)
    assert store.durability_issue() is None  # a reply waits for the fsync: what was acknowledged is on disk
    ts = datetime(2026, 1, 1, tzinfo=timezone.utc)
    events = [UserEvent(user_id="u", features={"age": 30}, ts=ts), ItemEvent(item_id="m", features={"title": "Heat"}, ts=ts),
              EngagementEvent(user_id="u", item_id="m", ts=ts)]
    assert store.apply_many(events) == [True] * 3
    before = (store.users(["u"]), store.items(["m"]))

    os.killpg(own_redis.pid(), signal.SIGKILL)  # a crash: no shutdown, no final rewrite of the AOF
    own_redis.stop()
    own_redis.start()  # from its AOF
    store = StateStore.from_settings(own_redis.settings)
    assert (store.users(["u"]), store.items(["m"])) == before
    assert store.apply_many(events) == [False] * 3  # the idempotency keys came back too


def test_a_server_that_syncs_once_a_second_is_reported(own_redis: stack.Redis) -> None:
    store = StateStore.from_settings(own_redis.settings)
    store.r.config_set("appendfsync", "everysec")
    assert "everysec" in (store.durability_issue() or "")
