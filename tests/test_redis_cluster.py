"""The state layout on Redis Cluster: every script touches one hash slot, the local stack's cluster
survives a node restart (its scripts are loaded again), and durability is checked on every primary."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
from redis.crc import key_slot

from core.settings import Settings
from onetower import stack
from onetower.prefixes import isolated
from streams.events import EngagementEvent, Event, ImpressionEvent, ItemEvent, UserEvent
from streams.rules import RULES, Keys
from streams.state import StateStore

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def some_events(n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    user, item = lambda: f"u{rng.randrange(50)}", lambda: f"i{rng.randrange(50)}"  # noqa: E731
    return [rng.choice([ItemEvent(item_id=item(), features={"title": "t"}, ts=T0), UserEvent(user_id=user(), ts=T0),
                        ImpressionEvent(user_id=user(), item_id=item(), ts=T0), EngagementEvent(user_id=user(), item_id=item(), ts=T0)])
            for _ in range(n)]


def test_every_script_touches_one_slot() -> None:
    """Each part's claim and keys, and its shard's queues, hash to one slot (else a cluster replies CROSSSLOT)."""
    keys, settings = Keys("ot:", 16), Settings()
    for event in some_events(200, seed=1):
        rule = RULES[type(event)]
        for part, call in zip(rule.parts, rule.redis_calls(event, keys, settings, 0)):
            shard = keys.shard(call.entity)
            touched = [keys.claim(event, part, call.entity), *call.keys, keys.in_shard(shard, "inflight:users"),
                       keys.in_shard(shard, "dirty:items:counts"), keys.in_shard(shard, "vec:m:items")]
            assert len({key_slot(k.encode()) for k in touched}) == 1, touched


@pytest.mark.stack
def test_durability_is_checked_on_every_primary(redis_cluster: Settings) -> None:
    store = StateStore.from_settings(redis_cluster)
    assert store.durability_issue() is None
    node = stack.cluster_nodes(redis_cluster)[2]
    node_client = store.r.get_node(host="127.0.0.1", port=node.port)
    store.r.config_set("appendfsync", "everysec", target_nodes=node_client)
    try:
        assert f"127.0.0.1:{node.port}" in (store.durability_issue() or "")
    finally:
        store.r.config_set("appendfsync", "always", target_nodes=node_client)


@pytest.mark.stack
def test_a_restarted_node_rejoins_with_its_state_and_gets_the_scripts_again(private_redis_cluster: Settings) -> None:
    store = StateStore.from_settings(private_redis_cluster)
    before, after = some_events(100, seed=2), some_events(100, seed=3)
    assert all(store.apply_many(before))
    users = sorted({e.user_id for e in before + after if hasattr(e, "user_id")})
    node = stack.cluster_nodes(private_redis_cluster)[1]
    node.stop()  # SIGTERM: its AOF (fsync always) holds every reply it gave
    rows = stack.start_redis(private_redis_cluster)  # starts it again; it rejoins from its nodes.conf
    assert [row.ready for row in rows] == [True] * stack.CLUSTER_NODES
    # Its script cache is empty: the first calls there reply NOSCRIPT, and the store loads the scripts again.
    assert all(store.apply_many(after))
    assert store.apply_many(before + after) == [False] * len(before + after)
    fresh = StateStore.from_settings(isolated(private_redis_cluster))
    try:
        fresh.apply_many(before + after)
        assert store.users(users) == fresh.users(users)
    finally:
        fresh.clear()
