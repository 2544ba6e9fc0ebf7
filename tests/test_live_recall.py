"""Live recall against the real Kafka, Redis and Milvus: a MovieLens slice replayed through a worker
scored at rate 1.0 gives the recall an offline ranking of the same engagements gives."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from indexer.live_recall import KS, compare, figures
from indexer.reindex import Reindexer
from indexer.milvus import MilvusStore
from models.encoder import Encoder
from onetower.prefixes import purge
from core.settings import Settings
from streams.events import EngagementEvent
from streams.movielens import events_from_wheel, recbole_wheel
from streams.producer import EventProducer
from streams.state import StateStore
from tests.test_worker import onetower, onetower_env, poll, tiny_model  # noqa: F401 (tiny_model is a fixture)

pytestmark = [pytest.mark.stack, pytest.mark.slow]

HISTORY = 1500  # engagements applied before the index is built
PROBES = 150  # engagements then streamed through the worker and scored
ANN_TOLERANCE = 0.03  # HNSW at ef 256 over ~1,000 items is all but exact; ties may order differently


@pytest.fixture()
def lsettings(settings: Settings) -> Iterator[Settings]:
    s = settings.model_copy(update={"live_recall_sample_rate": 1.0, "live_recall_max_per_s": 10_000.0})
    yield s
    purge(s)


@pytest.fixture()
def scoring_worker(lsettings: Settings, tiny_model: Path, tmp_path: Path) -> Iterator[None]:
    """A worker that applies events and scores every engagement, without refreshing vectors: the user
    vectors stay those of the index, so an offline ranking can reproduce every rank."""
    env = {**onetower_env(lsettings), "ONETOWER_LIVE_RECALL_SAMPLE_RATE": "1.0", "ONETOWER_LIVE_RECALL_MAX_PER_S": "10000"}
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "onetower", "worker", "--no-refresh", "--model", str(tiny_model)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)
    yield
    proc.kill()
    proc.wait(timeout=60)


def offline_ranks(index: MilvusStore, version: str, seen: dict[str, set[str]], probes: list[EngagementEvent],
                  items: list[str]) -> list[tuple[int, bool]]:
    """Exact ranks (1-based, seen items excluded) of each probe's item, in stream order, each with
    whether the user's vector was current then (no engagement of the user earlier in the stream)."""
    item_vecs = index.get_vectors("items", version, items, strong=True)
    ids = list(item_vecs)
    matrix = np.stack([item_vecs[i] for i in ids])
    users = index.get_vectors("users", version, sorted({p.user_id for p in probes}), strong=True)
    ranks, engaged = [], set()
    for p in probes:
        before = seen.setdefault(p.user_id, set())
        if p.item_id not in before and p.user_id in users:
            scores = matrix @ users[p.user_id]
            unseen = np.array([i not in before for i in ids])
            ranks.append((1 + int(np.sum(unseen & (scores > scores[ids.index(p.item_id)]))), p.user_id not in engaged))
        before.add(p.item_id)
        engaged.add(p.user_id)
    return ranks


def test_live_recall_equals_an_offline_ranking_of_the_same_engagements(
        lsettings: Settings, tiny_model: Path, scoring_worker: None) -> None:
    events = events_from_wheel(recbole_wheel(lsettings))
    history, rest = events["engagements"][:HISTORY], events["engagements"][HISTORY:]
    known = {e.user_id for e in history}
    probes = [e for e in rest if e.user_id in known][:PROBES]
    items = sorted({e.item_id for e in history + probes})
    store, index = StateStore.from_settings(lsettings), MilvusStore(lsettings)
    store.apply_many([e for e in events["items"] if e.item_id in set(items)]
                     + [e for e in events["users"] if e.user_id in known] + history)
    encoder = Encoder.load(tiny_model)
    Reindexer(lsettings, encoder, index=index, store=store).run(tiny_model)
    seen = {u: store.engaged_items(u) for u in known}
    expected = offline_ranks(index, encoder.version, seen, probes, items)

    with EventProducer(lsettings) as producer:
        producer.send_many(probes)
    got = poll("every probe scored", lambda: [f for f in figures(store) if f.window == "1h" and f.scored >= len(expected)])[0]

    assert got.version == encoder.version and got.scored == len(expected)
    current = [r for r, fresh in expected if fresh]  # the worker does not refresh: a user's later probes meet a stale vector
    assert 0 < len(current) < len(expected) and got.fresh.scored == len(current)
    for k in KS:
        offline = sum(r <= k for r, _ in expected) / len(expected)
        assert got.recall[k] == pytest.approx(offline, abs=ANN_TOLERANCE), k
        assert got.fresh.recall[k] == pytest.approx(sum(r <= k for r in current) / len(current), abs=ANN_TOLERANCE), k
        assert 0.0 <= got.popularity[k] <= 1.0
    assert got.recall[10] <= got.recall[50] <= got.recall[100] and got.popularity[10] <= got.popularity[100]

    printed = json.loads(onetower(lsettings, "quality", "--json"))
    assert {(row["version"], row["window"], row["scored"], row["fresh"]["scored"]) for row in printed} >= {
        (encoder.version, "24h", len(expected), len(current))}


