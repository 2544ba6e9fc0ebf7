"""A tiny randomly initialised LLaMA with SmolLM2's real tokenizer, for fast tests of the causal-LM path."""

from __future__ import annotations

from pathlib import Path

import torch

from models.tower import smollm2_gguf


def tiny_llama(path: Path, *, hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a seeded tiny LLaMA (SmolLM2 tokenizer, no pad token, like the real one) to ``path``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
