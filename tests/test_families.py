"""Calibration and the cache on each mlx-lm family with RoPE, from small configs with
random weights: bounded under compression, identical to the model's own cache when the
budget holds everything, and the model's own caches kept for sliding-window and
recurrent/convolution layers."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache as model_cache
from mlx_lm.utils import _get_classes

from triattn_mlx import TriAttentionKVCache, calibrate, make_prompt_cache

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128, rope_theta=10000.0,
            tie_word_embeddings=True, max_position_embeddings=4096)
YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "original_max_position_embeddings": 4096}
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 32, "sliding_window_pattern": 2},
    "phi3": {"original_max_position_embeddings": 4096},
    "gpt_oss": {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 32,
                "layer_types": ["sliding_attention", "full_attention"], "rope_scaling": YARN},
    # hybrid: short-convolution layers (ArraysCache) around one attention layer
    "lfm2": {"num_hidden_layers": 3, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": 64,
             "block_multiple_of": 16, "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False,
             "full_attn_idxs": [1]},
}


def build(family):
    mx.random.seed(0)
    config = dict(BASE, model_type=family, **FAMILIES[family])
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_family(family):
    model = build(family)
    stats = calibrate(model, list(range(1, 120)))
    assert np.isfinite(stats.q_abs_mean).all() and (stats.q_abs_mean > 0).any()
    tokens = mx.array([list(range(1, 101))])

    # budget >= length: the model's own cache and ours give the same logits
    own, ours = model_cache(model), make_prompt_cache(model, 512, stats=stats)
    np.testing.assert_allclose(np.array(model(tokens, cache=ours)), np.array(model(tokens, cache=own)), atol=1e-4)

    # under compression: every TriAttention layer bounded, the others are the model's own
    cache = make_prompt_cache(model, 64, stats=stats, window=16, divide_length=16, prompt_mode="chunked")
    for _ in range(4):
        mx.eval(model(tokens[:, :50], cache=cache))
    for mine, theirs in zip(cache, model_cache(model)):
        if isinstance(mine, TriAttentionKVCache):
            assert mine.size() < 80 and mine.offset == 200
        else:
            assert type(mine) is type(theirs)
    assert any(isinstance(c, TriAttentionKVCache) for c in cache)
