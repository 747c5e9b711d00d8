"""Eviction times quantization: QuantizedTriAttentionKVCache."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama
from mlx_lm.models.cache import QuantizedKVCache, save_prompt_cache

from triattn_mlx import (
    QuantizedTriAttentionKVCache,
    Settings,
    cache_report,
    calibrate,
    load_prompt_cache,
    make_prompt_cache,
)

OPTIONS = dict(budget=64, window=16, divide_length=16, sinks=2, prompt_mode="chunked")  # compressed as read


@pytest.fixture(scope="module")
def model():
    """head_dim 64: quantization groups of 32 or 64 fit."""
    return tiny_llama(hidden_size=128, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def stats(model):
    return calibrate(model, np.random.default_rng(1).integers(0, 128, 300))


def feed(model, cache, tokens, chunk):
    out = []
    for start in range(0, len(tokens), chunk):
        logits = model(mx.array(tokens[start : start + chunk])[None], cache=cache)
        mx.eval(logits)
        out.append(np.array(logits[0]))
    return np.concatenate(out)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (4, 32)])
def test_without_eviction_equals_mlx_lm_quantized_cache(model, stats, bits, group_size):
    tokens = np.random.default_rng(2).integers(0, 128, 300).tolist()
    ours = make_prompt_cache(model, 1024, stats=stats, kv_bits=bits, kv_group_size=group_size)
    theirs = [QuantizedKVCache(group_size=group_size, bits=bits) for _ in ours]
    assert all(isinstance(c, QuantizedTriAttentionKVCache) for c in ours)
    np.testing.assert_allclose(feed(model, ours, tokens, 37), feed(model, theirs, tokens, 37), atol=1e-5)


@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head"])
def test_quantized_cache_stays_bounded_and_compacts_packed_storage(model, stats, mode):
    cache = make_prompt_cache(model, stats=stats, pruning_mode=mode, kv_bits=4, **OPTIONS)
    plain = make_prompt_cache(model, stats=stats, pruning_mode=mode, **OPTIONS)
    tokens = np.random.default_rng(3).integers(0, 128, 500).tolist()
    for start in range(0, 500, 25):
        feed(model, cache, tokens[start : start + 25], 25)
        feed(model, plain, tokens[start : start + 25], 25)
        assert all(c.size() < 64 + 16 for c in cache)
    c = cache[0]
    assert c.prune_rounds > 10
    packed, scales, biases = c.keys
    assert packed.dtype == mx.uint32 and packed.shape[-1] == 64 * 4 // 32
    held = np.array(c.token_positions())
    assert (np.diff(held, axis=-1) > 0).all()
    assert set(range(500 - 16, 500)) <= set(held[0, 0].tolist()) and {0, 1} <= set(held[0, 0].tolist())
    # Scores of dequantized keys differ only slightly from exact ones: most choices agree.
    same = len(set(held[0, 0].tolist()) & set(np.array(plain[0].token_positions())[0, 0].tolist()))
    assert same >= 0.7 * c.size()
    assert cache_report(cache)["kv_bytes"] * 3 < cache_report(plain)["kv_bytes"]


def test_scoring_sees_exactly_the_dequantized_keys(model, stats):
    """Parity: the quantized path scores what dequantize(quantize(keys)) scores."""
    seen = []
    cache = make_prompt_cache(model, stats=stats, kv_bits=4, kv_group_size=32,
                              pruning_mode="per_layer_per_head", **OPTIONS)
    layer = cache[0]
    scorer = layer.scorer

    def recording(keys, positions, offset):
        seen.append((keys, scorer(keys, positions, offset)))
        return seen[-1][1]

    layer.scorer = recording
    raw_keys = []
    original_update = layer.update_and_fetch

    def update(keys, values):
        raw_keys.append(keys)
        return original_update(keys, values)

    layer.update_and_fetch = update
    feed(model, cache, np.random.default_rng(4).integers(0, 128, 80).tolist(), 80)
    keys, scores = seen[0]
    expected_keys = mx.dequantize(*mx.quantize(raw_keys[0], group_size=32, bits=4), group_size=32, bits=4)
    np.testing.assert_array_equal(np.array(keys), np.array(expected_keys))
    positions = mx.broadcast_to(mx.arange(80, dtype=mx.int32), keys.shape[:3])
    np.testing.assert_allclose(np.array(scores), np.array(scorer(expected_keys, positions, 80)), rtol=1e-6)


@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head"])
def test_quantized_save_load_continues_identically(tmp_path, model, stats, mode):
    cache = make_prompt_cache(model, stats=stats, pruning_mode=mode, kv_bits=8, **OPTIONS)
    feed(model, cache, np.random.default_rng(5).integers(0, 128, 150).tolist(), 50)
    save_prompt_cache(str(tmp_path / "q.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "q.safetensors"), model=model)
    assert [type(c) for c in loaded] == [QuantizedTriAttentionKVCache] * len(cache)
    assert loaded[0].bits == 8 and loaded[0].group_size == 64
    tokens = np.random.default_rng(6).integers(0, 128, 90).tolist()
    np.testing.assert_array_equal(feed(model, cache, tokens, 1), feed(model, loaded, tokens, 1))
    assert loaded[0].prune_rounds == cache[0].prune_rounds > 5


@pytest.mark.parametrize("kwargs,message", [
    (dict(kv_bits=7), "kv bits must be one of"),
    (dict(kv_bits=4, kv_group_size=48), "kv group size must be"),
])
def test_bad_quantization_fails_at_construction(model, stats, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_prompt_cache(model, stats=stats, **OPTIONS, **kwargs)


def test_kv_memory_at_32k_with_budget_4096_and_4_bits_is_25x_smaller():
    """Measured bytes of the arrays each cache holds, one Qwen3-8B-shaped attention layer
    (8 KV heads x head_dim 128, float16) fed 32k tokens in 2048-token chunks."""
    from mlx_lm.models.cache import KVCache

    from triattn_mlx.baselines import recency_scores

    full = KVCache()
    settings = Settings(budget=4096, kv_bits=4, kv_group_size=64, prompt_mode="chunked")
    ours = QuantizedTriAttentionKVCache(settings=settings, scorer=recency_scores)
    for start in range(0, 32768, 2048):
        k = mx.random.normal((1, 8, 2048, 128)).astype(mx.float16)
        v = mx.random.normal((1, 8, 2048, 128)).astype(mx.float16)
        full.update_and_fetch(k, v)
        ours.update_and_fetch(k, v)
        mx.eval(full.keys, full.values, ours.keys, ours.values)
    assert full.offset == ours.offset == 32768 and ours.size() <= 4096 + 2048
    ratio = full.nbytes / ours.nbytes
    print(f"32k tokens: full fp16 {full.nbytes / 2**20:.1f} MiB, budget 4096 4-bit "
          f"{ours.nbytes / 2**20:.2f} MiB ({ours.size()} tokens held): {ratio:.1f}x")
    assert ratio >= 25


def test_triattention_scorer_takes_quantized_keys(model, stats):
    """The scorer reads QuantizedKeys itself (the fused kernel on a GPU; here, MLX ops):
    same scores as on the dequantized keys."""
    from triattn_mlx.scoring import QuantizedKeys

    cache = make_prompt_cache(model, stats=stats, kv_bits=4, pruning_mode="per_layer_per_head", **OPTIONS)
    scorer = cache[0].scorer
    assert scorer.reads_quantized
    keys = mx.random.normal((1, 1, 70, 64))
    q = QuantizedKeys(*mx.quantize(keys, group_size=64, bits=4), 4, 64)
    positions = mx.broadcast_to(mx.arange(70, dtype=mx.int32), (1, 1, 70))
    np.testing.assert_array_equal(np.array(scorer(q, positions, 70)), np.array(scorer(q.dequantize(), positions, 70)))
