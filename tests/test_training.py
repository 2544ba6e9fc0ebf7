"""Training on the real stack: events go to Kafka under a unique prefix and are read back by the builder."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifact import ModelArtifact
from models.encoder import Encoder, TorchEncoder
from models.testing import tiny_llama
from core.settings import Settings
from streams.events import EngagementEvent, Event, ImpressionEvent, ItemEvent, UserEvent
from streams.producer import EventProducer
from streams.topics import ensure_topics
from onetower.prefixes import isolated as unique_settings
from training.config import TrainConfig, read_run
from training.dataset import DatasetOptions, PointInTimeDataset, load_or_build
from training.evaluate import run_evaluation
from training.train import export, train

pytestmark = pytest.mark.stack

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
N_ITEMS, N_USERS, PER_USER = 30, 6, 12


def title(n: int) -> str:
    return f"Title{n:02d}X"  # no title is a substring of another


def world() -> list[Event]:
    """Users rating items over a few hours; some engagements of one user share a timestamp."""
    events: list[Event] = [ItemEvent(item_id=f"i{n}", ts=T0, features={"title": title(n), "genres": ["Drama", "Comedy"][n % 2]})
                           for n in range(N_ITEMS)]
    events += [UserEvent(user_id=f"u{u}", ts=T0, features={"age": 20 + u, "occupation": "tester"}) for u in range(N_USERS)]
    for u in range(N_USERS):
        for k in range(PER_USER):
            item = f"i{(u * 5 + k * 7) % N_ITEMS}"
            ts = T0 + timedelta(minutes=5 + k * 10 + u) if not (u == 0 and k == 4) else T0 + timedelta(minutes=5 + 2 * 10)
            events.append(ImpressionEvent(user_id=f"u{u}", item_id=item, ts=ts))
            if (k + u) % 3 != 0:
                events.append(EngagementEvent(user_id=f"u{u}", item_id=item, ts=ts, kind_="rating"))
    return events


@pytest.fixture(scope="module")
def stack_world(local_stack: Settings, tmp_path_factory) -> tuple[Settings, list[Event]]:
    settings = unique_settings(local_stack, cache_dir=tmp_path_factory.mktemp("cache"))
    ensure_topics(settings)
    events = world()
    with EventProducer(settings) as producer:
        producer.send_many(events)
    return settings, events


OPTIONS = DatasetOptions(counts_mode="raw", hard_negatives=2, max_seq_length=256, val_fraction=0.2, test_fraction=0.2)


@pytest.fixture(scope="module")
def data(stack_world, tmp_path_factory) -> PointInTimeDataset:
    settings, _ = stack_world
    return load_or_build(settings, OPTIONS)


def rows(data: PointInTimeDataset) -> list[dict]:
    return [r for split in ("train", "val", "test") for r in data.splits[split].to_pylist()]


def test_point_in_time_history_and_counters(stack_world, data):
    _, events = stack_world
    engagements = [e for e in events if isinstance(e, EngagementEvent)]
    impressions = [e for e in events if isinstance(e, ImpressionEvent)]
    examples = rows(data)
    assert len(examples) == len(engagements)
    titles = {f"i{n}": title(n) for n in range(N_ITEMS)}
    for r in examples:
        t = r["ts_ms"]
        before = {e.item_id for e in engagements if e.user_id == r["user_id"] and e.ts_ms < t}
        assert sorted(r["history"]) == sorted(before)  # the engaged set serving excludes, each item once
        assert all(titles[item] in r["query"] for item in before)  # fewer than history_len: all rendered
        later = {e.item_id for e in engagements if e.user_id == r["user_id"] and e.ts_ms >= t}
        for item in later - set(r["history"]):  # the positive and anything after t never reach the user text
            assert titles[item] not in r["query"]
        # counters as of the item's newest counter event before t: every earlier impression (all inside 7 days)
        shown = sum(1 for e in impressions if e.item_id == r["item_id"] and e.ts_ms < t)
        assert re.search(r"\[IMPRESSIONS_7D\] (\d+)", r["positive"]).group(1) == str(shown)
    same_ts = [r for r in examples if r["user_id"] == "u0" and r["ts_ms"] == int((T0 + timedelta(minutes=25)).timestamp() * 1000)]
    assert len(same_ts) == 2 and all(r["item_id"] not in r["history"] for r in same_ts)
    assert {r["item_id"] for r in same_ts}.isdisjoint(same_ts[0]["history"] + same_ts[1]["history"])


def test_hard_negatives_are_shown_and_not_engaged_before_t(stack_world, data):
    _, events = stack_world
    for r in rows(data):
        t = r["ts_ms"]
        shown = [e for e in events if isinstance(e, ImpressionEvent) and e.user_id == r["user_id"] and e.ts_ms < t]
        engaged = {e.item_id for e in events if isinstance(e, EngagementEvent) and e.user_id == r["user_id"] and e.ts_ms < t}
        skipped = {e.item_id for e in shown} - engaged - {r["item_id"]}
        assert r["n_hard"] == min(2, len(skipped))
        hard = r["negative_ids"][: r["n_hard"]]
        assert set(hard) <= skipped and len(set(r["negative_ids"])) == 2
        assert not set(r["negative_ids"]) & (engaged | {r["item_id"]})
        if hard:  # the first one is the most recently shown
            last = {e.item_id: e.ts_ms for e in shown if e.item_id in skipped}
            assert last[hard[0]] == max(last.values())
        assert r["negative_1"].startswith("[ITEM]") and titles_in(r["negative_1"]) == [r["negative_ids"][0]]


def titles_in(text: str) -> list[str]:
    return [f"i{int(n)}" for n in re.findall(r"Title(\d\d)X", text)]


def test_time_split_and_cache(stack_world, data, tmp_path):
    settings, _ = stack_world
    train_ts = data.splits["train"].column("ts_ms").to_pylist()
    val_ts = data.splits["val"].column("ts_ms").to_pylist()
    test_ts = data.splits["test"].column("ts_ms").to_pylist()
    assert train_ts and val_ts and test_ts
    assert max(train_ts) < min(val_ts) and max(val_ts) < min(test_ts)
    assert sorted(data.catalogues["test"].column("item_id").to_pylist()) == sorted(f"i{n}" for n in range(N_ITEMS))
    again = load_or_build(settings, OPTIONS, cache_dir=Path(data.directory).parent)
    assert again.directory == data.directory
    other = load_or_build(settings, OPTIONS.model_copy(update={"counts_mode": "bucket"}), cache_dir=Path(data.directory).parent)
    assert other.meta["fingerprint"] != data.meta["fingerprint"]
    assert re.search(r"\[IMPRESSIONS_7D\]\[PCT\] \d+\[/PCT\]", other.splits["train"].column("positive")[0].as_py())


@pytest.fixture(scope="module")
def trained(stack_world, tmp_path_factory) -> Path:
    settings, _ = stack_world
    tiny = tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    out = tmp_path_factory.mktemp("run")
    # batch 4: NO_DUPLICATES batches need distinct texts in every column, and with counters as of each item's
    # last counter event (serving's rule) an item's text repeats across examples; 30 items fill few batches of 8
    config = TrainConfig(base_model=str(tiny), max_seq_length=64, dim=128, matryoshka_widths=[64], counts_mode="raw",
                         val_fraction=0.2, test_fraction=0.2, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0,
                         epochs=8, logging_steps=1, eval_steps=1000, save_steps=1000, output_dir=out, export=False)
    torch.manual_seed(0)
    train(config, settings)
    return out


@pytest.mark.slow
def test_tiny_model_trains_and_its_loss_falls(trained):
    import json

    history = json.loads((trained / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 8
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert (trained / "model" / "modules.json").is_file() and (trained / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_export_gives_an_artifact_whose_onnx_matches_torch(trained, tmp_path):
    from training.evaluate import load_trained

    config, facts = read_run(trained)
    model = load_trained(trained)
    artifact = export(model, config, tmp_path / "artifact", training_data_range=facts["train_range"], version="tiny_test_v1")
    loaded = ModelArtifact.load(tmp_path / "artifact")
    assert loaded.version == "tiny_test_v1" and loaded.manifest.training_data_range is not None
    texts = ["[ITEM][TITLE] Title01X[GENRES] Drama", "[USER][AGE] 21[HISTORY][ITEM][TITLE] Title02X"]
    onnx = Encoder.load(artifact.path, provider="cpu").encode(texts)
    torch_out = TorchEncoder(model).encode(texts)
    assert onnx.shape == (2, 128)
    assert np.min(np.sum(onnx * torch_out, axis=1)) > 0.999


@pytest.mark.slow
def test_evaluation_table_has_baselines_slices_and_widths(stack_world, data, trained, tmp_path):
    settings, _ = stack_world
    config, _ = read_run(trained)
    table, result = run_evaluation(settings, config, {"fine-tuned": trained}, tmp_path, max_queries=None)
    methods = {r.method: r for r in result}
    assert {"popularity", "ALS (implicit)", "fine-tuned"} <= set(methods)
    assert sorted(r.width for r in result if r.method == "fine-tuned") == [64, 128]
    for name in ("overall", "cold items", "cold users"):
        assert f"### {name}" in table
    assert methods["popularity"].results["overall"]["recall@10"] == pytest.approx(popularity_recall_by_hand(stack_world[1], data, 10))
    assert (tmp_path / "recall_by_width.png").stat().st_size > 0
    low, high = methods["fine-tuned"].intervals["overall"]["recall@100"]
    assert low <= methods["fine-tuned"].results["overall"]["recall@100"] <= high
    paired = json.loads((tmp_path / "evaluation.json").read_text())["paired"]  # the tuned tower at its full width, same queries
    assert {(c["method"], c["reference"]) for c in paired} == {("fine-tuned", "ALS (implicit)"), ("fine-tuned", f"untuned {config.base_model} tower")}
    assert "paired bootstrap" in table and len(paired) == 2 * 3 * 3  # references x slices x k


def popularity_recall_by_hand(events: list[Event], data: PointInTimeDataset, k: int) -> float:
    """Popularity's recall@k recomputed from the raw events: counts before the test window, the user's
    earlier engagements excluded, ties to the catalogue's first item."""
    t_test = data.meta["t_test_ms"]
    engagements = [e for e in events if isinstance(e, EngagementEvent)]
    counts = {}
    for e in engagements:
        if e.ts_ms < t_test:
            counts[e.item_id] = counts.get(e.item_id, 0) + 1
    catalogue = data.catalogues["test"].column("item_id").to_pylist()
    hits = []
    for q in data.splits["test"].to_pylist():
        seen = {e.item_id for e in engagements if e.user_id == q["user_id"] and e.ts_ms < q["ts_ms"]}
        ranked = sorted((x for x in catalogue if x not in seen), key=lambda x: (-counts.get(x, 0), catalogue.index(x)))
        hits.append(q["item_id"] in ranked[:k])
    return sum(hits) / len(hits)


