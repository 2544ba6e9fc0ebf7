"""Blue/green re-index, rollback, resume, crash mid-swap, the items-topic source and the cold-start
paths, with a real (tiny, random) tower on the real Milvus server, redis-server and Kafka."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from indexer.api import create_app
from indexer.candidates import Retriever, UnknownUser
from indexer.reindex import ReindexError, reindex
from models.texts import item_texts, user_texts
from indexer.filters import Condition
from indexer.milvus import MilvusStore
from models.export import export_artifact
from models.encoder import Encoder
from models.testing import tiny_llama
from models.tower import build_tower
from onetower.cli import app
from core.settings import Settings, get_settings
from streams.events import EngagementEvent, ImpressionEvent, ItemEvent, UserEvent
from streams.producer import EventProducer
from streams.state import StateStore
from streams.topics import ensure_topics

pytestmark = pytest.mark.stack

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
GENRES = ["Drama", "Comedy", "Action"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two versions of one tiny random tower (the re-index does not care that their weights match)."""
    root = tmp_path_factory.mktemp("towers")
    base = tiny_llama(root / "llama")
    tower = build_tower(str(base), dim=512, max_seq_length=128)
    return {v: export_artifact(tower, root / v, version=v, base_model=str(base)).path for v in ("tiny_a", "tiny_b")}


def catalogue(store: StateStore, n: int = 6) -> None:
    """n movies, a user u1 who engaged with m0 and m1, an item with counts only, a deleted item."""
    events = [ItemEvent(item_id=f"m{i}", ts=T0, features={"title": f"Movie {i}", "genres": GENRES[i % 3], "year": 1990 + i})
              for i in range(n)]
    events += [ItemEvent(item_id="gone", ts=T0, features={"title": "Gone"}),
               ItemEvent(item_id="gone", ts=T0 + timedelta(seconds=1), deleted=True),
               ImpressionEvent(user_id="u1", item_id="counts_only", ts=T0),
               UserEvent(user_id="u1", ts=T0, features={"age": 31, "occupation": "writer"})]
    events += [EngagementEvent(user_id="u1", item_id=f"m{i}", ts=T0 + timedelta(minutes=i)) for i in (0, 1)]
    store.apply_many(events)
    store.refresh_percentile_tables()


def test_reindex_rollback_and_cold_start(srv: Settings, models: dict[str, Path], monkeypatch) -> None:  # noqa: F811
    store = StateStore.from_settings(srv)
    catalogue(store)
    report = reindex(srv, models["tiny_a"])
    assert (report.version, report.previous, report.items, report.users, report.item_source) == ("tiny_a", None, 6, 1, "redis")
    index = MilvusStore(srv)
    assert index.active_version() == "tiny_a" and index.count("items", "tiny_a") == 6
    assert index.version_info("tiny_a")["state"] == "active"

    # The stored vectors are the encoder's output on models.texts' texts.
    encoder = Encoder.load(models["tiny_a"])
    stored = index.get_vectors("items", "tiny_a", ["m3"], strong=True)["m3"]
    np.testing.assert_allclose(stored, encoder.encode(item_texts(store, ["m3"]))[0], atol=1e-5)
    (text,) = user_texts(store, ["u1"], tokenizer=encoder.tokenizer, max_tokens=encoder.max_seq_length, history_block=encoder.history_block)
    assert "Movie 0" in text and "Movie 1" in text and "writer" in text
    assert item_texts(store, ["gone", "counts_only", "nobody"]) == [None, None, None]

    retriever = Retriever(srv)
    warm = retriever.candidates("u1", 3)
    assert warm.version == "tiny_a" and not warm.cold_start and len(warm.items) == 3
    assert not {"m0", "m1"} & {i for i, _ in warm.items}
    assert [i for i, _ in retriever.candidates("u1", 6, filter=Condition(field="genres", op="==", value="Comedy")).items] == ["m4"]

    # A user who arrived after the re-index: encoded on the fly with the active version's encoder.
    store.apply_many([UserEvent(user_id="u2", features={"age": 20}), EngagementEvent(user_id="u2", item_id="m2")])
    cold = retriever.candidates("u2", 5)
    assert cold.cold_start and cold.version == "tiny_a" and len(cold.items) == 5 and "m2" not in dict(cold.items)
    expected = index.search_items(encoder.encode(user_texts(store, ["u2"], tokenizer=encoder.tokenizer,
                                                            max_tokens=encoder.max_seq_length, history_block=encoder.history_block))[0], 6)
    assert [i for i, _ in cold.items] == [h.id for h in expected if h.id != "m2"][:5]
    with pytest.raises(UnknownUser):
        retriever.candidates("ghost", 5)

    client = TestClient(create_app(srv))
    r = client.post("/v1/candidates", json={"features": {"age": 40}, "history": ["m3", "unknown_item"], "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cold_start"] and body["version"] == "tiny_a" and len(body["items"]) == 4
    assert "m3" not in {c["item_id"] for c in body["items"]}

    report = reindex(srv, models["tiny_b"])
    assert (report.version, report.previous) == ("tiny_b", "tiny_a")
    assert Retriever(srv).candidates("u2", 3).version == "tiny_b"
    with pytest.raises(ReindexError, match="already active"):
        reindex(srv, models["tiny_b"])

    # The CLI, on the same prefixes (it reads the process settings, i.e. the environment).
    for key in ("milvus_prefix", "redis_key_prefix", "milvus_read_consistency"):
        monkeypatch.setenv(f"ONETOWER_{key.upper()}", getattr(srv, key))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["rollback"])
        assert result.exit_code == 0 and "tiny_a active again; previous: tiny_b" in " ".join(result.output.split())
        result = CliRunner().invoke(app, ["candidates", "u1", "-k", "2", "--json"])
        assert result.exit_code == 0 and json.loads(result.output)["version"] == "tiny_a", result.output
        result = CliRunner().invoke(app, ["candidates", "ghost"])
        assert result.exit_code == 1 and "unknown user 'ghost'" in result.output
    finally:
        get_settings.cache_clear()
    assert (index.active_version(), index.previous_version()) == ("tiny_a", "tiny_b")


