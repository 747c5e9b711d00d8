"""Which cached tokens each KV head keeps."""

import mlx.core as mx


def protected_tokens(positions, offset, window, sinks):
    # positions: [B, H_kv, N] absolute -> bool [B, H_kv, N]: the recent window and the sinks
    return (positions >= offset - window) | (positions < sinks)


def select_tokens(scores, positions, offset, budget, window, sinks):
    """Indices of the `budget` tokens each KV head keeps, in temporal order.

    scores, positions: [B, H_kv, N] -> [B, H_kv, budget] int32. The recent `window`
    tokens and the first `sinks` positions are always kept and count in the budget.
    """
    ranked = mx.where(protected_tokens(positions, offset, window, sinks), mx.inf, scores)
    keep = mx.argpartition(-ranked, kth=budget - 1, axis=-1)[..., :budget]
    return mx.sort(keep, axis=-1)  # the buffer stays in temporal order: trim relies on it


def gather_tokens(x, indices):
    # x: [B, H_kv, N, ...], indices: [B, H_kv, K] -> [B, H_kv, K, ...]
    if x.ndim == 3:
        return mx.take_along_axis(x, indices, axis=2)
    return mx.take_along_axis(x, indices[..., None], axis=2)