def test_read_events_judges_records_as_the_worker_does(local_stack: Settings) -> None:
    """Ids missing from a record come from its coordinates (a DLQ replay's from its header), repeated
    ids are read once, invalid records are counted per topic: what the worker's idempotency and DLQ do."""
    from kafka import KafkaProducer

    from onetower.prefixes import purge
    from streams.events import ORIGIN_HEADER, Origin, parse_event
    from training.dataset import ReadStats, read_events

    settings = unique_settings(local_stack)
    ensure_topics(settings)
    eng = settings.topic("engagements")
    with_id = EngagementEvent(user_id="u0", item_id="i0", ts=T0 + timedelta(days=1), event_id="same").to_bytes()
    without_id = b'{"user_id": "u0", "item_id": "i1", "ts": "2024-01-02T00:00:00Z"}'
    raw = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        for value in (with_id, with_id, without_id, without_id, b"{not json", None):
            raw.send(eng, key=b"u0", value=value, partition=0)
        raw.send(eng, key=b"u0", value=without_id, partition=0, headers=[(ORIGIN_HEADER, f"{eng}:0:2".encode())])  # a DLQ replay of offset 2
        raw.send(settings.topic("items"), key=b"i0", value=b"[]", partition=0)
        raw.flush()
        stats = ReadStats()
        events = list(read_events(settings, DatasetOptions(), stats=stats))
        assert [e.event_id for e in events] == ["same", Origin(eng, 0, 2).event_id, Origin(eng, 0, 3).event_id]
        assert events[1] == parse_event("engagements", without_id, Origin(eng, 0, 2))
        assert stats.invalid == {eng: 2, settings.topic("items"): 1}
        assert stats.duplicates == {eng: 2}  # the second copy with an id, and the replay of offset 2
    finally:
        raw.close()
        purge(settings)
