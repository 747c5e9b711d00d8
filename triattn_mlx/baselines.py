"""Other ways to score cached keys, plugged into the same cache and selection.

Each scorer maps (keys [B, H_kv, N, D], positions [B, H_kv, N], offset) to [B, H_kv, N];
the cache keeps the highest-scoring tokens besides its protected window and sinks, so only
the scoring differs between methods. Scorers that need attention (H2O, SnapKV, R-KV) read
the post-RoPE queries a RecentQueries recorder keeps on the layer's rope:

    factory = attention_scorer_factory(model, "snapkv")
    cache = make_prompt_cache(model, budget, scorer_factory=factory)
    ...
    remove_recent_queries(model)
"""

import math

import mlx.core as mx
import numpy as np

from .model_info import attention_module, model_layers
from .scoring import zscore
from .stats import RopeTap, remove_query_recorders


def random_scores(keys, positions, offset):
    """Random eviction: the floor any method must clear. Seeded by the offset, so a rerun
    evicts the same tokens."""
    return mx.random.uniform(shape=positions.shape, key=mx.random.key(int(offset)))


def recency_scores(keys, positions, offset):
    """StreamingLLM: keep the most recent tokens (with the cache's sinks, sinks + window)."""
    return positions.astype(mx.float32)


def key_norm_scores(keys, positions, offset):
    """Key L2 norm: what scoring falls back to without calibrated query centers (the
    reference MLX port's placeholder calibration, see ../shared/TRIATTENTION.md)."""
    return mx.sqrt((keys.astype(mx.float32) ** 2).sum(-1))


class RecentQueries(RopeTap):
    """Keeps the rotated queries an attention's rope returns: those since the last
    `drain()` (for H2O) and the newest 256 (SnapKV's observation window)."""

    keep = 256

    def __init__(self, rope):
        super().__init__(rope)
        self.pending, self.recent = [], None

    def on_queries(self, pre_rope, rotated):
        self.pending.append(rotated)

    def drain(self):
        """Queries since the last drain ([B, H, M, D], the newest last; None if none)."""
        new = mx.concatenate(self.pending, axis=2) if self.pending else None
        self.pending = []
        if new is not None:
            both = new if self.recent is None else mx.concatenate([self.recent, new], axis=2)
            self.recent = both[:, :, -self.keep :]
        return new


