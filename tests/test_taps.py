"""The query taps leave the decode path (taps.QuerySwitch): a decode step unplugs them, a
prompt plugs them back before its first rope, and nothing a prompt's window sees changes."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama

from triattn_mlx import calibrate, make_prompt_cache, remove_taps
from triattn_mlx.batch import BatchTriAttentionKVCache
from triattn_mlx.model_info import own_rope
from triattn_mlx.taps import LatestQueries, install_recent_queries, taps_of

OPTIONS = dict(budget=48, window=8, divide_length=8, observe=8, prompt_mode="whole", pruning_mode="per_head")


@pytest.fixture(scope="module")
def model_and_stats():
    model = tiny_llama(seed=5)
    yield model, calibrate(model, np.random.default_rng(1).integers(0, 128, 200).tolist())
    remove_taps(model)


def attentions(model):
    return [layer.self_attn for layer in model.layers]


def plugged(model):
    return [isinstance(a.rope, LatestQueries) for a in attentions(model)]


def read(model, cache, tokens, chunk=30):
    """A prompt as mlx-lm reads it: chunks, then the last token alone."""
    for start in range(0, len(tokens) - 1, chunk):
        model(mx.array(tokens[start : min(start + chunk, len(tokens) - 1)])[None], cache=cache)
    model(mx.array(tokens[-1:])[None], cache=cache)


def two_turns(model, cache, states):
    """A prompt, 12 decode steps, a second prompt, one decode step: each layer's window and
    kept positions after each prompt's round, and whether the taps were in after each step."""
    rng = np.random.default_rng(2)
    seen = []
    for turn in range(2):
        read(model, cache, rng.integers(0, 128, 90 if turn == 0 else 40).tolist())
        seen.append(plugged(model))
        for token in range(12 if turn == 0 else 1):
            model(mx.array([[token]]), cache=cache)
            seen.append(plugged(model))
        states.append([(np.array(c._window), np.array(c.token_positions())) for c in cache])
    return seen


def test_decode_unplugs_the_taps_and_the_next_prompt_sees_every_query(model_and_stats):
    model, stats = model_and_stats
    remove_taps(model)
    switched, states = make_prompt_cache(model, stats=stats, **OPTIONS), []
    seen = two_turns(model, switched, states)
    assert seen[0] == [True, True]  # reading the prompt: in
    assert all(s == [False, False] for s in seen[1:13])  # decoding: out
    assert seen[13] == [True, True] and seen[14] == [False, False]  # the second prompt: in, then out
    assert all(a.rope is own_rope(a) for a in attentions(model))
    remove_taps(model)
    always, reference = make_prompt_cache(model, stats=stats, **OPTIONS), []
    for c in always:
        c.switch = None  # taps that never leave: every query seen, as before the switch
    assert all(s == [True, True] for s in two_turns(model, always, reference))
    for (w, p), (w_ref, p_ref) in zip(states[1], reference[1]):  # the second prompt's window, and its round
        np.testing.assert_array_equal(w, w_ref)
        np.testing.assert_array_equal(p, p_ref)
    assert not np.array_equal(states[0][0][0], states[1][0][0])  # the window moved to the second prompt
    assert all(tap.calls % 2 == 0 for tap in taps_of(model, LatestQueries).values())  # queries stay even calls
    remove_taps(model)


def decoding(model, stats, seed):
    """A fresh cache set on the bare model after a prompt and one decode step: taps out."""
    remove_taps(model)
    cache = make_prompt_cache(model, stats=stats, **OPTIONS)
    read(model, cache, np.random.default_rng(seed).integers(0, 128, 60).tolist())
    model(mx.array([[1]]), cache=cache)
    assert plugged(model) == [False, False]
    return cache


def test_looking_for_or_installing_taps_plugs_them_back(model_and_stats):
    model, stats = model_and_stats
    cache = decoding(model, stats, seed=3)
    found = taps_of(model, LatestQueries)
    assert plugged(model) == [True, True] and [found[i] for i in (0, 1)] == [c.observer for c in cache]
    model(mx.array([[2]]), cache=cache)  # out again
    again = make_prompt_cache(model, stats=stats, **OPTIONS)  # reuses the same taps: the first set still sees
    assert [c.observer for c in again] == [c.observer for c in cache] and plugged(model) == [True, True]
    remove_taps(model)
    assert all(a.rope is own_rope(a) for a in attentions(model))


def test_a_batch_plugs_the_taps_and_chains_stay_whole(model_and_stats):
    model, stats = model_and_stats
    cache = decoding(model, stats, seed=4)
    batch = BatchTriAttentionKVCache.merge([cache[0]])
    batch.make_mask(1)  # a batch's rows may be reading prompts: the taps go back in
    assert plugged(model) == [True, True] and batch.switch is cache[0].switch
    remove_taps(model)
    install_recent_queries(model)  # another kind of tap under ours: the chain is left as it is
    cache = make_prompt_cache(model, stats=stats, **OPTIONS)
    read(model, cache, np.random.default_rng(5).integers(0, 128, 60).tolist())
    model(mx.array([[1]]), cache=cache)
    assert plugged(model) == [True, True]
    remove_taps(model)


def test_caches_that_observe_every_round_put_the_taps_back_for_their_decode_steps(model_and_stats):
    """SnapKV's caches read every query: on a model whose taps a TriAttention cache set took
    out of its decode path, their decode steps put them back (and the other set's next
    step takes them out again)."""
    model, stats = model_and_stats
    remove_taps(model)
    tri = make_prompt_cache(model, stats=stats, **OPTIONS)
    snap = make_prompt_cache(model, method="snapkv", budget=48, window=8, divide_length=8)
    rng = np.random.default_rng(6)
    read(model, tri, rng.integers(0, 128, 60).tolist())
    read(model, snap, rng.integers(0, 128, 60).tolist())
    for step in range(3):
        model(mx.array([[step]]), cache=tri)
        assert plugged(model) == [False, False]
        before = np.array(snap[0]._window)
        model(mx.array([[step]]), cache=snap)
        assert plugged(model) == [True, True]
        after = np.array(snap[0]._window)  # the step's query came in at the end, the oldest left
        np.testing.assert_array_equal(after[:, :, :-1], before[:, :, 1:])
        assert not np.array_equal(after[:, :, -1], before[:, :, -1])
    assert snap[0].switch is None
    remove_taps(model)
