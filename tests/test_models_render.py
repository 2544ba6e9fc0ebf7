"""Prompt rendering: goldens for an item and a user (with history overflow), counters, percentile tables."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from models.errors import RenderError
from models.render import MARKER_TOKENS, render_item, render_user
from streams.counters import CounterError, PercentileTable
from models.samples import movie_features
from models.tower import minilm_dir

TOY_STORY = {"title": "Toy Story (1995)", "genres": "Animation|Children's|Comedy", "year": 1995}
PROFILE = {"age": 24, "gender": "M", "occupation": "technician"}


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.add_special_tokens({"additional_special_tokens": MARKER_TOKENS})
    return tok


def test_item_golden_with_bucketed_counters():
    text = render_item(TOY_STORY, {"engagements_7d": 3, "impressions_24h": 87})
    assert text == (
        "[ITEM][TITLE] Toy Story (1995)[GENRES] Animation|Children's|Comedy[YEAR] 1995"
        "[IMPRESSIONS_24H][PCT] 87[/PCT][ENGAGEMENTS_7D][PCT] 3[/PCT]"
    )


def test_item_raw_counts_mode_for_the_ablation():
    assert render_item({"title": "Fargo (1996)"}, {"impressions_24h": 12345}, counts_mode="raw") == (
        "[ITEM][TITLE] Fargo (1996)[IMPRESSIONS_24H] 12345"
    )


def test_item_order_is_stable_and_unknown_fields_are_generic():
    features = {"director": "Joel Coen", "year": 1996, "budget": 7.0, "title": "Fargo (1996)", "adult": False}
    text = render_item(features)
    assert text == "[ITEM][TITLE] Fargo (1996)[YEAR] 1996[FIELD] adult: no[FIELD] budget: 7[FIELD] director: Joel Coen"
    assert render_item(dict(reversed(list(features.items())))) == text


def test_marker_strings_in_values_cannot_forge_fields():
    text = render_item({"title": "Evil [GENRES] [pct] 100 [/PCT]  title\n"})
    assert text == "[ITEM][TITLE] Evil 100 title"


@pytest.mark.parametrize(
    ("counters", "mode", "message"),
    [({"impressions_24h": 0}, "bucket", "1-100"), ({"impressions_24h": 101}, "bucket", "1-100"),
     ({"impressions_24h": -1}, "raw", "negative"), ({"impressions_24h": "5"}, "bucket", "integer")],
)  # fmt: skip
def test_bad_counters_get_one_clear_error(counters, mode, message):
    with pytest.raises(RenderError, match=message):
        render_item(TOY_STORY, counters, counts_mode=mode)


def test_bad_feature_value_is_a_render_error():
    with pytest.raises(RenderError, match="'year'.*finite"):
        render_item({"year": float("nan")})
    with pytest.raises(RenderError, match="list"):
        render_item({"tags": ["a", "b"]})


def test_user_golden_keeps_history_in_time_order():
    history = [movie_features(i) for i in range(2)]
    assert render_user(PROFILE, history) == (
        "[USER][AGE] 24[GENDER] M[OCCUPATION] technician[HISTORY]"
        "[ITEM][TITLE] Toy Story (1995)[GENRES] Animation|Children's|Comedy[YEAR] 1995"
        "[ITEM][TITLE] GoldenEye (1995)[GENRES] Action|Adventure|Thriller[YEAR] 1995"
    )


def test_user_history_overflow_keeps_the_most_recent(tokenizer):
    history = [movie_features(i) for i in range(5)]  # Toy Story ... Copycat, oldest first
    text = render_user(PROFILE, history, tokenizer=tokenizer, max_tokens=60)
    assert text == (
        "[USER][AGE] 24[GENDER] M[OCCUPATION] technician[HISTORY]"
        "[ITEM][TITLE] Four Rooms (1995)[GENRES] Thriller[YEAR] 1995"
        "[ITEM][TITLE] Get Shorty (1995)[GENRES] Action|Comedy|Drama[YEAR] 1995"
        "[ITEM][TITLE] Copycat (1995)[GENRES] Crime|Drama|Thriller[YEAR] 1995"
    )
    assert len(tokenizer(text).input_ids) <= 60
    one_more = render_user(PROFILE, history[1:], tokenizer=tokenizer)
    assert len(tokenizer(one_more).input_ids) > 60  # the budget was filled, not just respected
    assert render_user(PROFILE, history, tokenizer=tokenizer, max_tokens=12) == (
        "[USER][AGE] 24[GENDER] M[OCCUPATION] technician[HISTORY]"
    )


def test_user_budget_without_tokenizer_is_an_error():
    with pytest.raises(RenderError, match="tokenizer"):
        render_user(PROFILE, [TOY_STORY], max_tokens=100)


def test_markers_are_single_tokens(tokenizer):
    ids = tokenizer(render_item(TOY_STORY, {"impressions_24h": 5}), add_special_tokens=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert [t for t in tokens if t.startswith("[")] == ["[ITEM]", "[TITLE]", "[GENRES]", "[YEAR]", "[IMPRESSIONS_24H]", "[PCT]", "[/PCT]"]


def test_percentile_table_buckets():
    table = PercentileTable.fit(range(1, 101))
    assert [table.bucket(c) for c in (0, 1, 50, 100, 10**6)] == [1, 1, 50, 100, 100]
    skewed = PercentileTable.fit([0] * 90 + list(range(1, 11)))
    assert [skewed.bucket(c) for c in (0, 1, 5, 11)] == [1, 91, 95, 100]
    assert PercentileTable.fit([]).bucket(1000) == 1


def test_percentile_table_json_round_trip_and_errors():
    table = PercentileTable.fit([3, 1, 4, 1, 5, 9, 2, 6])
    assert PercentileTable.from_json(table.to_json()) == table
    with pytest.raises(CounterError, match="99 percentiles"):
        PercentileTable.from_json('{"edges": [1, 2], "n": 2}')
    with pytest.raises(CounterError, match="non-decreasing"):
        PercentileTable.from_json('{"edges": ' + str(list(range(99, 0, -1))) + ', "n": 5}')
    with pytest.raises(CounterError, match="negative"):
        PercentileTable.fit([1, -2])
    with pytest.raises(CounterError, match="negative"):
        table.bucket(-1)