def attention_probs(queries, keys, q_positions, k_positions):
    """Causal softmax attention of queries over the cached keys, per query head:
    queries [B, H, M, D], keys [B, H_kv, N, D] -> [B, H, M, N] float32."""
    B, H, M, D = queries.shape
    n_kv = keys.shape[1]
    k = mx.repeat(keys, H // n_kv, axis=1).astype(mx.float32)
    logits = (queries.astype(mx.float32) @ k.swapaxes(-1, -2)) / math.sqrt(D)
    visible = k_positions[:, :, None, :] <= q_positions[None, None, :, None]
    visible = mx.repeat(visible, H // n_kv, axis=1)
    logits = mx.where(visible, logits, -mx.inf)
    return mx.softmax(logits, axis=-1)


def group_reduce(x, n_kv, op):
    B, H = x.shape[:2]
    x = x.reshape(B, n_kv, H // n_kv, *x.shape[2:])
    return x.max(axis=2) if op == "max" else x.sum(axis=2)


def pool1d(x, kernel, op):
    """Max or mean pooling along the last axis, same length (SnapKV / R-KV smoothing)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    fill = -mx.inf if op == "max" else 0.0
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], constant_values=fill)
    windows = mx.stack([padded[..., i : i + x.shape[-1]] for i in range(kernel)], axis=0)
    return windows.max(axis=0) if op == "max" else windows.mean(axis=0)


class H2OScorer:
    """H2O: attention each cached token has received, accumulated over every query seen
    (summed over the query heads of its KV head), kept per absolute position."""

    def __init__(self, recorder, n_kv_heads):
        self.recorder, self.n_kv = recorder, n_kv_heads
        self.total = None  # [B, H_kv, positions] float64

    def __call__(self, keys, positions, offset):
        queries = self.recorder.drain()
        B = keys.shape[0]
        if self.total is None or self.total.shape[-1] < offset:
            grown = np.zeros((B, self.n_kv, max(offset, 2 * (0 if self.total is None else self.total.shape[-1]))))
            if self.total is not None:
                grown[..., : self.total.shape[-1]] = self.total
            self.total = grown
        if queries is not None:
            q_pos = mx.arange(offset - queries.shape[2], offset)
            probs = attention_probs(queries, keys, q_pos, positions)  # [B, H, M, N]
            received = np.array(group_reduce(probs.sum(axis=2), self.n_kv, "sum"))
            pos = np.array(positions)
            np.add.at(self.total, (np.arange(B)[:, None, None], np.arange(self.n_kv)[None, :, None], pos), received)
        return mx.array(np.take_along_axis(self.total, np.array(positions), axis=-1).astype(np.float32))


class SnapKVScorer:
    """SnapKV: attention from an observation window of the most recent queries, pooled
    along the sequence (max over the query heads of a KV head, as R-KV does)."""

    def __init__(self, recorder, n_kv_heads, window=32, kernel=7):
        self.recorder, self.n_kv, self.window, self.kernel = recorder, n_kv_heads, window, kernel

    def importance(self, keys, positions, offset):
        self.recorder.drain()
        queries = self.recorder.recent[:, :, -self.window :]
        q_pos = mx.arange(offset - queries.shape[2], offset)
        probs = attention_probs(queries, keys, q_pos, positions).mean(axis=2)  # [B, H, N]
        return pool1d(group_reduce(probs, self.n_kv, "max"), self.kernel, "max")

    def __call__(self, keys, positions, offset):
        return self.importance(keys, positions, offset)


class RKVScorer(SnapKVScorer):
    """R-KV: lambda * importance (SnapKV-style attention) - (1 - lambda) * redundancy,
    redundancy being the softmaxed mean cosine similarity of a key to the others (for each
    key, the newest key very similar to it is not counted against it)."""

    def __init__(self, recorder, n_kv_heads, window=8, kernel=7, mix=0.1, threshold=0.5):
        super().__init__(recorder, n_kv_heads, window, kernel)
        self.mix, self.threshold = mix, threshold

    def __call__(self, keys, positions, offset):
        importance = self.importance(keys, positions, offset)
        k = keys.astype(mx.float32)
        k = k / (mx.linalg.norm(k, axis=-1, keepdims=True) + 1e-8)
        sim = k @ k.swapaxes(-1, -2)  # [B, H_kv, N, N]
        N = sim.shape[-1]
        eye = mx.eye(N, dtype=mx.bool_)
        sim = mx.where(eye, 0.0, sim)
        idx = mx.arange(N)
        newest_similar = mx.where(sim > self.threshold, idx, 0).max(axis=-1, keepdims=True)
        sim = mx.where(idx == newest_similar, 0.0, sim)
        redundancy = mx.softmax(sim.mean(axis=-2), axis=-1)
        return self.mix * importance - (1 - self.mix) * redundancy


ATTENTION_SCORERS = {"h2o": H2OScorer, "snapkv": SnapKVScorer, "rkv": RKVScorer}


class PriorPlusRecentScorer:
    """A variant: TriAttention's calibrated score mixed with the observed attention of the
    most recent real queries (SnapKV's signal): z(prior) + weight * z(recent), per KV head."""

    def __init__(self, prior, recent, weight=1.0):
        self.prior, self.recent, self.weight = prior, recent, weight

    def __call__(self, keys, positions, offset):
        return (zscore(self.prior(keys, positions, offset))
                + self.weight * zscore(self.recent(keys, positions, offset)))


def attention_scorer_factory(model, kind, **options):
    """A scorer_factory for make_prompt_cache. Each call wraps that layer's rope in a
    RecentQueries (after make_prompt_cache has read the rope's geometry); take them off
    with remove_recent_queries(model)."""
    cls, layers = ATTENTION_SCORERS[kind], model_layers(model)

    def factory(i, info):
        attn = attention_module(layers[i])
        rope = attn.rope.rope if isinstance(attn.rope, RecentQueries) else attn.rope
        attn["rope"] = recorder = RecentQueries(rope)
        return cls(recorder, info.n_kv_heads, **options)

    return factory


def remove_recent_queries(model):
    remove_query_recorders(model, RecentQueries)