def test_reindex_resumes_and_a_crash_mid_swap_is_rolled_forward(srv: Settings, models: dict[str, Path]) -> None:  # noqa: F811
    store = StateStore.from_settings(srv)
    catalogue(store, n=4)
    index = MilvusStore(srv)
    # An interrupted build: one stale vector, one id that has left the state, the rest missing.
    index.record_version("tiny_b", state="building", model_dir=str(models["tiny_b"]), started_ms=0)
    index.ensure_version("tiny_b")
    index.upsert_items("tiny_b", ["m0", "dropped"], np.eye(2, 512, dtype=np.float32), [{"updated_at": -5}] * 2)
    report = reindex(srv, models["tiny_b"])
    assert report.resumed and report.items == 4 and index.count("items", "tiny_b") == 4
    assert set(index.stored("items", "tiny_b")) == {"m0", "m1", "m2", "m3"}
    m0 = index.get_vectors("items", "tiny_b", ["m0"], strong=True)["m0"]
    assert m0[0] < 0.99  # re-encoded, not the stale unit vector

    # A crash between the two alias moves of a swap to tiny_a (built but never activated) ...
    index.ensure_version("tiny_a")
    index._put_meta("aliases", {**index.swap_state(), "swapping_to": "tiny_a"})
    index.client.alter_alias(index.collection("users", "tiny_a"), index.alias("users"))
    # ... is finished by the next process that touches the versions, before anything else.
    fresh = MilvusStore(srv)
    fresh.recover()
    aliases = {kind: fresh.client.describe_alias(fresh.alias(kind))["collection_name"] for kind in ("items", "users")}
    assert aliases == {"items": fresh.collection("items", "tiny_a"), "users": fresh.collection("users", "tiny_a")}
    assert (fresh.active_version(), fresh.previous_version()) == ("tiny_a", "tiny_b")


def test_reindex_reads_the_items_topic_when_redis_has_no_items(srv: Settings, models: dict[str, Path]) -> None:  # noqa: F811
    ensure_topics(srv)
    with EventProducer(srv) as producer:
        producer.send_many([
            ItemEvent(item_id="k1", ts=T0, features={"title": "Old title"}),
            ItemEvent(item_id="k2", ts=T0, features={"title": "Second"}),
            ItemEvent(item_id="k3", ts=T0, features={"title": "Third"}),
            ItemEvent(item_id="k1", ts=T0 + timedelta(seconds=1), features={"title": "New title"}),
            ItemEvent(item_id="k3", ts=T0 + timedelta(seconds=1), deleted=True),
        ])
    StateStore.from_settings(srv).apply(UserEvent(user_id="u1", features={"age": 50}))
    report = reindex(srv, models["tiny_a"])
    assert (report.item_source, report.items, report.users) == ("kafka", 2, 1)
    index = MilvusStore(srv)
    hits = index.search_items(np.ones(512, dtype=np.float32), 5, filter=Condition(field="title", op="==", value="New title"))
    assert [h.id for h in hits] == ["k1"]
