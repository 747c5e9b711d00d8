"""Baseline scorers (H2O, SnapKV, R-KV, StreamingLLM, key norm) against numpy definitions,
and run as methods of the cache on a model. Scorers return raw scores per query head;
selection (tests/test_selection.py) normalizes and reduces them."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm.models.cache import save_prompt_cache

from triattn_mlx import baselines, calibrate, load_prompt_cache, make_prompt_cache, remove_taps
from triattn_mlx.baselines import H2OScorer, RKVScorer, SnapKVScorer, attention_probs, key_norm_scores
from triattn_mlx.taps import RecentQueries, RopeTap, install


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


def numpy_redundancy(k, threshold=0.5):
    """R-KV's redundancy, as its paper defines it: keys [H_kv, N, D] -> [H_kv, N]."""
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
    sim = kn @ kn.transpose(0, 2, 1)
    for h in range(len(k)):
        np.fill_diagonal(sim[h], 0)
        for i in range(sim.shape[-1]):
            similar = np.nonzero(sim[h, i] > threshold)[0]
            sim[h, i, similar.max() if len(similar) else 0] = 0  # the newest similar key is not counted
    return softmax(sim.mean(1))


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
    """The queries at positions [offset - M, offset), as the rope tap records them."""

    def __init__(self, queries, offset):
        super().__init__(None)
        self.pending = [(offset - queries.shape[2], mx.array(queries))]


def test_attention_probs_match_numpy():
    q, k, k_pos, offset = case()
    q_pos = np.arange(offset - q.shape[2], offset)
    got = np.array(attention_probs(mx.array(q), mx.array(k), mx.array(q_pos), mx.array(k_pos)))
    np.testing.assert_allclose(got[0], numpy_probs(q[0], k[0], q_pos, k_pos[0]), atol=1e-5)


def test_snapkv_and_rkv_match_numpy():
    q, k, k_pos, offset = case(1)
    window, kernel = 8, 7
    probs = numpy_probs(q[0][:, -window:], k[0], np.arange(offset - window, offset), k_pos[0])
    importance = probs.mean(1)  # mean over the window, per query head
    padded = np.pad(importance, [(0, 0), (3, 3)], constant_values=-np.inf)
    pooled = np.stack([padded[:, i : i + importance.shape[-1]] for i in range(kernel)]).max(0)
    newest = mx.array(q[:, :, -window:])  # the cache's window: the newest queries, at [offset - window, offset)
    got = SnapKVScorer(observe=window, kernel=kernel)(mx.array(k), mx.array(k_pos), offset, queries=newest)
    np.testing.assert_allclose(np.array(got)[0], pooled, atol=1e-6)

    redundancy = np.repeat(numpy_redundancy(k[0]), 2, axis=0)  # per KV head, for each query head of its group
    got = RKVScorer(observe=window, kernel=kernel, mix=0.1)(mx.array(k), mx.array(k_pos), offset, queries=newest)
    np.testing.assert_allclose(np.array(got)[0], 0.1 * pooled - 0.9 * redundancy, atol=1e-6)


@pytest.mark.parametrize("block", [2**24, 90 * 2 * 7, 1])  # one block; 7 rows a block (the last short); 1 row
def test_redundancy_in_blocks_matches_numpy(monkeypatch, block):
    """The similarities are taken a block of rows at a time (a long prompt's round must not
    hold N x N of them): the result is R-KV's redundancy whatever the block."""
    _, k, _, _ = case(3)
    k[0, 1, 40:60] = k[0, 1, 20] + 0.01 * k[0, 1, 40:60]  # a run of near-copies: the newest-similar rule acts
    monkeypatch.setattr(baselines, "REDUNDANCY_BLOCK", block)
    got = np.array(baselines.redundancy(mx.array(k), 0.5))[0]
    np.testing.assert_allclose(got, numpy_redundancy(k[0]), rtol=1e-5, atol=1e-7)


def test_h2o_accumulates_attention_by_position():
    q, k, k_pos, offset = case(2)
    scorer = H2OScorer(FakeRecorder(q, offset), 4)
    first = np.array(scorer(mx.array(k), mx.array(k_pos), offset))[0]
    probs = numpy_probs(q[0], k[0], np.arange(offset - q.shape[2], offset), k_pos[0])
    expected = probs.sum(1)  # [H, N]: attention each held token received, per query head
    np.testing.assert_allclose(first, expected, atol=1e-4)
    # every query's attention sums to 1: the total is the number of queries
    np.testing.assert_allclose(first.sum(-1), q.shape[2], rtol=1e-5)
    # a later round adds the new queries' attention to what each position had
    scorer.recorder.pending = [(offset - 5, mx.array(q[:, :, -5:]))]
    second = np.array(scorer(mx.array(k), mx.array(k_pos), offset))[0]
    probs2 = numpy_probs(q[0][:, -5:], k[0], np.arange(offset - 5, offset), k_pos[0])
    np.testing.assert_allclose(second, expected + probs2.sum(1), atol=1e-4)
    # queries of another sequence (positions that do not end at this offset) are not counted
    scorer.recorder.pending = [(3, mx.array(q[:, :, -5:]))]
    np.testing.assert_allclose(np.array(scorer(mx.array(k), mx.array(k_pos), offset))[0], second, atol=1e-6)


def test_key_norm_scores():
    k = mx.array(np.random.default_rng(3).normal(size=(1, 2, 10, 8)).astype(np.float32))
    np.testing.assert_allclose(np.array(key_norm_scores(k, None, 10)), np.linalg.norm(np.array(k), axis=-1),
                               rtol=1e-6)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "rkv", "streamingllm", "key_norm", "random"])
