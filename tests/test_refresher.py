"""Two refreshers (two "workers") on one state, in process, on the real Redis and Milvus: a worker that
stalls past its lease must not leave an older vector in place of the newer one."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from indexer.milvus import MilvusStore
from models.encoder import Encoder
from core.settings import Settings
from streams.events import EngagementEvent, ItemEvent, UserEvent
from indexer.refresher import STALE_WRITES, Refresher
from streams.state import StateStore
from tests.test_worker import tiny_model  # noqa: F401  (the fixture)

pytestmark = pytest.mark.stack

T0 = 1_700_000_000_000


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def refresher(settings: Settings, encoder: Encoder) -> Refresher:
    r = Refresher(settings, StateStore.from_settings(settings), encoder, MilvusStore(settings))
    r.start()
    return r


def stored(index: MilvusStore, kind: str, version: str, id_: str) -> tuple[np.ndarray, int] | None:
    rows = index.client.query(index.collection(kind, version), ids=[id_], output_fields=["vector", "updated_at"],
                              consistency_level="Strong")
    return (np.asarray(rows[0]["vector"], dtype=np.float32), rows[0]["updated_at"]) if rows else None


def test_an_older_render_written_after_a_newer_one_does_not_win(srv: Settings, tiny_model: Path) -> None:  # noqa: F811
    encoder = Encoder.load(tiny_model)
    slow = refresher(srv.model_copy(update={"refresh_lease_s": 0.05}), encoder)
    fast = refresher(srv, encoder)
    store, index, version = fast.store, fast.index, encoder.version
    store.apply_many([ItemEvent(item_id=i, features={"title": f"Movie {i}"}, ts=at(T0)) for i in ("m0", "m1")]
                     + [UserEvent(user_id="u", features={"age": 30}, ts=at(T0)),
                        EngagementEvent(user_id="u", item_id="m0", ts=at(T0 + 1))])
    settled = int(time.time() * 1000) + 1
    fast.refresh("items", fast.store.pop_dirty("items", 10, settled))

    stalled = slow.store.pop_dirty("users", 10, settled)
    assert stalled.ids == ["u"]
    old = slow.encode("users", stalled.ids)  # the slow worker read and encoded u's state ...
    store.apply(EngagementEvent(user_id="u", item_id="m1", ts=at(T0 + 2)))
    time.sleep(0.2)  # ... and stalls past its lease, while u changes
    taken = fast.store.pop_dirty("users", 10, int(time.time() * 1000) + 1)
    assert taken.ids == ["u"]
    fast.refresh("users", taken)
    newer = stored(index, "users", version, "u")
    assert newer is not None and newer[1] == T0 + 2

    skipped = STALE_WRITES.labels("users")._value.get()
    slow.write("users", stalled, old)  # the older render arrives last
    vector, updated_at = stored(index, "users", version, "u")
    assert updated_at == T0 + 2 and np.array_equal(vector, newer[0])
    assert STALE_WRITES.labels("users")._value.get() == skipped + 1
    assert not np.allclose(old.vectors[0], newer[0])  # the premise: the two renders differ

    # The stalled worker's lease was lost, so u is queued once more; that encode writes the same state.
    again = fast.store.pop_dirty("users", 10, int(time.time() * 1000) + 1)
    assert again.ids == ["u"]
    fast.refresh("users", again)
    assert stored(index, "users", version, "u")[1] == T0 + 2
    assert store.dirty_count("users") == 0


def test_bucket_moves_come_after_users_in_small_batches(srv: Settings, tiny_model: Path) -> None:  # noqa: F811
    r = refresher(srv.model_copy(update={"refresh_batch": 16, "refresh_debounce_s": 0.0}), Encoder.load(tiny_model))
    store = r.store
    items = [f"m{n}" for n in range(20)]
    store.apply_many([ItemEvent(item_id=i, features={"title": f"Movie {i}"}, ts=at(T0)) for i in items])
    store.ack_dirty("items", store.pop_dirty("items", 100, int(time.time() * 1000) + 1))
    store.refresh_percentile_tables()  # no buckets stored yet: every item is queued for a bucket move
    assert store.dirty_count("items") == 20
    store.apply_many([UserEvent(user_id=f"u{n}", features={"age": 20 + n}, ts=at(T0)) for n in range(16)]
                     + [ItemEvent(item_id="new", features={"title": "New"}, ts=at(T0))])

    assert r.run_once() == 1 + 16 + 2  # the new item, a full batch of users, then 16 // 8 moves
    assert store.dirty_count("users") == 0 and store.dirty_count("items") == 18
    assert r.run_once() == 2
    assert store.dirty_count("items") == 16
    written = r.index.client.query(r.index.collection("items", r.version), ids=items + ["new"], output_fields=["id"],
                                   consistency_level="Strong")
    assert len(written) == 5


class CountingStore(StateStore):
    """The real store, counting its percentile fits (each one scans the keyspace)."""

    fits = 0

    def refresh_percentile_tables(self, batch: int = 1000) -> dict:
        self.fits += 1
        return super().refresh_percentile_tables(batch)


def test_an_idle_worker_fits_no_tables_until_items_come(srv: Settings, tiny_model: Path) -> None:  # noqa: F811
    settings = srv.model_copy(update={"refresh_debounce_s": 0.0})
    store = CountingStore(StateStore.from_settings(settings).r, settings)
    r = Refresher(settings, store, Encoder.load(tiny_model), MilvusStore(settings))
    r.start()
    assert store.fits == 1 and store.percentile_tables() == {}  # nothing to fit on yet
    for _ in range(3):
        r._tables_loaded = 0.0  # the tables' reload is due
        r.run_once()
    assert store.fits == 1  # an idle worker does not scan every second
    store.apply(ItemEvent(item_id="m0", features={"title": "Movie m0"}, ts=at(T0)))
    r.run_once()
    assert store.fits == 2 and store.percentile_tables()  # fitted by the first items' refresh
    assert stored(r.index, "items", r.version, "m0") is not None
