"""Stats format, loader validation, and calibration against a direct computation."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama

from triattn_mlx import StatsError, calibrate, load_stats
from triattn_mlx.stats import METADATA_KEY


@pytest.fixture
def stats_file(tmp_path, tiny_model):
    stats = calibrate(tiny_model, list(range(100)), source="unit test")
    path = tmp_path / "tiny.safetensors"
    stats.save(path)
    return path, stats


def test_calibration_equals_pre_rope_query_means(tiny_model):
    tokens = np.random.default_rng(0).integers(0, 128, 77)
    stats = calibrate(tiny_model, tokens, chunk_size=32)
    # Reference: run the model layer by layer by hand and project queries before RoPE.
    h = tiny_model.model.embed_tokens(mx.array(tokens)[None])
    for i, layer in enumerate(tiny_model.layers):
        attn = layer.self_attn
        q = attn.q_proj(layer.input_layernorm(h)).reshape(1, len(tokens), attn.n_heads, -1)
        q = np.array(q[0]).transpose(1, 0, 2)  # [H, L, D]
        half = q.shape[-1] // 2
        z = q[..., :half] + 1j * q[..., half:]  # half-style pairs
        np.testing.assert_allclose(stats.q_mean[i], z.mean(1), atol=1e-5)
        np.testing.assert_allclose(stats.q_abs_mean[i], np.abs(z).mean(1), atol=1e-5)
        h = layer(h, "causal", None)
    assert stats.metadata["tokens_used"] == 77
    assert stats.metadata["num_kv_heads"] == 2 and stats.metadata["rope_style"] == "half"
    assert (stats.mean_resultant_length() <= 1 + 1e-9).all()


def test_round_trip(stats_file, tiny_model):
    path, stats = stats_file
    loaded = load_stats(path, tiny_model)
    np.testing.assert_allclose(loaded.q_mean, stats.q_mean, rtol=1e-6)
    np.testing.assert_allclose(loaded.q_abs_mean, stats.q_abs_mean, rtol=1e-6)
    assert loaded.metadata["source"] == "unit test" and loaded.metadata["format_version"] == 1


@pytest.mark.parametrize("override, field", [
    (dict(num_hidden_layers=3), "num_layers is 2 in the stats file but 3 in the model"),
    (dict(num_attention_heads=8, num_key_value_heads=2), "num_attention_heads is 4"),
    (dict(hidden_size=128), "head_dim is 16 in the stats file but 32"),
    (dict(rope_traditional=True), "rope_style is 'half' in the stats file but 'traditional'"),
    (dict(rope_theta=500000.0), "rope_theta is 10000.0 in the stats file but 500000.0"),
])
def test_mismatch_names_the_field_and_both_values(stats_file, override, field):
    path, _ = stats_file
    with pytest.raises(StatsError, match=field):
        load_stats(path, tiny_llama(**override))


def write(path, arrays, meta):
    mx.save_safetensors(str(path), arrays, metadata={METADATA_KEY: json.dumps(meta)} if meta else {})


def test_bad_files_are_rejected_with_a_reason(tmp_path, stats_file):
    path, stats = stats_file
    with pytest.raises(StatsError, match="not found"):
        load_stats(tmp_path / "nope.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(StatsError, match="cannot read stats file"):
        load_stats(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(StatsError, match="cannot read stats file"):
        load_stats(garbage)

    arrays = dict(mx.load(str(path)))
    meta = stats.metadata
    write(tmp_path / "nometa.safetensors", arrays, None)
    with pytest.raises(StatsError, match="not a triattn-mlx stats file"):
        load_stats(tmp_path / "nometa.safetensors")
    nan = dict(arrays, q_abs_mean=mx.full(arrays["q_abs_mean"].shape, float("nan")))
    write(tmp_path / "nan.safetensors", nan, meta)
    with pytest.raises(StatsError, match="NaN"):
        load_stats(tmp_path / "nan.safetensors")
    write(tmp_path / "shape.safetensors", dict(arrays, q_mean_real=mx.zeros((2, 4, 3))), meta)
    with pytest.raises(StatsError, match=r"q_mean_real has shape \(2, 4, 3\)"):
        load_stats(tmp_path / "shape.safetensors")
