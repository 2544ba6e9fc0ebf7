"""Training pieces that need no servers: ranking metrics on a hand-built case, config errors."""

from __future__ import annotations

import numpy as np
import pytest

from training.config import ConfigError, load_config
from training.evaluate import metrics, ranks


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
