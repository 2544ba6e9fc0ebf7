"""Incremental re-encoding (models/incremental.py) and the append-only rendering it relies on, on a tiny
LLaMA with SmolLM2's real tokenizer; every encoding test runs on both decoders (torch, and the ONNX graph
with past keys/values on onnxruntime)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from sentence_transformers import SentenceTransformer

from models.encoder import TorchEncoder
from models.errors import ModelError
from models.incremental import IncrementalEncoder, OnnxDecoder
from models.onnx_graph import export_decoder
from models.tower import is_causal
from models.render import render_item, render_user
from models.samples import movie_features, sample_users
from models.testing import tiny_llama
from models.tower import build_tower

MIN_COSINE = 0.9999
Make = Callable[..., IncrementalEncoder]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module", params=[512, 32], ids=["dense", "truncate"])
def tower(llama: Path, request: pytest.FixtureRequest) -> SentenceTransformer:
    """Hidden size 64: a 512-d tower projects (Dense), a 32-d one truncates."""
    return build_tower(str(llama), dim=request.param, max_seq_length=256)


@pytest.fixture(scope="module")
def decoder_graph(tower: SentenceTransformer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_decoder(tower[0].auto_model, tmp_path_factory.mktemp("decoder"))


@pytest.fixture(params=["torch", "onnx"])
def make(tower: SentenceTransformer, decoder_graph: Path, request: pytest.FixtureRequest) -> Make:
    """A new incremental encoder over ``tower`` on the decoder under test."""
    def new(**kwargs) -> IncrementalEncoder:
        decoder = OnnxDecoder(decoder_graph) if request.param == "onnx" else None
        return IncrementalEncoder(tower, version="v1", decoder=decoder, **kwargs)
    return new


def tokens(tower: SentenceTransformer, text: str) -> list[int]:
    return tower.tokenizer([text], add_special_tokens=True)["input_ids"][0]


def user(n: int = 14) -> tuple[dict, list[dict]]:
    profile, history = sample_users(1, seed=3, history=(n, n))[0]
    return profile, history


def sample(tower: SentenceTransformer, profile: dict, history: list[dict], max_tokens: int | None = None) -> str:
    return render_user(profile, history, tokenizer=tower.tokenizer, max_tokens=max_tokens)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, axis=1).min())


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_rendering_is_append_only_token_for_token(tower: SentenceTransformer) -> None:
    profile, history = user()
    bos = tower.tokenizer.bos_token_id
    for k in range(len(history)):
        before, after = tokens(tower, sample(tower, profile, history[:k])), tokens(tower, sample(tower, profile, history[: k + 1]))
        assert after[: len(before)] == before
        assert before[0] == bos and bos not in after[1:]  # BOS at the start only, and no EOS appended
        assert after[-1] != tower.tokenizer.eos_token_id


def test_a_trimmed_history_breaks_the_prefix(tower: SentenceTransformer) -> None:
    profile, history = user()
    budget = len(tokens(tower, sample(tower, profile, history[:6])))
    before = tokens(tower, sample(tower, profile, history[:6], budget))
    after = tokens(tower, sample(tower, profile, history[:7], budget))
    assert after[: len(before)] != before  # the oldest entry was dropped to make room


def blocked(tower: SentenceTransformer, profile: dict, history: list[dict], budget: int, block: int, offset: int = 0) -> str:
    return render_user(profile, history, tokenizer=tower.tokenizer, max_tokens=budget, history_block=block, history_offset=offset)


def test_history_blocks_keep_appends_pure_between_block_moves(tower: SentenceTransformer) -> None:
    profile, history = user(40)
    block, budget = 8, len(tokens(tower, sample(tower, profile, history[:16])))
    moves, kept = {}, {}
    for size in (1, block):
        texts = [blocked(tower, profile, history[:k], budget, size) for k in range(len(history) + 1)]
        starts = [k - text.count("[ITEM]") for k, text in enumerate(texts)]  # the first entry kept
        for k, text in enumerate(texts):
            assert len(tokens(tower, text)) <= budget and starts[k] % size == 0
            assert texts[k] == sample(tower, profile, history[starts[k]:k])  # the newest entries, untrimmed
        for k in range(len(history)):
            pure = tokens(tower, texts[k + 1])[: len(tokens(tower, texts[k]))] == tokens(tower, texts[k])
            assert pure == (starts[k + 1] == starts[k])  # only a move of the start breaks the prefix
        moves[size] = len(set(starts)) - 1
        assert 0 < moves[size] <= starts[-1] // size  # every move skips a whole block at least
        kept[size] = [k - start for k, start in enumerate(starts)]
    assert moves[1] >= 4 * moves[block]
    assert all(one - block < blocks <= one for one, blocks in zip(kept[1], kept[block]))  # a block costs < B entries


def test_history_blocks_count_from_the_first_engagement_not_the_capped_history(tower: SentenceTransformer) -> None:
    profile, history = user(40)
    budget = len(tokens(tower, sample(tower, profile, history[:16])))
    # The history cap dropped the 5 oldest entries: numbered from 5, they are trimmed where they were.
    assert blocked(tower, profile, history[5:], budget, 8, offset=5) == blocked(tower, profile, history, budget, 8)
    assert blocked(tower, profile, history[5:], budget, 8) != blocked(tower, profile, history, budget, 8)


def test_appends_equal_the_full_encode_and_compute_only_new_tokens(tower: SentenceTransformer, make: Make) -> None:
    encoder, full = make(), TorchEncoder(tower)
    profiles, histories = zip(*sample_users(3, seed=5, history=(4, 8)))
    ids = [f"u{i}" for i in range(3)]
    hits, computed, whole = (metric(n) for n in ("onetower_incremental_hits_total", "onetower_incremental_tokens_computed_total",
                                                 "onetower_incremental_tokens_full_total"))
    for step in range(4):
        texts = [sample(tower, p, [*h, *(movie_features(j) for j in range(step))]) for p, h in zip(profiles, histories)]
        got = encoder.encode(ids, texts)
        assert min_cosine(got, full.encode(texts)) >= MIN_COSINE
    assert metric("onetower_incremental_hits_total") - hits == 9
    assert metric("onetower_incremental_tokens_computed_total") - computed < (metric("onetower_incremental_tokens_full_total") - whole) / 2


@pytest.mark.parametrize("change", ["profile", "trimmed", "version"])
def test_a_changed_text_or_version_is_a_miss_and_still_equals_the_full_encode(tower: SentenceTransformer, make: Make, change: str) -> None:
    encoder, full = make(), TorchEncoder(tower)
    profile, history = user()
    budget = len(tokens(tower, sample(tower, profile, history[:6])))
    encoder.encode(["u"], [sample(tower, profile, history[:6], budget)])
    reason = "diverged"
    if change == "profile":
        profile = {**profile, "age": 99}
    elif change == "version":
        encoder.version, reason = "v2", "version"
    text = sample(tower, profile, history[:7], budget if change == "trimmed" else None)
    misses = metric("onetower_incremental_misses_total", reason=reason)
    assert min_cosine(encoder.encode(["u"], [text]), full.encode([text])) >= MIN_COSINE
    assert metric("onetower_incremental_misses_total", reason=reason) == misses + 1
    assert encoder.cache["u"].version == encoder.version  # repopulated


def test_an_unchanged_text_costs_no_tokens(tower: SentenceTransformer, make: Make) -> None:
    encoder = make()
    text = sample(tower, *user(4))
    first = encoder.encode(["u"], [text])
    computed = metric("onetower_incremental_tokens_computed_total")
    assert np.array_equal(encoder.encode(["u"], [text]), first)
    assert metric("onetower_incremental_tokens_computed_total") == computed


def test_the_cache_stays_within_its_byte_bound(tower: SentenceTransformer, make: Make) -> None:
    texts = [sample(tower, *user(4 + i)) for i in range(4)]
    one = make()
    one.encode(["u"], texts[-1:])
    largest = one.cache_bytes
    bounded = make(max_bytes=2 * largest)
    bounded.encode([f"u{i}" for i in range(4)], texts)
    assert 0 < bounded.cache_bytes <= 2 * largest
    assert list(bounded.cache) == ["u2", "u3"]  # least recently used evicted first
    tiny = make(max_bytes=largest // 2)
    assert tiny.encode(["u"], texts[-1:]).shape == (1, tower.get_embedding_dimension())
    assert len(tiny.cache) == 0  # larger than the whole cache: encoded, not kept


def test_a_bidirectional_tower_is_refused() -> None:
    minilm = build_tower("minilm")
    assert not is_causal(minilm)  # so for_artifact leaves MiniLM's users on the full path
    with pytest.raises(ModelError, match="causal"):
        IncrementalEncoder(minilm, version="v1")


def test_a_batch_mixing_cached_and_uncached_users_equals_the_full_encode(tower: SentenceTransformer, make: Make) -> None:
    encoder, full = make(), TorchEncoder(tower)
    (p0, h0), (p1, h1) = sample_users(2, seed=9, history=(6, 6))
    encoder.encode(["cached"], [sample(tower, p0, h0[:5])])
    texts = [sample(tower, p0, h0), sample(tower, p1, h1[:1])]
    rows = [encoder._lookup("cached", tokens(tower, texts[0])), encoder._lookup("absent", tokens(tower, texts[1]))]
    assert len(rows[0].ids) and not len(rows[1].ids)
    got = encoder._extend(rows, [tokens(tower, t) for t in texts])  # one batch: a cached past beside an empty one
    assert min_cosine(np.stack([e.vector for e in got]), full.encode(texts)) >= MIN_COSINE


def test_float16_keys_values_halve_their_bytes_and_keep_the_vectors(tower: SentenceTransformer, make: Make) -> None:
    exact, half, full = make(), make(kv_dtype="float16"), TorchEncoder(tower)
    profile, history = user(8)
    for encoder in (exact, half):
        encoder.encode(["u"], [sample(tower, profile, history[:7])])
    text = sample(tower, profile, history)
    assert min_cosine(half.encode(["u"], [text]), full.encode([text])) >= MIN_COSINE
    exact.encode(["u"], [text])
    assert half.cache["u"].kv.dtype == np.float16
    assert half.cache["u"].kv.nbytes == exact.cache["u"].kv.nbytes // 2 and half.cache_bytes < exact.cache_bytes  # the running sums stay float32


def test_a_token_budget_splits_the_batches_and_keeps_the_vectors(tower: SentenceTransformer, make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder, full = make(), TorchEncoder(tower)
    users = sample_users(4, seed=2, history=(6, 6))
    encoder.encode([f"u{i}" for i in range(4)], [sample(tower, p, h[:5]) for p, h in users])
    texts = [sample(tower, p, h) for p, h in users]
    sizes, extend = [], encoder._extend
    monkeypatch.setattr(encoder, "_extend", lambda entries, ids: sizes.append(len(entries)) or extend(entries, ids))
    got = encoder.encode([f"u{i}" for i in range(4)], texts, max_batch_tokens=max(len(tokens(tower, t)) for t in texts))
    assert min_cosine(got, full.encode(texts)) >= MIN_COSINE
    assert sizes == [1, 1, 1, 1]  # each user's past and new tokens fill the budget alone


def test_an_items_changed_counters_reuse_its_features_prefix(tower: SentenceTransformer, make: Make) -> None:
    encoder, full = make(), TorchEncoder(tower)
    features = movie_features(7)
    before = render_item(features, {"impressions_7d": 40, "engagements_1h": 1, "engagements_7d": 55})
    after = render_item(features, {"impressions_7d": 40, "engagements_1h": 98, "engagements_7d": 57})
    encoder.encode(["items:7"], [before])
    shared = len(tokens(tower, render_item(features, {"impressions_7d": 40})))  # up to where the counters differ
    computed, misses = metric("onetower_incremental_tokens_computed_total"), metric("onetower_incremental_misses_total", reason="diverged")
    assert min_cosine(encoder.encode(["items:7"], [after]), full.encode([after])) >= MIN_COSINE
    assert metric("onetower_incremental_misses_total", reason="diverged") == misses + 1
    assert metric("onetower_incremental_tokens_computed_total") - computed <= len(tokens(tower, after)) - shared + 1
    assert np.array_equal(encoder.cache["items:7"].ids, tokens(tower, after))  # the cache holds the new text


def test_a_text_that_is_a_prefix_of_the_cached_one_still_gets_its_own_vector(tower: SentenceTransformer, make: Make) -> None:
    encoder, full = make(), TorchEncoder(tower)
    profile, history = user(6)
    longer, shorter = sample(tower, profile, history), sample(tower, profile, history[:3])
    encoder.encode(["u"], [longer])
    assert min_cosine(encoder.encode(["u"], [shorter]), full.encode([shorter])) >= MIN_COSINE


def test_the_model_bench_measures_every_path_against_the_full_encode(llama: Path, tmp_path: Path) -> None:
    """``onetower model bench --incremental`` on the tiny LLaMA: full (torch, ONNX) and incremental (torch and
    ONNX decoders, fp32 and fp16 keys/values) side by side, users and items, one a call and batched."""
    import io

    from rich.console import Console

    from core.settings import Settings
    from models.bench import run_incremental

    result = run_incremental(tmp_path, Settings(), base=str(llama), users=2, rounds=1, console=Console(file=io.StringIO()))
    assert [(t["entity"], t["batch"]) for t in result["tables"]] == [("user", 1), ("user", 2), ("item", 1), ("item", 8)]
    for table in result["tables"]:
        full, incremental = table["cells"][:2], table["cells"][2:]
        assert [c["path"] for c in full] == ["full (torch)", "full (onnx)"] and len(incremental) == 4
        assert all(c["min_cosine"] >= MIN_COSINE and c["tokens_each"] < full[0]["tokens_each"] for c in incremental)
    assert (tmp_path / "bench_incremental.json").is_file()


def test_no_texts_give_no_vectors(tower: SentenceTransformer, make: Make) -> None:
    assert make().encode([], []).shape == (0, tower.get_embedding_dimension())
