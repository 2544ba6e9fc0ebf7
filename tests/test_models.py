"""The tower, its ONNX export, the artifact and the runtime, on a tiny random LLaMA (and MiniLM once)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from models.artifact import MANIFEST, ModelArtifact
from models.export import export_artifact, probe_texts
from models.encoder import Encoder, TorchEncoder, padding_fraction, plan_batches
from models.errors import ArtifactError, ModelError
from models.render import MARKER_TOKENS, render_item, render_user
from models.samples import sample_items, sample_users
from models.testing import tiny_llama
from models.tower import Truncate, build_tower, resolve_base_model, truncate
from onetower.cli import app

TEXTS = probe_texts()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tower(llama_dir):
    return build_tower(str(llama_dir), dim=512, max_seq_length=128)


@pytest.fixture(scope="module")
def artifact(tower, llama_dir, tmp_path_factory) -> ModelArtifact:
    span = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC))
    out = tmp_path_factory.mktemp("art") / "v1"
    return export_artifact(tower, out, version="tiny_v1", base_model=str(llama_dir), int8=True, fp16=True, training_data_range=span)


def test_tower_adds_markers_pad_token_and_projection(tower):
    tokenizer = tower.tokenizer
    assert tokenizer.pad_token is not None  # the LLaMA tokenizer has none of its own
    assert set(MARKER_TOKENS) <= set(tokenizer.additional_special_tokens)
    assert tower[0].auto_model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert [type(m).__name__ for m in tower] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert tower.get_embedding_dimension() == 512


def test_projection_keeps_the_base_models_cosines(tower):
    """Hidden 64 < 512: an orthonormal projection, so the untuned tower ranks exactly like the base model."""
    features = tower.preprocess(TEXTS[:3])
    with torch.inference_mode():
        pooled = tower[1](tower[0](dict(features)))["sentence_embedding"].numpy()
        out = tower(dict(features))["sentence_embedding"].numpy()
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(out @ out.T, pooled @ pooled.T, atol=1e-5)


def test_truncation_and_normalisation(llama_dir):
    """Hidden 64 > 32: the first 32 mean-pooled dims, renormalised."""
    small = build_tower(str(llama_dir), dim=32)
    assert isinstance(small[2], Truncate) and small.get_embedding_dimension() == 32
    batch = small.tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = small[0].auto_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1))[:, :32]
    expected = torch.nn.functional.normalize(expected, dim=1).numpy()
    got = TorchEncoder(small).encode(TEXTS[:4])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    narrower = truncate(got, 8)
    np.testing.assert_allclose(narrower, got[:, :8] / np.linalg.norm(got[:, :8], axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ModelError, match="width 33"):
        truncate(got, 33)


def test_pooling_ignores_padding(artifact, tower):
    """The same text padded with 40 more positions gives the same vector, in torch and in ONNX."""
    encoder = Encoder.load(artifact.path)
    ids = encoder.tokenize([TEXTS[0]])[0]
    pad = encoder.tokenizer.pad_token_id
    short = (np.array([ids]), np.ones((1, len(ids)), dtype=np.int64))
    long = (np.array([ids + [pad] * 40]), np.array([[1] * len(ids) + [0] * 40]))
    torch_encoder = TorchEncoder(tower)
    for enc in (encoder, torch_encoder):
        np.testing.assert_allclose(enc._run(*short), enc._run(*long), atol=1e-5)
    # and through encode(): alone vs batched next to a much longer text
    alone = encoder.encode([TEXTS[0]])
    batched = encoder.encode([TEXTS[0], TEXTS[-1]], max_batch_tokens=10**6)
    np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)


def test_onnx_parity_with_torch(artifact, tower):
    reference = TorchEncoder(tower).encode(TEXTS)
    cos = {v: np.sum(reference * Encoder.load(artifact.path, variant=v).encode(TEXTS), axis=1).min() for v in ("fp32", "int8")}
    assert cos["fp32"] >= 0.999
    assert cos["int8"] >= 0.95
    assert artifact.manifest.parity["fp32"] >= 0.999
    assert artifact.manifest.parity["int8"] == pytest.approx(cos["int8"], abs=1e-4)


def test_a_causal_towers_artifact_carries_its_decoder_graph(artifact, tower, tmp_path):
    """The decoder with past keys/values in and out, for incremental re-encoding: onnxruntime's states
    and keys/values equal torch's, for several new tokens over a left-padded past."""
    from models.incremental import OnnxDecoder, TorchDecoder

    assert artifact.manifest.decoder.file == "decoder/model.onnx" and artifact.manifest.parity["decoder"] >= 0.9999
    onnx_decoder, torch_decoder = OnnxDecoder(artifact.decoder_path), TorchDecoder(tower[0].auto_model)
    assert onnx_decoder.kv_shape == torch_decoder.kv_shape == (2, 2, 16)
    layers, heads, head_dim = onnx_decoder.kv_shape
    rng = np.random.default_rng(0)
    past = rng.standard_normal((layers, 2, 2, heads, 5, head_dim)).astype(np.float32)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0], [1] * 10], dtype=np.int64)  # row 0: a past of 3, 4 new tokens
    input_ids = rng.integers(10, 1000, (2, 5))
    positions = np.array([[3, 4, 5, 6, 7], [5, 6, 7, 8, 9]])
    (states, present), (expected, expected_present) = (d(input_ids, mask, positions, past) for d in (onnx_decoder, torch_decoder))
    np.testing.assert_allclose(states[0, :4], expected[0, :4], atol=1e-4)
    np.testing.assert_allclose(states[1], expected[1], atol=1e-4)
    for (keys, values), (expected_keys, expected_values) in zip(present, expected_present):
        np.testing.assert_allclose(keys, expected_keys, atol=1e-4)
        np.testing.assert_allclose(values, expected_values, atol=1e-4)
    no_decoder = _copy(artifact, tmp_path / "no-decoder")
    manifest = json.loads((no_decoder / MANIFEST).read_text())
    (no_decoder / "decoder" / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="decoder/model.onnx: missing"):
        ModelArtifact.load(no_decoder)
    (no_decoder / MANIFEST).write_text(json.dumps({**manifest, "decoder": None}))
    with pytest.raises(ArtifactError, match="no decoder graph"):
        ModelArtifact.load(no_decoder).decoder_path


