"""The refresher with ``incremental_users`` (and ``incremental_items``) on, on the real Redis and Milvus:
users and items go through the cached keys/values and get the vectors the full path would have
written; off by default."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from models.texts import item_texts, user_texts
from indexer.milvus import MilvusStore
from models.encoder import Encoder
from models.incremental import OnnxDecoder
from core.settings import Settings
from streams.events import EngagementEvent, ItemEvent, UserEvent
from indexer.refresher import Refresher
from streams.state import StateStore
from tests.test_refresher import T0, at, stored
from tests.test_worker import tiny_model  # noqa: F401  (the fixture)

pytestmark = pytest.mark.stack


def refresh_users(r: Refresher) -> None:
    r.refresh("users", r.store.pop_dirty("users", 10, int(time.time() * 1000) + 1))


def test_users_and_items_are_refreshed_incrementally_with_the_full_paths_vectors(srv: Settings, tiny_model: Path) -> None:  # noqa: F811
    encoder = Encoder.load(tiny_model)
    assert Refresher(srv, StateStore.from_settings(srv), encoder, MilvusStore(srv)).incremental is None  # off by default
    settings = srv.model_copy(update={"incremental_users": True, "incremental_items": True})
    r = Refresher(settings, StateStore.from_settings(settings), encoder, MilvusStore(settings))
    r.start()
    assert isinstance(r.incremental.decoder, OnnxDecoder)  # the artifact carries its decoder graph
    r.store.apply_many([ItemEvent(item_id=f"m{i}", features={"title": f"Movie {i}", "year": 1990 + i}, ts=at(T0)) for i in range(3)]
                       + [UserEvent(user_id="u", features={"age": 30}, ts=at(T0))])
    r.refresh("items", r.store.pop_dirty("items", 10, int(time.time() * 1000) + 1))
    assert {"items:m0", "items:m1", "items:m2"} <= set(r.incremental.cache)
    for item, text in zip(["m0", "m1", "m2"], item_texts(r.store, ["m0", "m1", "m2"])):
        assert float(stored(r.index, "items", encoder.version, item)[0] @ encoder.encode([text])[0]) >= 0.9999
    hits = REGISTRY.get_sample_value("onetower_incremental_hits_total") or 0.0
    for n in range(3):
        r.store.apply(EngagementEvent(user_id="u", item_id=f"m{n}", ts=at(T0 + 1 + n)))
        refresh_users(r)
        vector, updated_at = stored(r.index, "users", encoder.version, "u")
        text = user_texts(r.store, ["u"], tokenizer=encoder.tokenizer, max_tokens=encoder.max_seq_length, history_block=encoder.history_block)
        assert updated_at == T0 + 1 + n
        assert float(vector @ encoder.encode(text)[0]) >= 0.9999
    assert REGISTRY.get_sample_value("onetower_incremental_hits_total") == hits + 2  # the first was a miss
    assert np.isclose(np.linalg.norm(vector), 1, atol=1e-5)
