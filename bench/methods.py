"""Every KV strategy the benchmarks compare, built the same way: name -> cache maker.

All eviction methods run in the same TriAttentionKVCache (same budget, protected window
min(128, budget / 2), divide_length 128, same selection); only the scoring differs.
mlx-lm's own caches are used as they are.
"""

from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache
from mlx_lm.models.cache import make_prompt_cache as full_cache

from triattn_mlx import make_prompt_cache, remove_query_recorders
from triattn_mlx.baselines import (PriorPlusRecentScorer, attention_scorer_factory, key_norm_scores, random_scores,
                                   recency_scores)
from triattn_mlx.scoring import TriAttentionScorer
from triattn_mlx.stats import RopeTap

TRIATTENTION = "TriAttention (per_head)"  # the project's default


def window(budget):
    """The protected recent window: the cache default (128) where the budget allows."""
    return min(128, budget // 2)


def methods(stats):
    """{name: make(model, budget) -> cache}. `stats`: calibrated on other text."""

    def cache(model, budget, **options):
        return make_prompt_cache(model, budget, window=window(budget), **options)

    def tri(**options):
        return lambda model, budget: cache(model, budget, stats=stats, **options)

    def scored(scorer, **options):
        return lambda model, budget: cache(model, budget, scorer_factory=lambda i, info: scorer, **options)

    def attention(kind):
        return lambda model, budget: cache(model, budget, scorer_factory=attention_scorer_factory(model, kind),
                                           pruning_mode="per_layer_per_head")

    def prior_plus_recent(weight):
        def make(model, budget):
            recent = attention_scorer_factory(model, "snapkv")

            def factory(i, info):
                prior = TriAttentionScorer(stats.q_mean[i], stats.q_abs_mean[i], info.rope, info.n_kv_heads)
                return PriorPlusRecentScorer(prior, recent(i, info), weight)

            return cache(model, budget, scorer_factory=factory)

        return make

    return {
        TRIATTENTION: tri(),
        "TriAttention + recent queries (z-mix 1:1)": prior_plus_recent(1.0),
        "TriAttention (window budget/4)": lambda model, budget: make_prompt_cache(
            model, budget, window=budget // 4, stats=stats),
        "TriAttention (per_layer_per_head)": tri(pruning_mode="per_layer_per_head"),
        "TriAttention (self-calibrated)": lambda model, budget: cache(model, budget, stats="self"),
        "TriAttention trig term only": tri(terms="trig"),
        "TriAttention norm term only": tri(terms="norm"),
        "StreamingLLM (4 sinks + recent)": scored(recency_scores, sinks=4),
        "H2O": attention("h2o"),
        "SnapKV": attention("snapkv"),
        "R-KV": attention("rkv"),
        "key norm (reference MLX port fallback)": scored(key_norm_scores),
        "random": scored(random_scores),
        "mlx-lm RotatingKVCache(keep=4)": lambda model, budget: [RotatingKVCache(budget, keep=4)
                                                                 for _ in model.layers],
    }


def equal_memory_methods():
    """mlx-lm's QuantizedKVCache holds every token: compared at equal memory, not tokens."""
    return {f"mlx-lm QuantizedKVCache {bits}-bit": (lambda model, budget, bits=bits: [
        QuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]) for bits in (4, 8)}


def cleanup(model):
    """Take off any query recorders a method installed."""
    remove_query_recorders(model, RopeTap)


__all__ = ["methods", "equal_memory_methods", "cleanup", "full_cache", "TRIATTENTION"]
