"""Baseline scorers (H2O, SnapKV, R-KV, StreamingLLM, key norm) against numpy definitions,
and plugged into the cache on a model."""

import mlx.core as mx
import numpy as np
import pytest

from triattn_mlx import make_prompt_cache
from triattn_mlx.baselines import (RecentQueries, attention_probs, attention_scorer_factory, H2OScorer,
                                   key_norm_scores, remove_recent_queries, RKVScorer, SnapKVScorer)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_probs(q, k, q_pos, k_pos):
    """[H, M, D] queries, [H_kv, N, D] keys -> [H, M, N] causal attention over the given keys."""
    H, n_kv = q.shape[0], k.shape[0]
    out = np.zeros((H, q.shape[1], k.shape[1]))
    for h in range(H):
        kv = h // (H // n_kv)
        logits = q[h] @ k[kv].T / np.sqrt(q.shape[-1])
        logits[k_pos[kv][None, :] > q_pos[:, None]] = -np.inf
        out[h] = softmax(logits)
    return out


def case(seed=0, H=4, n_kv=2, M=40, N=90, D=16):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, H, M, D)).astype(np.float32)
    k = rng.normal(size=(1, n_kv, N, D)).astype(np.float32)
    # keys held: an evicted-looking subset of positions 0..offset-1, ascending per head
    offset = 130
    k_pos = np.stack([np.sort(rng.choice(offset - M, N - M, replace=False)) for _ in range(n_kv)])
    k_pos = np.concatenate([k_pos, np.tile(np.arange(offset - M, offset), (n_kv, 1))], axis=1)[None]
    return q, k, k_pos.astype(np.int32), offset


class FakeRecorder(RecentQueries):
    def __init__(self, queries):
        super().__init__(None)
        self.pending = [mx.array(queries)]


def test_attention_probs_match_numpy():
    q, k, k_pos, offset = case()
    q_pos = np.arange(offset - q.shape[2], offset)
    got = np.array(attention_probs(mx.array(q), mx.array(k), mx.array(q_pos), mx.array(k_pos)))
    np.testing.assert_allclose(got[0], numpy_probs(q[0], k[0], q_pos, k_pos[0]), atol=1e-5)


def test_snapkv_and_rkv_match_numpy():
    q, k, k_pos, offset = case(1)
    window, kernel = 8, 7
    probs = numpy_probs(q[0][:, -window:], k[0], np.arange(offset - window, offset), k_pos[0])
    importance = probs.mean(1).reshape(2, 2, -1).max(1)  # mean over the window, max over the GQA group
    padded = np.pad(importance, [(0, 0), (3, 3)], constant_values=-np.inf)
    pooled = np.stack([padded[:, i : i + importance.shape[-1]] for i in range(kernel)]).max(0)
    got = SnapKVScorer(FakeRecorder(q), 2, window=window, kernel=kernel)(mx.array(k), mx.array(k_pos), offset)
    np.testing.assert_allclose(np.array(got)[0], pooled, atol=1e-6)

    kn = k[0] / np.linalg.norm(k[0], axis=-1, keepdims=True)
    sim = kn @ kn.transpose(0, 2, 1)
    N = sim.shape[-1]
    for h in range(2):
        np.fill_diagonal(sim[h], 0)
        for i in range(N):
            similar = np.nonzero(sim[h, i] > 0.5)[0]
            sim[h, i, similar.max() if len(similar) else 0] = 0
    redundancy = softmax(sim.mean(1))
    got = RKVScorer(FakeRecorder(q), 2, window=window, kernel=kernel, mix=0.1)(mx.array(k), mx.array(k_pos), offset)
    np.testing.assert_allclose(np.array(got)[0], 0.1 * pooled - 0.9 * redundancy, atol=1e-6)


def test_h2o_accumulates_attention_by_position():
    q, k, k_pos, offset = case(2)
    scorer = H2OScorer(FakeRecorder(q), 2)
    first = np.array(scorer(mx.array(k), mx.array(k_pos), offset))[0]
    probs = numpy_probs(q[0], k[0], np.arange(offset - q.shape[2], offset), k_pos[0])
    expected = probs.sum(1).reshape(2, 2, -1).sum(1)
    np.testing.assert_allclose(first, expected, atol=1e-4)
    # every query's attention sums to 1: the total is queries x heads per KV head
    np.testing.assert_allclose(first.sum(-1), q.shape[2] * 2, rtol=1e-5)
    # a later round adds the new queries' attention to what each position had
    scorer.recorder.pending = [mx.array(q[:, :, -5:])]
    second = np.array(scorer(mx.array(k), mx.array(k_pos), offset))[0]
    probs2 = numpy_probs(q[0][:, -5:], k[0], np.arange(offset - 5, offset), k_pos[0])
    np.testing.assert_allclose(second, expected + probs2.sum(1).reshape(2, 2, -1).sum(1), atol=1e-4)


def test_key_norm_scores():
    k = mx.array(np.random.default_rng(3).normal(size=(1, 2, 10, 8)).astype(np.float32))
    np.testing.assert_allclose(np.array(key_norm_scores(k, None, 10)), np.linalg.norm(np.array(k), axis=-1),
                               rtol=1e-6)


@pytest.mark.parametrize("kind", ["h2o", "snapkv", "rkv"])
def test_attention_scorers_drive_the_cache(tiny_model, kind):
    factory = attention_scorer_factory(tiny_model, kind)
    try:
        cache = make_prompt_cache(tiny_model, 64, window=16, divide_length=16, scorer_factory=factory)
        tokens = mx.array(np.random.default_rng(4).integers(0, 128, 400))
        for start in range(0, 400, 25):
            mx.eval(tiny_model(tokens[None, start : start + 25], cache=cache))
            assert all(c.size() < 64 + 16 for c in cache)
        assert cache[0].prune_rounds > 10
    finally:
        remove_recent_queries(tiny_model)
    assert not isinstance(tiny_model.model.layers[0].self_attn.rope, RecentQueries)


def test_random_eviction_is_seeded_by_the_offset():
    from triattn_mlx.baselines import random_scores

    positions = mx.zeros((1, 2, 50), mx.int32)
    a, b, c = (np.array(random_scores(None, positions, offset)) for offset in (300, 300, 301))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
