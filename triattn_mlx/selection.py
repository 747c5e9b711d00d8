"""Which cached tokens each KV head keeps: the one place every method's scores go through.

The scorer contract (scoring.py, baselines.py): a scorer maps the held keys
[B, H_kv, N, D], their absolute positions [B, H_kv, N] and the cache offset (position of
the next token) to RAW scores [B, H, N], H being the query heads (or the KV heads, for a
scorer whose signal is per KV head); higher means keep. Everything after that is here:
  1. head_scores: z-normalize each head's scores, then reduce the query heads sharing a
     KV head (GQA) by max: a key matters if any query head of its group needs it;
  2. (per_head pruning: the layers' head scores are averaged, groups.py);
  3. select_tokens: the recent window and the sinks are always kept, then (coverage,
     settings.segments) each stretch's quota, the rest by score.
"""

import mlx.core as mx


def protected_tokens(positions, offset, window, sinks):
    # positions: [B, H_kv, N] absolute -> bool [B, H_kv, N]: the recent window and the sinks
    return (positions >= offset - window) | (positions < sinks)


def zscore(scores, axis=-1, eps=1e-6, where=None):
    # scores: [..., N] -> (scores - mean) / std along `axis`, the statistics taken over the
    # entries `where` (bool, broadcastable to scores) is true, or over all
    if where is None:
        mean = scores.mean(axis=axis, keepdims=True)
        std = mx.sqrt(((scores - mean) ** 2).mean(axis=axis, keepdims=True))
        return (scores - mean) / (std + eps)
    weight = mx.broadcast_to(where, scores.shape).astype(scores.dtype)
    count = mx.maximum(weight.sum(axis=axis, keepdims=True), 1)
    mean = (scores * weight).sum(axis=axis, keepdims=True) / count
    std = mx.sqrt((((scores - mean) * weight) ** 2).sum(axis=axis, keepdims=True) / count)
    return (scores - mean) / (std + eps)


def gqa_max(scores, n_kv_heads):
    # scores: [B, H, N] -> [B, H_kv, N]
    B, H, N = scores.shape
    return scores.reshape(B, n_kv_heads, H // n_kv_heads, N).max(axis=2)


def head_scores(raw, n_kv_heads, candidates=None):
    """Raw scores [B, H, N] (H query heads or KV heads) -> comparable per-KV-head scores
    [B, H_kv, N]: z-normalized per head over the candidates for eviction (bool [B, H_kv,
    N]: the tokens not protected; None: all, as the reference normalizes), then max over
    each GQA group."""
    B, H, N = raw.shape
    if H % n_kv_heads:
        raise ValueError(f"a scorer returned {H} heads for {n_kv_heads} KV heads")
    where = None
    if candidates is not None:  # each query head takes its KV head's candidates
        where = mx.repeat(candidates, H // n_kv_heads, axis=1)
    scores = zscore(raw.astype(mx.float32), where=where)
    return scores if raw.shape[1] == n_kv_heads else gqa_max(scores, n_kv_heads)


def select_tokens(scores, positions, offset, budget, window, sinks, segments=0, segment_share=0.0,
                  quota_scores=None):
    """Indices of the `budget` tokens each KV head keeps, in temporal order.

    scores, positions: [B, H_kv, N] -> [B, H_kv, budget] int32. The recent `window`
    tokens and the first `sinks` positions are always kept and count in the budget. With
    `segments`, each stretch of positions (segment_quotas) also keeps its best tokens up to
    its quota, ranked by `quota_scores` (None: by `scores`), before the rest are chosen by
    score.
    """
    protected = protected_tokens(positions, offset, window, sinks)
    ranked = mx.where(protected, mx.inf, scores)
    if segments:
        quota = int(segment_share * (budget - window - sinks) / segments)
        candidates = ~protected & (positions >= 0)  # padding (-1) is never a candidate
        chosen = segment_quotas(scores if quota_scores is None else quota_scores, positions, candidates,
                                offset - window - sinks, sinks, segments, quota)
        ranked = mx.where(chosen, QUOTA_RANK, ranked)
    keep = mx.argpartition(-ranked, kth=budget - 1, axis=-1)[..., :budget]
    return mx.sort(keep, axis=-1)  # the buffer stays in temporal order: trim relies on it


QUOTA_RANK = 1e30  # above any z-score, below the protected tokens' inf


def segment_quotas(scores, positions, candidates, span, sinks, segments, quota):
    """Coverage: the positions that may be evicted (`candidates`, bool [B, H_kv, N]: those
    in [sinks, sinks + span)) cut into `segments` equal stretches; in each, the `quota`
    best-scored tokens of every KV head (all of them where a stretch holds fewer). bool
    [B, H_kv, N], so that no stretch of a long prompt is dropped wholesale however the
    others score."""
    if quota < 1:
        return mx.zeros(scores.shape, mx.bool_)
    segment = mx.clip((positions - sinks) * segments // max(span, 1), 0, segments - 1)
    own = (segment[..., None, :] == mx.arange(segments)[:, None]) & candidates[..., None, :]  # [B, H_kv, S, N]
    masked = mx.where(own, scores[..., None, :], -mx.inf)
    k = min(quota, scores.shape[-1])
    # exactly k per stretch (ties, e.g. a pooled score's plateaus, broken either way), fewer
    # where a stretch holds fewer candidates
    best = mx.argpartition(-masked, kth=k - 1, axis=-1)[..., :k]  # [B, H_kv, S, k]
    real = mx.take_along_axis(masked, best, axis=-1) > -mx.inf
    B, H = scores.shape[:2]
    rows, heads = mx.arange(B)[:, None, None, None], mx.arange(H)[None, :, None, None]
    counts = mx.zeros(scores.shape, mx.int32).at[rows, heads, best].add(real.astype(mx.int32))
    return counts > 0


def gather_tokens(x, indices):
    # x: [B, H_kv, N, ...], indices: [B, H_kv, K] -> [B, H_kv, K, ...]
    if x.ndim == 3:
        return mx.take_along_axis(x, indices, axis=2)
    return mx.take_along_axis(x, indices[..., None], axis=2)
