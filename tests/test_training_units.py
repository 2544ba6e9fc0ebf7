"""Training pieces that need no servers: ranking metrics on a hand-built case, the loss, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.config import ConfigError, load_config
from training.evaluate import difference_interval, metrics, ranks, recall_interval


def test_ranks_and_metrics_on_a_hand_built_case():
    scores = np.array([
        [0.9, 0.8, 0.1, 0.5],  # target 1: item 0 is excluded -> rank 1
        [0.9, 0.8, 0.1, 0.5],  # target 2: three items above -> rank 4
        [0.5, 0.5, 0.5, 0.5],  # target 2: ties go to the lower index -> rank 3
    ])
    rank = ranks(scores, np.array([1, 2, 2]), [np.array([0]), np.array([], dtype=np.int64), np.array([], dtype=np.int64)])
    assert rank.tolist() == [1, 4, 3]
    m = metrics(rank, ks=(1, 3))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(5) + 1 / np.log2(4)) / 3)


def test_bootstrap_intervals_hold_the_recall_and_say_which_differences_are_noise():
    rng = np.random.default_rng(0)
    rank = rng.integers(1, 40, 400)  # recall@10 about 0.23
    low, high = recall_interval(rank, 10)
    assert low < metrics(rank)["recall@10"] < high and high - low < 0.1
    assert recall_interval(np.full(50, 500), 10) == (0.0, 0.0)  # never a hit: nothing to be unsure of
    better = np.where(rng.random(400) < 0.5, 1, rank)  # half the queries moved to rank 1
    low, high = difference_interval(better, rank, 10)
    assert low > 0  # a real improvement: the paired interval excludes zero
    noise = rank.copy()
    noise[:2] = 1  # two queries of 400 moved: the interval holds zero
    low, high = difference_interval(noise, rank, 10)
    assert low <= 0 <= high
    assert np.isnan(recall_interval(rank[:1], 10)).all()  # one query: no interval


def test_a_diverged_model_scores_no_hit():
    scores = np.full((2, 20), np.nan)  # NaN embeddings: every comparison is False, which once ranked targets first
    rank = ranks(scores, np.array([0, 3]), [np.array([], dtype=np.int64)] * 2)
    assert rank.tolist() == [20, 20] and metrics(rank)["recall@10"] == 0.0


def test_a_run_whose_gradients_went_nan_is_refused():
    from training.train import TrainingDiverged, check_converged

    check_converged([{"step": 1, "loss": 2.3, "grad_norm": 8.6}])
    with pytest.raises(TrainingDiverged, match="step 20"):  # what SmolLM2 at lr 5e-4 did on the H200
        check_converged([{"step": 1, "loss": 22.7, "grad_norm": 8.6}, {"step": 20, "loss": 15.5, "grad_norm": float("nan")}])


def test_bad_config_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="pooling"):
        load_config(None, {"pooling": "max"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("matryoshka_widths: [64, 1024]\n")
    with pytest.raises(ConfigError, match="matryoshka_widths"):
        load_config(bad)
    from typer.testing import CliRunner

    from onetower.cli import app

    result = CliRunner().invoke(app, ["train", "--hard-negatives", "9"])
    assert result.exit_code == 1 and "hard_negatives" in result.output


# ---------------------------------------------------------------- nothing from the future reaches an example

import hashlib  # noqa: E402
import json  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402

from streams.events import EngagementEvent, ImpressionEvent, ItemEvent  # noqa: E402
from models.render import PROMPT_FORMAT_VERSION  # noqa: E402
from training.dataset import DATASET_FORMAT_VERSION, DatasetOptions, build_examples, fingerprint  # noqa: E402
from training.evaluate import EvalSet, popularity_scores, recent_popularity_scores  # noqa: E402

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def items(*ids: str) -> list:
    return [ItemEvent(item_id=i, ts=T0, features={"title": f"Movie {i}"}) for i in ids]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from models.tower import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())


def only_example(events: list, tokenizer, user: str, item: str) -> dict:
    data = build_examples(events, DatasetOptions(hard_negatives=1, counts_mode="raw", val_fraction=0.0, test_fraction=0.2), tokenizer)
    rows = [r for s in data.splits.values() for r in s.to_pylist() if r["user_id"] == user and r["item_id"] == item]
    assert len(rows) == 1
    return rows[0]


def test_a_hard_negative_shown_only_after_t_is_not_used(tokenizer):
    events = items("a", "b", "c", "d") + [
        ImpressionEvent(user_id="u", item_id="d", ts=at(1)),  # shown before t, skipped: a fair hard negative
        ImpressionEvent(user_id="u", item_id="a", ts=at(10)),
        EngagementEvent(user_id="u", item_id="a", ts=at(10), kind_="like"),
        ImpressionEvent(user_id="u", item_id="c", ts=at(11)),  # shown after t, nearer to t than d
        EngagementEvent(user_id="x", item_id="b", ts=at(20), kind_="like"),
    ]
    row = only_example(events, tokenizer, "u", "a")
    assert row["negative_ids"] == ["d"] and row["n_hard"] == 1


def test_a_random_negative_may_be_an_item_engaged_only_after_t(tokenizer):
    events = items("a", "b") + [
        EngagementEvent(user_id="u", item_id="a", ts=at(10), kind_="like"),
        ItemEvent(item_id="d", ts=at(20), features={"title": "Movie d"}),  # not in the catalogue at t
        EngagementEvent(user_id="u", item_id="b", ts=at(30), kind_="like"),  # the future: unknown at t
    ]
    row = only_example(events, tokenizer, "u", "a")
    assert row["n_hard"] == 0 and row["negative_ids"] == ["b"]


def test_baselines_see_every_window_before_the_scored_one_and_exclude_what_serving_excludes(tokenizer):
    events = items("a", "b", "c") + [EngagementEvent(user_id=f"u{n}", item_id="a", ts=at(1 + n), kind_="like") for n in range(6)]
    events += [EngagementEvent(user_id="u0", item_id="b", ts=at(10 + n), kind_="like") for n in range(1)]
    events += [EngagementEvent(user_id=f"v{n}", item_id="c", ts=at(20 + n), kind_="like") for n in range(3)]  # val window
    events += [ImpressionEvent(user_id="u0", item_id="c", ts=at(25)),  # shown, not engaged by u0: stays rankable
               EngagementEvent(user_id="u0", item_id="c", ts=at(40), kind_="like")]  # the one test query
    data = build_examples(events, DatasetOptions(hard_negatives=0, counts_mode="raw", val_fraction=0.25, test_fraction=0.05), tokenizer)
    assert data.splits["test"].num_rows == 1 and data.splits["val"].num_rows == 3
    ev = EvalSet.from_dataset(data, "test")
    pop = popularity_scores(data, ev)
    assert dict(zip(ev.catalogue_ids, pop[0])) == {"a": 6.0, "b": 1.0, "c": 3.0}  # val's three engagements of c count
    assert [ev.catalogue_ids[i] for i in ev.history[0]] == ["a", "b"]  # excluded for every method, as serving does
    assert ev.score_metrics(pop)["overall"]["recall@10"] == 1.0  # a and b excluded: c ranks first
    assert not ev.slices["cold items"][0]  # c was engaged before the test window


def test_an_evaluation_of_one_slice_scores_every_query_of_it_and_only_those(tokenizer):
    events = items("a", "b", "c") + [EngagementEvent(user_id=f"u{n}", item_id="a", ts=at(1 + n), kind_="like") for n in range(12)]
    events += [EngagementEvent(user_id=f"u{n}", item_id="b" if n % 2 else "c", ts=at(20 + n), kind_="like") for n in range(8)]
    data = build_examples(events, DatasetOptions(hard_negatives=0, counts_mode="raw", val_fraction=0.0, test_fraction=0.5), tokenizer)
    whole = EvalSet.from_dataset(data, "test")
    cold = EvalSet.from_dataset(data, "test", only="cold items")
    assert len(whole.queries) == 11 and whole.slices["cold items"].sum() == 8  # three of a's are in the window too
    assert len(cold.queries) == 8 and cold.slices["cold items"].all()
    assert cold.key == [k for k, c in zip(whole.key, whole.slices["cold items"]) if c]
    assert len(EvalSet.from_dataset(data, "test", only="cold items", max_queries=3).queries) == 3
    with pytest.raises(ValueError, match="unknown slice"):
        EvalSet.from_dataset(data, "test", only="warm")


def test_the_user_text_is_servings_one_entry_per_item_capped_at_history_len(tokenizer):
    events = items("a", "b", "c", "d") + [
        EngagementEvent(user_id="u", item_id="a", ts=at(1), kind_="like"),
        EngagementEvent(user_id="u", item_id="b", ts=at(2), kind_="like"),
        EngagementEvent(user_id="u", item_id="a", ts=at(3), kind_="like"),  # again: a moves to the end, once
        EngagementEvent(user_id="u", item_id="c", ts=at(4), kind_="like"),
        EngagementEvent(user_id="u", item_id="d", ts=at(10), kind_="like"),
    ]
    options = DatasetOptions(hard_negatives=0, counts_mode="raw", history_len=2, val_fraction=0.0, test_fraction=0.2)
    row = build_examples(events, options, tokenizer).splits["test"].to_pylist()[-1]
    assert row["item_id"] == "d" and row["query"] == "[USER][HISTORY][ITEM][TITLE] Movie a[ITEM][TITLE] Movie c"
    assert row["history"] == ["a", "b", "c"]  # what retrieval excludes: every engaged item, uncapped


def test_recent_popularity_counts_only_the_week_before_the_scored_window(tokenizer):
    day = 24 * 60
    events = items("a", "b", "c") + [EngagementEvent(user_id=f"u{n}", item_id="a", ts=at(1 + n), kind_="like") for n in range(6)]
    events += [EngagementEvent(user_id=f"w{n}", item_id="b", ts=at(9 * day + n), kind_="like") for n in range(2)]
    events += [EngagementEvent(user_id="v0", item_id="c", ts=at(10 * day), kind_="like"),  # in the test window: unknown
               EngagementEvent(user_id="u0", item_id="c", ts=at(12 * day), kind_="like")]
    data = build_examples(events, DatasetOptions(hard_negatives=0, counts_mode="raw", val_fraction=0.1, test_fraction=0.1), tokenizer)
    ev = EvalSet.from_dataset(data, "test")
    assert data.meta["t_test_ms"] == int(at(10 * day).timestamp() * 1000)
    # a's six engagements are ten days old at the window start; b's two are one day old
    assert dict(zip(ev.catalogue_ids, recent_popularity_scores(data, ev)[0])) == {"a": 0.0, "b": 2.0, "c": 0.0}
    assert dict(zip(ev.catalogue_ids, popularity_scores(data, ev)[0])) == {"a": 6.0, "b": 2.0, "c": 0.0}



def test_the_dataset_fingerprint_follows_the_history_block_and_keeps_older_caches():
    plain, blocked = DatasetOptions(), DatasetOptions(history_block=8)
    assert fingerprint({}, blocked) != fingerprint({}, plain)
    assert fingerprint({}, DatasetOptions(counter_dropout=0.2)) != fingerprint({}, plain)
    # history_block 1 and no counter dropout are what datasets built before the fields existed hold: their digest is unchanged
    legacy = {"offsets": [], "options": plain.model_dump(mode="json", exclude={"history_block", "counter_dropout"}),
              "prompt_format": PROMPT_FORMAT_VERSION, "dataset_format": DATASET_FORMAT_VERSION}
    assert fingerprint({}, plain) == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]


def test_counter_dropout_writes_training_items_with_a_cold_items_counters_and_leaves_evaluation_alone(tokenizer):
    events = items("a", "b", "c") + [EngagementEvent(user_id=f"u{n}", item_id="abc"[n % 3], ts=at(1 + n), kind_="like")
                                     for n in range(30)]
    options = DatasetOptions(hard_negatives=1, counts_mode="raw", val_fraction=0.0, test_fraction=0.2)
    plain = build_examples(events, options, tokenizer)
    cold = build_examples(events, options.model_copy(update={"counter_dropout": 0.999}), tokenizer)
    train = cold.splits["train"].to_pylist()
    assert all("[ENGAGEMENTS_7D] 0" in r["positive"] and "[ENGAGEMENTS_7D] 0" in r["negative_1"] for r in train)
    assert any("[ENGAGEMENTS_7D] 0" not in r["positive"] for r in plain.splits["train"].to_pylist()[3:])  # counts were there
    assert cold.splits["test"].equals(plain.splits["test"]) and cold.catalogues["test"].equals(plain.catalogues["test"])
    assert [r["query"] for r in train] == [r["query"] for r in plain.splits["train"].to_pylist()]  # users unchanged


def test_training_can_continue_from_a_shipped_tower(tmp_path):
    from core.errors import OnetowerError
    from core.settings import Settings
    from models.tuned import load_tuned, shipped
    from training.config import TrainConfig
    from training.train import initial_model

    config = TrainConfig(lora=True, init_from=shipped(), output_dir=tmp_path)
    model = initial_model(config, Settings())
    assert any("lora_" in name for name, p in model.named_parameters() if p.requires_grad)  # the adapter trains on
    texts = ["[USER][AGE] 30[HISTORY][ITEM][TITLE] Heat (1995)", "[ITEM][TITLE] Toy Story (1995)"]
    start, shipped_tower = model.encode(texts, normalize_embeddings=True), load_tuned(shipped())
    assert np.sum(start * shipped_tower.encode(texts, normalize_embeddings=True), axis=1).min() > 0.9999  # from where it stopped
    with pytest.raises(OnetowerError, match="dim"):
        initial_model(TrainConfig(lora=True, init_from=shipped(), dim=256, matryoshka_widths=[64], output_dir=tmp_path), Settings())
    with pytest.raises(ConfigError, match="lora"):
        load_config(None, {"init_from": str(shipped()), "lora": False})


def test_logq_loss_is_cross_entropy_over_corrected_in_batch_logits():
    from training.losses import LogQRankingLoss

    loss_fn = LogQRankingLoss(None, scale=2.0)  # the model only embeds; here the embeddings are given
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    neg = torch.tensor([[1.0, -1.0], [-1.0, 0.0]])
    logq = torch.tensor([-1.0, -3.0])
    loss = loss_fn.compute_loss_from_embeddings([q, pos, neg], logq)
    # by hand: cosines x scale, minus log q on the two positive columns only (hard negatives keep raw logits)
    r = 2 ** -0.5
    logits = np.array([[2 * r + 1, 0 + 3, 2 * r, -2.0],
                       [2 * r + 1, 2 + 3, -2 * r, 0.0]])
    expected = np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    plain = loss_fn.compute_loss_from_embeddings([q, pos, neg], torch.zeros(2))
    assert plain.item() != pytest.approx(expected, rel=1e-3)  # the correction changes the loss


def test_gradient_cache_gives_the_plain_loss_and_gradients(tmp_path):
    from models.testing import tiny_llama
    from models.tower import build_tower
    from training.losses import CachedLogQRankingLoss, LogQRankingLoss, SentenceOnlyMatryoshkaLoss

    tower = build_tower(str(tiny_llama(tmp_path / "llama")), dim=32, max_seq_length=32)
    texts = [[f"user {n} watched film {n * 7}" for n in range(6)],
             [f"film {n * 7} drama" for n in range(6)],
             [f"film {n * 3 + 1} comedy" for n in range(6)]]
    logq = torch.log(torch.tensor([0.3, 0.1, 0.05, 0.2, 0.15, 0.2]))

    def loss_and_grads(inner) -> tuple[float, list[torch.Tensor]]:
        tower.zero_grad()
        loss = SentenceOnlyMatryoshkaLoss(tower, inner, matryoshka_dims=[32, 8])
        value = loss([tower.preprocess(column) for column in texts], logq)
        value.backward()
        return value.item(), [p.grad.clone() for p in tower.parameters() if p.grad is not None]

    plain, plain_grads = loss_and_grads(LogQRankingLoss(tower, scale=20.0))
    cached, cached_grads = loss_and_grads(CachedLogQRankingLoss(LogQRankingLoss(tower, scale=20.0), mini_batch_size=2))
    assert cached == pytest.approx(plain, rel=1e-5)
    assert len(cached_grads) == len(plain_grads) > 0
    for a, b in zip(cached_grads, plain_grads):  # mini-batches pad differently: equal up to float rounding
        assert (a - b).norm() <= 1e-4 * b.norm()
