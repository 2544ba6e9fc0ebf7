"""The shipped tuned tower: LoRA adapter + head saved in a few files, reloaded over the same base, equal to the trained model."""

from __future__ import annotations

import numpy as np
import torch

from models.testing import tiny_llama
from models.tower import build_tower
from models.tuned import TunedTower, add_lora, load_tuned, merge_lora, save_tuned

TEXTS = ["[ITEM][TITLE] Heat (1995)[GENRES] Action", "[USER][AGE] 31[HISTORY][ITEM][TITLE] Alien (1979)"]


def test_adapter_round_trip_equals_the_trained_tower(tmp_path):
    base = str(tiny_llama(tmp_path / "llama"))
    model = build_tower(base, dim=128, max_seq_length=64)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_tuned(model, tmp_path / "tuned", TunedTower(version="tiny_v1", base_model=base, dim=128, max_seq_length=64, pooling="mean"))
    merge_lora(model)
    model.eval()
    expected = model.encode(TEXTS, normalize_embeddings=True)
    loaded = load_tuned(tmp_path / "tuned")
    got = loaded.encode(TEXTS, normalize_embeddings=True)
    untuned = build_tower(base, dim=128, max_seq_length=64).encode(TEXTS, normalize_embeddings=True)
    assert np.min(np.sum(expected * got, axis=1)) > 0.9999
    assert np.max(np.sum(untuned * got, axis=1)) < 0.999  # the adapter and head did change the tower
    size = sum(f.stat().st_size for f in (tmp_path / "tuned").rglob("*") if f.is_file())
    full = sum(p.numel() * 4 for p in loaded.parameters())
    assert size < full / 4