@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head"])
def test_every_baseline_drives_the_cache_in_both_pruning_modes(tiny_model, method, mode):
    try:
        cache = make_prompt_cache(tiny_model, 64, method=method, pruning_mode=mode, window=16, divide_length=16,
                                  prompt_mode="chunked")
        tokens = mx.array(np.random.default_rng(4).integers(0, 128, 400))
        for start in range(0, 400, 25):
            mx.eval(tiny_model(tokens[None, start : start + 25], cache=cache))
            assert all(c.size() < 64 + 16 for c in cache)
        assert cache[0].prune_rounds > 10
        kept = [np.array(c.token_positions()) for c in cache]
        if mode == "per_head":  # one token set per KV head, shared by the layers
            np.testing.assert_array_equal(kept[0], kept[1])
        if method == "streamingllm":  # sinks (0) + the most recent budget tokens
            np.testing.assert_array_equal(kept[0][0, 0], np.arange(400 - 64, 400))
    finally:
        remove_taps(tiny_model)
    assert not isinstance(tiny_model.model.layers[0].self_attn.rope, RecentQueries)


def test_random_eviction_is_seeded_by_the_offset():
    from triattn_mlx.baselines import random_scores

    positions = mx.zeros((1, 2, 50), mx.int32)
    a, b, c = (np.array(random_scores(None, positions, offset)) for offset in (300, 300, 301))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7, 11, 13])
@pytest.mark.parametrize("op", ["max", "mean"])
def test_pool1d_matches_a_numpy_sliding_window(kernel, op):
    from triattn_mlx.baselines import pool1d

    x = np.random.default_rng(kernel).normal(size=(2, 3, 40)).astype(np.float32)
    pad = kernel // 2
    padded = np.pad(x, [(0, 0), (0, 0), (pad, pad)], constant_values=-np.inf if op == "max" else 0.0)
    windows = np.stack([padded[..., i : i + 40] for i in range(kernel)])
    expected = windows.max(0) if op == "max" else windows.mean(0)
    np.testing.assert_allclose(np.array(pool1d(mx.array(x), kernel, op)), expected, rtol=1e-5, atol=1e-6)


class EveryQuery(RopeTap):
    """A reference tap: every rotated query of the run, in order."""

    def __init__(self, rope):
        super().__init__(rope)
        self.seen = []

    def on_queries(self, pre_rope, rotated, offset):
        self.seen.append(rotated)


@pytest.mark.parametrize("method, observe", [("snapkv", 32), ("rkv", 8), ("triattention", 32)])
def test_snapkv_and_rkv_score_every_round_with_the_newest_queries(tiny_model, method, observe):
    """Their caches keep the newest queries (prompt and generated) and pass them to every
    round, reading a prompt and decoding: the same queries a tap recording all of them saw.
    So do TriAttention's with observe_rounds "all"."""
    remove_taps(tiny_model)
    options = {}
    if method == "triattention":
        options = dict(observe_rounds="all", stats=calibrate(tiny_model, list(range(128))))
    cache = make_prompt_cache(tiny_model, 64, method=method, window=16, divide_length=16, prompt_mode="chunked",
                              **options)
    reference = install(tiny_model, EveryQuery, lambda attn, rope: EveryQuery(rope))[0]
    scorer, calls = cache[0].scorer, []

    def spy(keys, positions, offset, queries=None):
        calls.append((offset, queries))
        return scorer(keys, positions, offset, queries)

    spy.observes, spy.observe = scorer.observes, cache[0].observe
    cache[0].scorer = spy
    try:
        tokens = np.random.default_rng(5).integers(0, 128, 150).tolist()
        for start in range(0, 150, 25):
            mx.eval(tiny_model(mx.array(tokens[start : start + 25])[None], cache=cache))
        reading = len(calls)
        token = tokens[-1]
        for _ in range(60):
            token = int(tiny_model(mx.array([[token]]), cache=cache)[0, -1].argmax())
        assert reading >= 3 and len(calls) >= reading + 3  # rounds while reading and while decoding
        everything = mx.concatenate(reference.seen, axis=2)
        for offset, queries in calls:
            assert queries.shape[2] == observe
            np.testing.assert_array_equal(np.array(queries), np.array(everything[:, :, offset - observe : offset]))
    finally:
        remove_taps(tiny_model)


@pytest.mark.parametrize("method", ["snapkv", "rkv"])
def test_snapkv_and_rkv_caches_save_and_continue_identically(tmp_path, tiny_model, method):
    remove_taps(tiny_model)
    options = dict(method=method, window=16, divide_length=16, prompt_mode="chunked")
    cache = make_prompt_cache(tiny_model, 64, **options)
    tokens = np.random.default_rng(6).integers(0, 128, 150).tolist()
    mx.eval(tiny_model(mx.array(tokens)[None], cache=cache))
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"), model=tiny_model)

    def greedy(c):
        out, token = [], tokens[-1]
        for _ in range(40):  # two rounds, each scored with the window the file carried on
            logits = tiny_model(mx.array([[token]]), cache=c)
            token = int(logits[0, -1].argmax())
            out.append(np.array(logits[0, -1]))
        return out

    for a, b in zip(greedy(cache), greedy(loaded)):
        np.testing.assert_array_equal(a, b)
    assert loaded[0].prune_rounds == cache[0].prune_rounds >= 3
    assert vars(loaded[0].scorer) == vars(cache[0].scorer)  # its options came back as they were
    remove_taps(tiny_model)