def test_promotion_compares_the_same_engagements_in_both_versions(lsettings: Settings) -> None:
    store = StateStore.from_settings(lsettings)
    key = store._q("lr:pairs:new")
    store.r.lpush(key, "3,0", "0,7", "12,9", "0,0")  # (active rank, candidate rank); 0 = beyond 100
    result = compare(store, "new", "old", n=10)
    assert (result.engagements, result.candidate_recall, result.active_recall, result.passed) == (4, 0.5, 0.25, True)
    assert compare(store, "new", "old", n=2).engagements == 2
    store.r.lpush(key, "1,0", "2,0", "3,0")
    assert not compare(store, "new", "old", n=10).passed


def test_a_reindex_promotes_only_on_live_recall_scored_in_both_versions(
        lsettings: Settings, tiny_model: Path, scoring_worker: None, tmp_path: Path) -> None:
    from models.export import export_artifact
    from models.tower import build_tower

    base = tiny_model.parent / "llama"
    shadow = export_artifact(build_tower(str(base), max_seq_length=128), tmp_path / "shadow", base_model=str(base),
                             version="tiny_shadow").path
    events = events_from_wheel(recbole_wheel(lsettings))
    history, rest = events["engagements"][:500], events["engagements"][500:]
    known = {e.user_id for e in history}
    stream = [e for e in rest if e.user_id in known]
    store, index = StateStore.from_settings(lsettings), MilvusStore(lsettings)
    store.apply_many(events["items"] + [e for e in events["users"] if e.user_id in known] + history)
    Reindexer(lsettings, Encoder.load(tiny_model), index=index, store=store).run(tiny_model)

    outcome: dict[str, object] = {}

    def promote() -> None:
        try:
            outcome["report"] = Reindexer(lsettings, Encoder.load(shadow), index=index, store=store).run(
                shadow, live_recall_gate=40, live_recall_wait_s=180)
        except Exception as exc:  # the refusal is an outcome too
            outcome["error"] = exc

    build = threading.Thread(target=promote)
    build.start()
    # The gate forgets the pairs scored while the shadow was building (a partial index), so the stream
    # starts once the shadow is ready: sent from the start, it could run dry before the gate began.
    watch = MilvusStore(lsettings)  # its own client: the build's is busy in the other thread
    poll("the shadow built", lambda: not build.is_alive()
         or (watch.version_info("tiny_shadow") or {}).get("state") == "ready", timeout=300)
    with EventProducer(lsettings) as producer:
        for start in range(0, len(stream), 20):  # a steady stream until the decision
            if not build.is_alive():
                break
            producer.send_many(stream[start:start + 20])
            producer.flush()
            time.sleep(0.5)
    build.join(timeout=300)
    promoted = "report" in outcome
    text = outcome["report"].live_recall if promoted else str(outcome["error"])
    shadow_r, active_r, n = re.search(r"live recall@10 ([\d.]+) \(tiny_shadow\) vs ([\d.]+) \(tiny_streams\) "
                                      r"on (\d+) engagements", text).groups()
    assert int(n) >= 40 and promoted == (float(shadow_r) >= float(active_r))
    assert index.active_version() == ("tiny_shadow" if promoted else "tiny_streams")
    assert {f.version for f in figures(store)} == {"tiny_streams", "tiny_shadow"}
