"""Every KV strategy the benchmarks compare, built the same way: name -> cache maker.

All eviction methods run in the same TriAttentionKVCache (same budget, protected window
min(128, budget / 2), divide_length 128, same selection); only the scoring differs. The
text is read as a long prompt compressed as it is read (prompt_mode "chunked"): teacher
forcing feeds it in chunks, and no single token ever ends it.
mlx-lm's own caches are used as they are.
"""

from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache
from mlx_lm.models.cache import make_prompt_cache as full_cache

from triattn_mlx import make_prompt_cache, remove_taps
from triattn_mlx.baselines import SnapKVScorer
from triattn_mlx.scoring import TriAttentionScorer
from triattn_mlx.selection import zscore

TRIATTENTION = "TriAttention (auto, the default)"  # per_layer_per_head up to budget 128, per_head above


def window(budget):
    """The protected recent window: the cache default (128) where the budget allows."""
    return min(128, budget // 2)


class PriorPlusRecentScorer:
    """A variant: TriAttention's calibrated score mixed with the observed attention of the
    most recent real queries (SnapKV's signal, from the cache's window of the newest 32),
    per query head: z(prior) + weight * z(recent)."""

    observes, observe = "always", 32

    def __init__(self, prior, weight=1.0):
        self.prior, self.recent, self.weight = prior, SnapKVScorer(self.observe), weight

    def __call__(self, keys, positions, offset, queries=None):
        return (zscore(self.prior(keys, positions, offset))
                + self.weight * zscore(self.recent(keys, positions, offset, queries)))


def methods(stats):
    """{name: make(model, budget) -> cache}. `stats`: calibrated on other text."""

    def cache(model, budget, pruning_mode="per_head", **options):  # every row per_head unless it says
        return make_prompt_cache(model, budget, window=window(budget), prompt_mode="chunked",
                                 pruning_mode=pruning_mode, **options)

    def tri(**options):
        return lambda model, budget: cache(model, budget, stats=stats, **options)

    def baseline(method, **options):
        return lambda model, budget: cache(model, budget, method=method, **options)

    def tri_scorer(**options):
        def factory(i, info):
            return TriAttentionScorer(stats.q_mean[i], stats.q_abs_mean[i], info.rope, info.n_kv_heads, **options)

        return lambda model, budget: cache(model, budget, scorer_factory=factory)

    def prior_plus_recent(weight):
        def factory(i, info):
            prior = TriAttentionScorer(stats.q_mean[i], stats.q_abs_mean[i], info.rope, info.n_kv_heads)
            return PriorPlusRecentScorer(prior, weight)

        return lambda model, budget: cache(model, budget, scorer_factory=factory)

    table = {
        TRIATTENTION: tri(pruning_mode="auto"),
        "TriAttention (per_head)": tri(),
        "TriAttention + recent queries (z-mix 1:1)": prior_plus_recent(1.0),
        "TriAttention (window budget/4)": lambda model, budget: make_prompt_cache(
            model, budget, window=budget // 4, stats=stats, prompt_mode="chunked", pruning_mode="per_head"),
        "TriAttention (per_layer_per_head)": tri(pruning_mode="per_layer_per_head"),
        "TriAttention (self-calibrated)": lambda model, budget: cache(model, budget, stats="self"),
        "TriAttention trig term only": tri_scorer(terms="trig"),
        "TriAttention norm term only": tri_scorer(terms="norm"),
        "StreamingLLM (4 sinks + recent)": baseline("streamingllm", sinks=4),
        "key norm (reference MLX port fallback)": baseline("key_norm"),
        "random": baseline("random"),
        "mlx-lm RotatingKVCache(keep=4)": lambda model, budget: [RotatingKVCache(budget, keep=4)
                                                                 for _ in model.layers],
    }
    for method, name in (("h2o", "H2O"), ("snapkv", "SnapKV"), ("rkv", "R-KV")):  # both pruning modes
        table[f"{name} (per_head)"] = baseline(method)
        table[f"{name} (per_layer_per_head)"] = baseline(method, pruning_mode="per_layer_per_head")
    return table


def equal_memory_methods():
    """mlx-lm's QuantizedKVCache holds every token: compared at equal memory, not tokens."""
    return {f"mlx-lm QuantizedKVCache {bits}-bit": (lambda model, budget, bits=bits: [
        QuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]) for bits in (4, 8)}


def cleanup(model):
    """Take off any rope taps a method installed."""
    remove_taps(model)


__all__ = ["methods", "equal_memory_methods", "cleanup", "full_cache", "TRIATTENTION"]
