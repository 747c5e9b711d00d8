"""Other ways to score cached keys, plugged into the same cache and selection.

Each scorer maps (keys [B, H_kv, N, D], positions [B, H_kv, N], offset) to [B, H_kv, N];
the cache keeps the highest-scoring tokens besides its protected window and sinks.
"""

import mlx.core as mx


def random_scores(keys, positions, offset):
    """Random eviction: the floor any method must clear."""
    return mx.random.uniform(shape=positions.shape)


def recency_scores(keys, positions, offset):
    """StreamingLLM: keep the most recent tokens (with the cache's sinks, sinks + window)."""
    return positions.astype(mx.float32)
