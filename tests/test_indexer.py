"""The vector store on Milvus (MilvusStore), candidates and the HTTP service on the real Milvus server
and redis-server (one test on Milvus Lite). Vectors are built with numpy here; the encoder paths are in test_indexer_reindex.py."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from indexer.api import create_app
from indexer.candidates import Retriever, UnknownUser
from indexer.filters import AllOf, AnyOf, Condition, InvalidFilter, Not
from indexer.milvus import MilvusStore
from indexer.vectors import IndexUnavailable, VersionError
from core.settings import Settings
from streams.events import EngagementEvent
from streams.state import StateStore

pytestmark = pytest.mark.stack

DIM = 512
ITEMS = [f"x{i}" for i in range(5)]
TITLES = ["Heat", 'x" or 1==1 or "', "back\\slash\\", "it's", "line\nbreak\x00\u2028😀"]  # attrs["title"] of ITEMS


def basis(i: int) -> np.ndarray:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def mix(weight: float, main: int, other: int) -> np.ndarray:
    """A unit vector with cosine ``weight`` to basis ``main`` (the rest on basis ``other``)."""
    return weight * basis(main) + np.sqrt(1 - weight**2) * basis(other)


# Two versions whose rankings differ: in v1 the user is basis 0 and x0 ranks first; in v2 the user is
# basis 1 and x4 ranks first. A user vector of one version against items of the other scores 0 everywhere.
VERSIONS = {
    "v1": (basis(0), np.stack([mix(0.9 - 0.1 * i, 0, 10 + i) for i in range(5)])),
    "v2": (basis(1), np.stack([mix(0.5 + 0.1 * i, 1, 20 + i) for i in range(5)])),
}
EXPECTED = {"v1": ITEMS, "v2": ITEMS[::-1]}


def build(index: MilvusStore, versions: tuple[str, ...] = ("v1", "v2")) -> None:
    for version in versions:
        user, items = VERSIONS[version]
        index.ensure_version(version)
        index.upsert_items(version, ITEMS, items, [{"updated_at": i, "attrs": {"year": 1990 + i, "title": TITLES[i]}} for i in range(5)])
        index.upsert_users(version, ["u"], user[None, :], [{"updated_at": 7, "attrs": {"age": 30}}])


def test_upsert_replace_delete(srv: Settings) -> None:
    index = MilvusStore(srv)
    build(index, ("v1",))
    hits = index.search_items(basis(0), 5, version="v1")
    assert [h.id for h in hits] == ITEMS and {h.model_version for h in hits} == {"v1"}
    assert hits[0].score == pytest.approx(0.9, abs=1e-5)
    assert index.stored("items", "v1") == {f"x{i}": i for i in range(5)}

    index.upsert_items("v1", ["x4"], basis(0)[None, :], [{"updated_at": 99}])  # replace: x4 now matches exactly
    hits = index.search_items(basis(0), 2, version="v1")
    assert [h.id for h in hits] == ["x4", "x0"] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert index.stored("items", "v1")["x4"] == 99 and index.count("items", "v1") == 5

    index.delete_items("v1", ["x4", "x0"])
    assert [h.id for h in index.search_items(basis(0), 5, version="v1")] == ["x1", "x2", "x3"]
    assert index.count("items", "v1") == 3
    np.testing.assert_allclose(index.get_user_vector("u", "v1"), basis(0))
    assert index.get_user_vector("nobody", "v1") is None

    with pytest.raises(ValueError, match="shape"):
        index.upsert_items("v1", ["y"], np.ones((1, 3)))
    with pytest.raises(VersionError, match="letters, digits"):
        index.ensure_version("bad.version")


def test_ensure_version_finishes_a_half_made_version(srv: Settings) -> None:
    """A process killed between create, index and load leaves a collection that takes upserts and
    answers no read; the next ensure_version (a restarted worker or re-index) finishes it."""
    index = MilvusStore(srv)
    index.ensure_version("v1")
    users, items = index.collection("users", "v1"), index.collection("items", "v1")
    index.client.release_collection(users)
    index.client.drop_index(users, "vector")  # killed after the create
    index.client.release_collection(items)  # killed after the index
    index.ensure_version("v1")
    build(index, ("v1",))
    assert [h.id for h in index.search_items(basis(0), 1, version="v1")] == ["x0"]
    np.testing.assert_allclose(index.get_user_vector("u", "v1"), basis(0))


def test_typed_filters_filter(srv: Settings) -> None:
    index = MilvusStore(srv)
    build(index, ("v1",))

    def found(f) -> list[str]:
        return [h.id for h in index.search_items(basis(0), 5, filter=f, version="v1")]

    assert found(Condition(field="year", op=">=", value=1993)) == ["x3", "x4"]
    assert found(Condition(field="year", op="in", value=[1990, 1994, 2000])) == ["x0", "x4"]
    assert found(AllOf(all=[Condition(field="year", op=">", value=1990), Not(not_=Condition(field="year", op="==", value=1992))])) == ["x1", "x3", "x4"]
    assert found(AnyOf(any=[Condition(field="year", op="<", value=1991), Condition(field="title", op="==", value="it's")])) == ["x0", "x3"]
    assert found(Condition(field="year", op="==", value="1990")) == []  # typed: a string is not the number
    assert found(Condition(field="missing", op="!=", value=1)) == ITEMS
    with pytest.raises(InvalidFilter, match="invalid filter"):  # one Milvus rejects (validation would have refused it)
        found(Condition.model_construct(field="year", op="in", value=[1990, "x"]))


def test_no_value_breaks_out_of_its_literal(srv: Settings) -> None:
    """Each stored title, quotes and backslashes included, matches its own item only; any other string nothing."""
    index = MilvusStore(srv)
    build(index, ("v1",))

    def titled(value: str) -> list[str]:
        hits = index.search_items(basis(0), 5, filter=Condition(field="title", op="==", value=value), version="v1")
        return [h.id for h in hits]

    for item, title in zip(ITEMS, TITLES):
        assert titled(title) == [item]
    for attack in ['" or 1==1 or "', '") or (attrs["year"] > 0', "\\", "x\\\" or 1==1 or \\\"", "' or 1==1 or '"]:
        assert titled(attack) == []

    @settings(max_examples=20, deadline=None)
    @given(st.text(alphabet='"\\\'\n\x00 ()[]=orandtx1', max_size=30))
    def only_equal_titles(value: str) -> None:
        assert titled(value) == [i for i, t in zip(ITEMS, TITLES) if t == value]

    only_equal_titles()


def test_alias_swap_during_queries_never_mixes_versions(srv: Settings) -> None:
    build(MilvusStore(srv))
    swapper = MilvusStore(srv)  # another client, as a re-index in another process would be
    swapper.activate("v1")
    retriever = Retriever(srv)
    done = threading.Event()

    def swap() -> None:
        try:
            for version in ("v2", "v1", "v2", "v1", "v2"):
                swapper.activate(version)
        finally:
            done.set()

    thread = threading.Thread(target=swap)
    thread.start()
    seen: dict[str, int] = {"v1": 0, "v2": 0}
    while not done.is_set():
        result = retriever.candidates("u", 5, exclude_seen=False)
        assert [item for item, _ in result.items] == EXPECTED[result.version], result
        assert result.items[0][1] > 0.85  # a mixed pair would score 0
        seen[result.version] += 1
    thread.join()
    assert seen["v1"] and seen["v2"], seen
    assert swapper.active_version() == "v2" and swapper.previous_version() == "v1"
    assert swapper.client.describe_alias(swapper.alias("users"))["collection_name"] == swapper.collection("users", "v2")


def test_rollback_and_drop(srv: Settings) -> None:
    index = MilvusStore(srv)
    build(index)
    with pytest.raises(VersionError, match="no previous version"):
        index.rollback()
    index.activate("v1")
    index.activate("v2")
    assert index.rollback() == "v1"
    assert (index.active_version(), index.previous_version()) == ("v1", "v2")
    assert Retriever(srv).candidates("u", 5, exclude_seen=False).version == "v1"
    with pytest.raises(VersionError, match="is active"):
        index.drop_version("v1")
    assert index.collect_garbage(grace_s=3600) == []  # the previous version is kept within its grace period
    assert index.collect_garbage(grace_s=0) == ["v2"]
    assert index.versions() == ["v1"] and index.previous_version() is None


def test_exclude_seen_keeps_k(srv: Settings) -> None:
    index = MilvusStore(srv)
    build(index, ("v1",))
    index.activate("v1")
    StateStore.from_settings(srv).apply_many([EngagementEvent(user_id="u", item_id=i) for i in ("x0", "x2")])
    retriever = Retriever(srv)
    result = retriever.candidates("u", 3)
    assert [i for i, _ in result.items] == ["x1", "x3", "x4"] and not result.cold_start
    assert [i for i, _ in retriever.candidates("u", 3, exclude_seen=False).items] == ["x0", "x1", "x2"]
    with pytest.raises(UnknownUser, match="ghost"):
        retriever.candidates("ghost", 3)


def test_http_status_codes(srv: Settings) -> None:
    index = MilvusStore(srv)
    build(index, ("v1",))
    client = TestClient(create_app(srv))
    assert client.get("/readyz").status_code == 503  # nothing active yet
    index.activate("v1")

    r = client.get("/v1/users/u/candidates", params={"k": 2})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v1" and [c["item_id"] for c in r.json()["items"]] == ["x0", "x1"]
    r = client.get("/v1/users/u/candidates", params={"k": 5, "filter": '{"field": "year", "op": ">=", "value": 1994}'})
    assert [c["item_id"] for c in r.json()["items"]] == ["x4"]
    r = client.get("/v1/users/u/candidates", params={"filter": '{"field": "title", "op": "!=", "value": "x\\" or 1==1 or \\""}'})
    assert [c["item_id"] for c in r.json()["items"]] == ["x0", "x2", "x3", "x4"]  # all but x1, whose title that is
    assert client.get("/v1/users/ghost/candidates").status_code == 404
    assert client.get("/v1/users/u/candidates", params={"k": 0}).status_code == 422
    assert client.get("/v1/users/u/candidates", params={"k": srv.candidates_max_k + 1}).status_code == 422
    r = client.get("/v1/users/u/candidates", params={"filter": 'attrs["year"] >= 1'})
    assert r.status_code == 422 and "Invalid JSON" in r.json()["detail"]
    r = client.get("/v1/users/u/candidates", params={"filter": '{"field": "year", "op": ">=", "value": [1]}'})
    assert r.status_code == 422 and "'in' takes a list" in r.json()["detail"]
    r = client.post("/v1/candidates", json={"filter": {"field": "year]", "op": "==", "value": 1}})
    assert r.status_code == 422 and "pattern" in r.text
    assert client.post("/v1/candidates", json={"k": "many"}).status_code == 422
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "version": "v1"}
    assert "/v1/users/{user_id}/candidates" in client.get("/openapi.json").json()["paths"]
    metrics = client.get("/metrics").text
    assert 'onetower_http_requests_total{route="/v1/users/{user_id}/candidates",status="404"} 1.0' in metrics

    down = TestClient(create_app(srv.model_copy(update={"milvus_uri": "http://127.0.0.1:1"})))
    r = down.get("/v1/users/u/candidates")
    assert r.status_code == 503 and r.json()["detail"] == "Milvus failed to connect"
    assert down.get("/readyz").status_code == 503
    assert down.get("/healthz").status_code == 200


def test_a_token_guards_the_candidates_routes_and_leaves_probes_open(srv: Settings) -> None:
    index = MilvusStore(srv)
    build(index, ("v1",))
    index.activate("v1")
    client = TestClient(create_app(srv.model_copy(update={"api_token": SecretStr("s3cret-token")})))
    route, body = "/v1/users/u/candidates", {"history": ["x0"], "k": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-toke"},
                    {"Authorization": "Basic czNjcmV0LXRva2Vu"}):
        r = client.get(route, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
        assert client.post("/v1/candidates", json=body, headers=headers).status_code == 401
    good = {"Authorization": "Bearer s3cret-token"}
    r = client.get(route, params={"k": 2}, headers=good)
    assert r.status_code == 200 and [c["item_id"] for c in r.json()["items"]] == ["x0", "x1"]
    assert client.post("/v1/candidates", json=body, headers=good).status_code != 401  # past the check (no encoder here: 503)
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert TestClient(create_app(srv)).get(route).status_code == 200  # no token set: open


ODD_IDS = ["9'33", 'say "hi"', "back\\slash", "all'\"\\", "trailing\\", "line\nbreak"]


def test_ids_with_quotes_and_backslashes_are_data(srv: Settings) -> None:
    """pymilvus' get and delete by ids paste ids between quotes: ``9'33`` broke the expression (503)."""
    index = MilvusStore(srv)
    build(index, ("v1",))
    index.activate("v1")
    index.upsert_users("v1", ODD_IDS, np.stack([basis(0)] * len(ODD_IDS)))
    index.upsert_items("v1", ODD_IDS, np.stack([basis(30 + i) for i in range(len(ODD_IDS))]))
    assert sorted(index.get_vectors("users", "v1", ODD_IDS, strong=True)) == sorted(ODD_IDS)
    assert index.get_vectors("users", "v1", ["9'", "'"], strong=True) == {}

    client = TestClient(create_app(srv))
    for user in ODD_IDS:
        r = client.get(f"/v1/users/{quote(user, safe='')}/candidates", params={"k": 1})
        assert r.status_code == 200 and r.json()["items"][0]["item_id"] == "x0", r.text
    stranger = "no'one\\"
    r = client.get(f"/v1/users/{quote(stranger, safe='')}/candidates")
    assert r.status_code == 404 and "127.0.0.1" not in r.text and "http://" not in r.text

    index.delete_users("v1", ODD_IDS[:3])
    index.delete_items("v1", ODD_IDS)
    assert sorted(index.get_vectors("users", "v1", ODD_IDS, strong=True)) == sorted(ODD_IDS[3:])
    assert index.count("items", "v1") == len(ITEMS)


def test_error_bodies_name_no_server_address(srv: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """Clients learn what failed; the addresses go to the server's log only."""
    index = MilvusStore(srv)
    build(index, ("v1",))
    index.activate("v1")
    no_redis = TestClient(create_app(srv.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})))
    no_milvus = TestClient(create_app(srv.model_copy(update={"milvus_uri": "http://127.0.0.1:1"})))
    with caplog.at_level(logging.WARNING, logger="onetower.api"):
        answers = [no_redis.get("/readyz"), no_redis.get("/v1/users/ghost/candidates"),
                   no_milvus.get("/readyz"), no_milvus.get("/v1/users/u/candidates")]
    assert [r.status_code for r in answers] == [503] * 4
    assert [r.json()["detail"] for r in answers] == ["Redis failed to answer"] * 2 + ["Milvus failed to connect"] * 2
    assert "redis://127.0.0.1:1/0" in caplog.text and "http://127.0.0.1:1" in caplog.text


def test_milvus_lite(srv: Settings, tmp_path: Path) -> None:
    lite = srv.model_copy(update={"milvus_uri": str(tmp_path / "onetower.db")})
    index = MilvusStore(lite)
    build(index)
    index.activate("v1")
    index.activate("v2")
    assert [i for i, _ in Retriever(lite, index=index).candidates("u", 5, exclude_seen=False).items] == EXPECTED["v2"]
    assert [h.id for h in index.search_items(basis(1), 5, filter=Condition(field="year", op="<", value=1992))] == ["x1", "x0"]
    index.delete_items("v2", ["x4"])
    assert index.count("items", "v2") == 4
    assert index.rollback() == "v1" and index.active_version() == "v1"
    index.close()


def test_unreachable_milvus_is_one_line(srv: Settings) -> None:
    with pytest.raises(IndexUnavailable, match=r"^Milvus at http://127.0.0.1:1 failed to connect: [^\n]+$"):
        MilvusStore(srv.model_copy(update={"milvus_uri": "http://127.0.0.1:1"})).active_version()
