"""Selection, the one place every method's scores go through: normalization, GQA
reduction, protected tokens and top-k, against plain numpy."""

import mlx.core as mx
import numpy as np
import pytest

from triattn_mlx.selection import gqa_max, head_scores, protected_tokens, select_tokens, zscore


def numpy_select(scores, positions, offset, budget, window, sinks, segments=0, share=0.0, quota_scores=None):
    """Per KV head: the protected tokens, then (coverage) each stretch's quota of its
    best tokens by quota_scores (None: by scores), then the best-scoring others (ties:
    lowest index)."""
    out = []
    quota = int(share * (budget - window - sinks) / segments) if segments else 0
    span = max(offset - window - sinks, 1)
    quota_scores = scores if quota_scores is None else quota_scores
    for s, q, p in zip(scores, quota_scores, positions):
        protected = (p >= offset - window) | (p < sinks)
        order = [i for i in np.lexsort((np.arange(len(s)), -s)) if not protected[i]]
        by_quota = [i for i in np.lexsort((np.arange(len(q)), -q)) if not protected[i]]
        chosen = list(np.flatnonzero(protected))
        for segment in range(segments if quota else 0):
            inside = [i for i in by_quota if min((p[i] - sinks) * segments // span, segments - 1) == segment]
            chosen += inside[:quota]
        chosen += [i for i in order if i not in chosen][: budget - len(chosen)]
        out.append(sorted(chosen))
    return np.array(out)


def test_zscore_and_gqa_max_match_numpy():
    x = np.random.default_rng(0).normal(size=(2, 6, 10)).astype(np.float32)
    z = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.array(zscore(mx.array(x))), z, atol=1e-5)
    np.testing.assert_allclose(np.array(gqa_max(mx.array(z), 2)), z.reshape(2, 2, 3, 10).max(2), atol=1e-6)


def test_head_scores_normalize_each_query_head_before_the_group_max():
    # Head 1 of the group has tiny raw scores: without per-head normalization head 0 would
    # decide alone; normalized, head 1's favourite (token 3) survives the max.
    raw = np.array([[[10.0, 11.0, 12.0, 13.0, 40.0], [0.001, 0.002, 0.003, 0.05, 0.004]]], np.float32)
    got = np.array(head_scores(mx.array(raw), 1))[0, 0]
    z = (raw - raw.mean(-1, keepdims=True)) / (raw.std(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, z[0].max(0), atol=1e-5)
    assert got[3] > got[2]
    # per-KV-head scores (the baselines' StreamingLLM, key norm) are only normalized
    np.testing.assert_allclose(np.array(head_scores(mx.array(raw), 2))[0], z[0], atol=1e-5)
    with pytest.raises(ValueError, match="returned 2 heads for 3 KV heads"):
        head_scores(mx.array(raw), 3)


@pytest.mark.parametrize("seed", range(5))
def test_select_tokens_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    H, N, offset, budget, window, sinks = 3, 60, 200, 24, 8, 2
    positions = np.stack([np.sort(rng.choice(offset, N, replace=False)) for _ in range(H)])
    positions[:, :2] = [0, 1]  # the sinks are held
    positions[:, -window:] = np.arange(offset - window, offset)
    positions.sort(axis=-1)
    scores = rng.normal(size=(H, N)).astype(np.float32)
    got = np.array(select_tokens(mx.array(scores[None]), mx.array(positions[None]), offset, budget, window, sinks))
    np.testing.assert_array_equal(got[0], numpy_select(scores, positions, offset, budget, window, sinks))


def test_protected_tokens_are_kept_whatever_their_score():
    positions = mx.array(np.arange(20)[None, None])
    scores = mx.array(np.r_[-100.0, -100.0, np.arange(12.0), -100.0 * np.ones(6)][None, None])
    keep = np.array(select_tokens(scores, positions, 20, 10, 6, 2))[0, 0]
    # sinks 0, 1 and the window 14..19 (all scored -100), then the two best of the rest
    assert keep.tolist() == [0, 1, 12, 13, 14, 15, 16, 17, 18, 19]
    assert np.array(protected_tokens(positions, 20, 6, 2))[0, 0].sum() == 8


def test_ties_keep_exactly_the_budget_in_temporal_order():
    positions = mx.array(np.arange(50)[None, None])
    keep = np.array(select_tokens(mx.zeros((1, 1, 50)), positions, 50, 20, 4, 0))[0, 0]
    assert len(set(keep.tolist())) == 20 and (np.diff(keep) > 0).all()
    assert set(range(46, 50)) <= set(keep.tolist())


def test_zscore_over_the_candidates_only():
    """Protected tokens (kept whatever they score) do not enter the statistics: the
    candidates are normalized among themselves, as if the protected were not there."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 2, 30)).astype(np.float32)
    x[..., -6:] += 50  # a protected window scoring far above the rest
    candidates = np.ones((1, 2, 30), bool)
    candidates[..., -6:] = False
    got = np.array(zscore(mx.array(x), where=mx.array(candidates)))
    c = x[..., :-6]
    np.testing.assert_allclose(got[..., :-6], (c - c.mean(-1, keepdims=True)) / (c.std(-1, keepdims=True) + 1e-6),
                               atol=1e-5)
    # through head_scores: each query head of a GQA group takes its KV head's candidates
    raw = np.repeat(x, 2, axis=1)  # 4 query heads, 2 KV heads
    scored = np.array(head_scores(mx.array(raw), 2, mx.array(candidates)))
    np.testing.assert_allclose(scored[..., :-6], got[..., :-6], atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_segment_quotas_match_numpy(seed):
    """Coverage: each stretch of the evictable positions keeps its quota of its best tokens
    (a stretch scored low everywhere still keeps some), the rest go by score."""
    rng = np.random.default_rng(seed)
    H, N, offset, budget, window, sinks, segments = 3, 80, 300, 40, 8, 2, 4
    positions = np.stack([np.sort(rng.choice(np.arange(2, offset - window), N - window - 2, replace=False))
                          for _ in range(H)])
    positions = np.concatenate([np.tile([0, 1], (H, 1)), positions, np.tile(np.arange(offset - window, offset),
                                                                             (H, 1))], axis=1)
    scores = rng.normal(size=(H, N)).astype(np.float32)
    scores[:, positions[0] < 100] -= 5  # the first stretches score low: without quotas they would lose all
    args = (offset, budget, window, sinks, segments, 0.5)
    got = np.array(select_tokens(mx.array(scores[None]), mx.array(positions[None]), *args))[0]
    want = numpy_select(scores, positions, *args)
    np.testing.assert_array_equal(got, want)
    plain = numpy_select(scores, positions, *args[:4])
    quota = int(0.5 * (budget - window - sinks) / segments)

    def per_stretch(kept):
        kept = kept[(kept >= sinks) & (kept < offset - window)]
        return np.bincount((kept - sinks) * segments // (offset - window - sinks), minlength=segments)

    for h in range(H):
        assert (per_stretch(positions[h, got[h]]) >= quota).all()
        assert per_stretch(positions[h, plain[h]])[0] < quota  # what the quota changed


@pytest.mark.parametrize("seed", range(3))
def test_segment_quotas_ranked_by_their_own_scores_match_numpy(seed):
    """segment_fill "distinct": the stretches' quotas go by quota_scores, the rest by scores."""
    rng = np.random.default_rng(seed + 10)
    H, N, offset, budget, window, sinks, segments = 2, 70, 70, 34, 6, 0, 4
    positions = np.tile(np.arange(N), (H, 1))
    scores, quota_scores = rng.normal(size=(2, H, N)).astype(np.float32)
    args = (offset, budget, window, sinks, segments, 0.5)
    got = np.array(select_tokens(mx.array(scores[None]), mx.array(positions[None]), *args,
                                 quota_scores=mx.array(quota_scores[None])))[0]
    np.testing.assert_array_equal(got, numpy_select(scores, positions, *args, quota_scores=quota_scores))
    assert not np.array_equal(got, numpy_select(scores, positions, *args))  # the quotas' ranking mattered


def test_coverage_quotas_hold_when_scores_tie():
    """A pooled score has plateaus: each stretch still gets exactly its quota, so the quotas
    fit the budget they were sized for."""
    from triattn_mlx.selection import segment_quotas

    N, segments, quota = 64, 4, 3
    scores = mx.array(np.repeat(np.arange(N // 8, dtype=np.float32), 8)[None, None])  # runs of 8 equal scores
    positions = mx.arange(N)[None, None]
    chosen = np.array(segment_quotas(scores, positions, mx.ones((1, 1, N), mx.bool_), N, 0, segments, quota))[0, 0]
    assert np.bincount(np.flatnonzero(chosen) * segments // N, minlength=segments).tolist() == [quota] * segments