def test_encode_order_batching_and_shapes(artifact):
    encoder = Encoder.load(artifact.path, threads=1)
    texts = TEXTS[::-1]
    together = encoder.encode(texts, max_batch_tokens=256)
    one_by_one = np.vstack([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert together.dtype == np.float32 and together.shape == (len(texts), 512)
    assert encoder.encode([]).shape == (0, 512)
    long_text = TEXTS[-1] * 4
    assert encoder.count_tokens([long_text])[0] > encoder.max_seq_length == len(encoder.tokenize([long_text])[0])


def test_plan_batches_respects_the_budget_with_little_padding():
    lengths = [len(render_item(f, c)) // 4 for f, c in sample_items(300)] + [5, 2000, 1, 1]
    batches = plan_batches(lengths, 1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 1024
        assert padding_fraction([lengths[i] for i in batch], [range(len(batch))]) <= 0.10
    assert [301] in batches  # longer than the budget: a batch of its own
    assert [302, 303] in batches or [303, 302] in batches
    assert padding_fraction([10, 20], [[0, 1]]) == pytest.approx(1 - 30 / 40)
    with pytest.raises(ModelError, match="max_batch_tokens"):
        plan_batches([3], 0)


def test_user_text_fits_the_encoder_context(artifact):
    encoder = Encoder.load(artifact.path)
    profile, history = sample_users(1, seed=3, history=(60, 60))[0]
    text = render_user(profile, history, tokenizer=encoder.tokenizer, max_tokens=encoder.max_seq_length)
    assert encoder.count_tokens([text])[0] <= encoder.max_seq_length
    assert text.endswith(render_item(history[-1]))  # the newest engagement survived


def test_torch_encoder_restores_training_mode(tower):
    tower.train()
    try:
        TorchEncoder(tower).encode(TEXTS[:1])
        assert tower.training
    finally:
        tower.eval()


def test_manifest_round_trip(artifact):
    loaded = ModelArtifact.load(artifact.path)
    assert loaded.manifest == artifact.manifest
    m = loaded.manifest
    assert (m.version, m.dim, m.widths, m.pooling, m.prompt_format_version) == ("tiny_v1", 512, [512, 256, 128, 64], "mean", "1")
    assert m.training_data_range[0] == datetime(2024, 1, 1, tzinfo=UTC)
    assert set(m.onnx) == {"fp32", "int8", "fp16"}
    reloaded = loaded.load_sentence_transformer()
    np.testing.assert_allclose(TorchEncoder(reloaded).encode(TEXTS[:2]), Encoder.load(artifact.path).encode(TEXTS[:2]), atol=1e-4)


def test_lasttoken_pooling_and_external_data(llama_dir, tmp_path):
    tower = build_tower(str(llama_dir), dim=48, pooling="lasttoken")
    art = export_artifact(tower, tmp_path / "ext", base_model="tiny", external_data=True)
    assert art.manifest.pooling == "lasttoken" and art.manifest.onnx["fp32"].data_file == "model.onnx.data"
    assert art.manifest.parity["fp32"] >= 0.999
    onnx_encoder, torch_encoder = Encoder.load(art.path), TorchEncoder.load(art.path)  # reloads the Truncate module
    assert onnx_encoder.dim == torch_encoder.dim == 48
    np.testing.assert_allclose(onnx_encoder.encode(TEXTS[:3]), torch_encoder.encode(TEXTS[:3]), atol=1e-4)


def test_minilm_export_parity(tmp_path):
    """The real offline encoder: 384-d BERT projected to 512, ONNX fp32 equal to torch."""
    tower = build_tower("minilm", max_seq_length=64)
    art = export_artifact(tower, tmp_path / "minilm", base_model="minilm")
    assert art.manifest.parity["fp32"] >= 0.999
    assert art.version.startswith("minilm_")
    assert art.manifest.decoder is None  # bidirectional: nothing to reuse


def _copy(artifact: ModelArtifact, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(artifact.path, dst))


def test_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load base model"):
        build_tower(str(tmp_path / "no-such-model"))


def test_smollm2_before_import_says_how_to_fix(tmp_path):
    with pytest.raises(ModelError, match="onetower model import-gguf"):
        resolve_base_model("smollm2", cache_dir=tmp_path)
    assert resolve_base_model("org/some-model", cache_dir=tmp_path) == "org/some-model"


def test_missing_and_corrupt_artifacts(artifact, tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        ModelArtifact.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        ModelArtifact.load(tmp_path / "empty")

    corrupt = _copy(artifact, tmp_path / "corrupt")
    (corrupt / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        ModelArtifact.load(corrupt)

    other_format = _copy(artifact, tmp_path / "format")
    manifest = json.loads((other_format / MANIFEST).read_text())
    (other_format / MANIFEST).write_text(json.dumps({**manifest, "prompt_format_version": "0"}))
    with pytest.raises(ArtifactError, match="prompt format 0"):
        ModelArtifact.load(other_format)

    truncated = _copy(artifact, tmp_path / "truncated")
    with open(truncated / "model.onnx", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ArtifactError, match="truncated"):
        ModelArtifact.load(truncated)

    garbled = _copy(artifact, tmp_path / "garbled")
    size = (garbled / "model.onnx").stat().st_size
    (garbled / "model.onnx").write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    with pytest.raises(ArtifactError, match="cannot load"):
        Encoder.load(garbled)

    no_int8 = _copy(artifact, tmp_path / "no-int8")
    manifest = json.loads((no_int8 / MANIFEST).read_text())
    del manifest["onnx"]["int8"]
    (no_int8 / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="no int8 graph"):
        Encoder.load(no_int8, variant="int8")


def test_export_refuses_bad_version_and_non_empty_dir(tower, artifact, tmp_path):
    with pytest.raises(ArtifactError, match="letters, digits"):
        export_artifact(tower, tmp_path / "x", version="v1.0-beta", base_model="tiny")
    with pytest.raises(ArtifactError, match="not empty"):
        export_artifact(tower, artifact.path, base_model="tiny")


def test_cli_export_and_info(llama_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-art"
    result = runner.invoke(app, ["model", "export", "--base", str(llama_dir), "--out", str(out), "--version", "cli_v1"])
    assert result.exit_code == 0, result.output
    assert "cli_v1" in result.output and ModelArtifact.load(out).manifest.version == "cli_v1"
    assert "decoder 1.0000" in result.output and ModelArtifact.load(out).manifest.decoder is not None
    lean = runner.invoke(app, ["model", "export", "--base", str(llama_dir), "--out", str(tmp_path / "lean"), "--no-decoder"])
    assert lean.exit_code == 0 and ModelArtifact.load(tmp_path / "lean").manifest.decoder is None
    assert not (tmp_path / "lean" / "decoder").exists()
    info = runner.invoke(app, ["model", "info", str(out)])
    assert info.exit_code == 0 and '"version": "cli_v1"' in info.output
    bad = runner.invoke(app, ["model", "export", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert bad.exit_code == 1 and "cannot load base model" in bad.output
