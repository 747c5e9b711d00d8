"""TriAttentionKVCache on small random-weight models: bounds, positions, masks, trim,
save/load, and errors at construction."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama
from mlx_lm.models.cache import KVCache, RotatingKVCache, save_prompt_cache

from triattn_mlx import Settings, StatsError, TriAttentionKVCache, calibrate, load_prompt_cache, make_prompt_cache
from triattn_mlx.baselines import recency_scores

OPTIONS = dict(budget=64, window=16, divide_length=16, sinks=2, prompt_mode="chunked")  # compressed as read


@pytest.fixture
def tiny_stats(tiny_model):
    return calibrate(tiny_model, np.random.default_rng(1).integers(0, 128, 300))


def feed(model, cache, tokens, chunk):
    for start in range(0, len(tokens), chunk):
        logits = model(mx.array(tokens[start : start + chunk])[None], cache=cache)
        mx.eval(logits, [(c.keys, c.values) for c in cache])
        yield logits


@pytest.mark.parametrize("mode", ["per_layer_per_head", "per_head"])
def test_cache_stays_bounded_and_positions_stay_absolute(tiny_model, tiny_stats, mode):
    budget, divide_length = 256, 128
    cache = make_prompt_cache(tiny_model, budget, stats=tiny_stats, pruning_mode=mode, prompt_mode="chunked")
    tokens = np.random.default_rng(2).integers(0, 128, 3100).tolist()
    chunks = [1, 7, 64, 128, 3, 100]
    pos, step = 0, 0
    while pos < len(tokens):
        n = chunks[step % len(chunks)]
        list(feed(tiny_model, cache, tokens[pos : pos + n], n))
        pos, step = min(pos + n, len(tokens)), step + 1
        for c in cache:
            assert c.size() < budget + divide_length
            assert c.offset == pos  # the absolute position, not the number of cached tokens
    for c in cache:
        held = np.array(c.token_positions())
        assert c.prune_rounds > 10
        assert held.max() == len(tokens) - 1 and held.max() > c.size()
        assert (np.diff(held, axis=-1) > 0).all()  # unique, in temporal order
        assert set(range(len(tokens) - c.settings.window, len(tokens))) <= set(held[0, 0].tolist())
        assert {0, 1} <= set(held[0, 0].tolist()) or c.settings.sinks == 0


def test_large_chunks_are_compressed_as_they_are_read(tiny_model, tiny_stats):
    cache = make_prompt_cache(tiny_model, 128, stats=tiny_stats, window=32, prompt_mode="chunked")
    tokens = np.random.default_rng(3).integers(0, 128, 2048).tolist()
    for _ in feed(tiny_model, cache, tokens, 512):
        assert all(c.size() == 128 for c in cache)  # back to budget after every chunk


class MaskedFullCache(KVCache):
    """A full cache whose mask hides exactly the tokens the compressed cache evicted."""

    visible = None  # bool [B, H, 1, L] for the next step

    def make_mask(self, N, return_array=False, window_size=None):
        if self.visible is None:
            return super().make_mask(N, return_array=return_array, window_size=window_size)
        return self.visible


@pytest.mark.parametrize("mode, scorer", [("per_head", None), ("per_layer_per_head", recency_scores)])
def test_eviction_equals_full_attention_with_evicted_tokens_masked(mode, scorer):
    """Decoding with the compressed cache must give the logits of full attention over
    the kept tokens at their true positions. If RoPE saw the physical cache length
    instead of the absolute offset, this would fail after the first prune."""
    model = tiny_llama(seed=4)
    stats = calibrate(model, np.random.default_rng(5).integers(0, 128, 200))
    factory = (lambda i, info: scorer) if scorer else None
    compressed = make_prompt_cache(model, stats=stats, pruning_mode=mode, scorer_factory=factory, **OPTIONS)
    full = [MaskedFullCache() for _ in model.layers]
    tokens = np.random.default_rng(6).integers(0, 128, 200).tolist()
    prompt, rest = tokens[:90], tokens[90:]
    a = model(mx.array(prompt)[None], cache=compressed)
    b = model(mx.array(prompt)[None], cache=full)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    n_heads = model.layers[0].self_attn.n_heads
    for token in rest:
        c = compressed[0]
        held = np.array(c.token_positions())  # [1, H_kv, L]
        visible = np.zeros((1, held.shape[1], c.offset + 1), dtype=bool)
        for h in range(held.shape[1]):
            visible[0, h, held[0, h]] = True
        visible[..., -1] = True
        visible = np.repeat(visible, n_heads // held.shape[1], axis=1)[:, :, None, :]
        for f in full:
            f.visible = mx.array(visible)
        a = model(mx.array([[token]]), cache=compressed)
        b = model(mx.array([[token]]), cache=full)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    assert compressed[0].prune_rounds >= 5


@pytest.mark.parametrize("mode", ["per_layer_per_head", "per_head"])
def test_trim_before_and_after_eviction(tiny_model, tiny_stats, mode):
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    cache = make_prompt_cache(tiny_model, stats=tiny_stats, pruning_mode=mode, **OPTIONS)
    list(feed(tiny_model, cache, list(range(40)), 40))
    assert can_trim_prompt_cache(cache)
    assert trim_prompt_cache(cache, 10) == 10 and cache[0].offset == 30 and cache[0].size() == 30
    list(feed(tiny_model, cache, list(range(70)), 70))  # prunes to the budget
    c = cache[0]
    assert c.offset == 100 and c.size() == 64
    # Evicted history: mlx-lm's helpers must not count on trimming (as with its
    # RotatingKVCache once it wraps); the cache itself trims what it still holds.
    assert not can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 5) == 0 and c.offset == 100
    assert [layer.trim(c.settings.window + 1) for layer in cache] == [0, 0] and c.offset == 100
    assert [layer.trim(5) for layer in cache] == [5, 5] and c.offset == 95 and c.size() == 59
    assert np.array(c.token_positions()).max() == 94
    list(feed(tiny_model, cache, list(range(30)), 10))  # keeps working after a trim
    assert cache[-1].offset == 125


@pytest.mark.parametrize("mode", ["per_layer_per_head", "per_head"])
def test_save_load_continues_identically(tmp_path, tiny_model, tiny_stats, mode):
    cache = make_prompt_cache(tiny_model, stats=tiny_stats, pruning_mode=mode, **OPTIONS)
    tokens = np.random.default_rng(7).integers(0, 128, 150).tolist()
    list(feed(tiny_model, cache, tokens, 50))
    assert cache[0].prune_rounds > 0
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"), model=tiny_model)
    assert [type(c) for c in loaded] == [TriAttentionKVCache] * len(cache)

    def greedy(c, steps=60):
        out, token = [], tokens[-1]
        for _ in range(steps):
            logits = tiny_model(mx.array([[token]]), cache=c)
            token = int(logits[0, -1].argmax())
            out.append((token, np.array(logits[0, -1])))
        return out

    for (t1, l1), (t2, l2) in zip(greedy(cache), greedy(loaded)):
        assert t1 == t2
        np.testing.assert_array_equal(l1, l2)
    assert loaded[0].prune_rounds == cache[0].prune_rounds > 2
    if mode == "per_head":
        assert loaded[0].group is loaded[-1].group and loaded[0].group is not cache[0].group


def test_sliding_window_layers_keep_their_own_cache(tiny_stats):
    model = tiny_llama(layer_types=["sliding_attention", "full_attention"], sliding_window=32)
    stats = calibrate(model, list(range(100)))
    cache = make_prompt_cache(model, stats=stats, **OPTIONS)
    assert isinstance(cache[0], RotatingKVCache) and isinstance(cache[1], TriAttentionKVCache)
    list(feed(model, cache, list(range(120)) * 2, 30))
    assert cache[1].size() < 80 and cache[0].offset == 240

    class AllSliding(type(model)):
        def make_cache(self):
            return [RotatingKVCache(max_size=32) for _ in self.layers]

    model.__class__ = AllSliding
    with pytest.raises(ValueError, match="no full-attention layer"):
        make_prompt_cache(model, stats=stats, **OPTIONS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(budget=128, window=128), "must be larger than window"),
    (dict(budget=0), "budget must be an integer >= 1"),
    (dict(budget=256, divide_length=0), "divide_length must be an integer >= 1"),
    (dict(budget=256, window=-1), "window must be an integer >= 0"),
    (dict(budget=256.5), "budget must be an integer"),
    (dict(budget=256, pruning_mode="per_token"), "pruning_mode must be one of"),
])
def test_bad_sizes_fail_at_construction(tiny_model, tiny_stats, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_prompt_cache(tiny_model, stats=tiny_stats, **kwargs)


@pytest.mark.parametrize("budget, mode, shared", [
    (128, "auto", False), (129, "auto", True), (64, "per_head", True), (1024, "per_layer_per_head", False)])
def test_pruning_mode_auto_selects_per_layer_at_small_budgets(tmp_path, tiny_model, tiny_stats, budget, mode,
                                                              shared):
    """auto (the default) selects layer by layer up to budget 128 and shares one token set
    per KV head across layers above; an explicit mode holds at any budget, and reloads."""
    assert Settings().pruning_mode == "auto"
    cache = make_prompt_cache(tiny_model, budget, stats=tiny_stats, window=16, pruning_mode=mode)
    tiny_model(mx.array(np.arange(40) % 128)[None], cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"), model=tiny_model)
    for caches in (cache, loaded):
        assert all((c.group is not None) == shared for c in caches)
        assert {(c.settings.pruning_mode, c.settings.selection) for c in caches} == {
            (mode, "per_head" if shared else "per_layer_per_head")}
        if shared:
            assert caches[0].group is caches[-1].group


def test_stats_for_another_model_are_rejected(tiny_stats):
    other = tiny_llama(num_key_value_heads=4)
    with pytest.raises(StatsError, match="num_kv_heads is 2 in the stats file but 4 in the model"):
        make_prompt_cache(other, 256, stats=tiny_stats)


def test_missing_stats_and_unservable_models_fail_clearly(tiny_model):
    with pytest.raises(ValueError, match="needs calibration stats"):
        make_prompt_cache(tiny_model, 256)
    with pytest.raises(ValueError, match="has no .layers"):
        make_prompt_cache(object(), 256, scorer_factory=lambda i, info: recency_scores)
    with pytest.raises(ValueError, match="scorer must be callable"):
        TriAttentionKVCache(settings=Settings(budget=256), scorer=None)
    with pytest.raises(TypeError, match="settings must be a triattn_mlx.Settings"):
        TriAttentionKVCache(settings=dict(budget=256), scorer=recency_scores)


def test_self_calibration_uses_the_queries_the_model_runs(tiny_stats):
    from triattn_mlx import remove_query_recorders
    from triattn_mlx.taps import QueryRecorder, taps_of

    model = tiny_llama(seed=9)
    tokens = np.random.default_rng(8).integers(0, 128, 300).tolist()
    cache = make_prompt_cache(model, stats="self", **OPTIONS)
    list(feed(model, cache, tokens, 100))
    assert cache[0].prune_rounds > 0
    # The last prune (after token 300) scored with the centers of every query seen. Layer 0's
    # queries do not depend on attention, so they equal an uncompressed calibration's;
    # deeper layers' queries see the compressed cache, as they should.
    recorders = taps_of(model, QueryRecorder)
    assert set(recorders) == {0, 1}
    scorers = [c.scorer.scorer for c in cache]  # the self-calibrated scorer under the prompt's observation
    np.testing.assert_allclose(scorers[1].q_center, recorders[1].centers()[0])
    remove_query_recorders(model)
    assert not taps_of(model, QueryRecorder)
    reference = calibrate(model, tokens)
    np.testing.assert_allclose(scorers[0].q_center, reference.q_mean[0], atol=1e-5)
    np.testing.assert_allclose(scorers[0].q_abs_mean, reference.q_abs_mean[0], atol=1e-5)


@pytest.mark.parametrize("first_chunk, second_chunk", [(40, 1311), (90, 300), (1, 257)])
def test_a_large_chunk_after_room_was_left_fits(tiny_model, tiny_stats, first_chunk, second_chunk):
    """Growth makes room for the whole chunk, however much free room the buffer had left."""
    cache = make_prompt_cache(tiny_model, 256, stats=tiny_stats, prompt_mode="chunked")
    tokens = np.random.default_rng(9).integers(0, 128, first_chunk + second_chunk).tolist()
    reference = [KVCache() for _ in tiny_model.layers]
    for start, n in ((0, first_chunk), (first_chunk, second_chunk)):
        chunk = mx.array(tokens[start : start + n])[None]
        tiny_model(chunk, cache=cache)
        tiny_model(chunk, cache=reference)
    total = first_chunk + second_chunk
    assert cache[0].offset == reference[0].offset == total
    assert cache[0].size() == (256 if total >= 256 + 128 else total)


def test_decoding_compacts_only_when_a_round_is_due(tiny_model, tiny_stats, monkeypatch):
    """Between rounds a decode step only appends: the buffer is rebuilt once a round (a
    schedule that said 'due' every step once rebuilt it on every token)."""
    compactions = []
    original = TriAttentionKVCache._compact
    monkeypatch.setattr(TriAttentionKVCache, "_compact",
                        lambda self, *a, **k: (compactions.append(1), original(self, *a, **k))[1])
    cache = make_prompt_cache(tiny_model, stats=tiny_stats, pruning_mode="per_layer_per_head", **OPTIONS)
    list(feed(tiny_model, cache, list(range(70)), 70))  # 70 < 64 + 16: no round yet
    for token in range(64):
        tiny_model(mx.array([[token]]), cache=cache)
    assert cache[0].prune_rounds == 4  # at 80, 96, 112, 128 tokens held... every 16 steps
    assert len(compactions) == 4 * len(cache)


@pytest.mark.parametrize("mode", ["per_layer_per_head", "per_head"])
def test_decode_fast_path_matches_the_general_append(tiny_model, tiny_stats, mode):
    """A decode step takes a short path (one token into the room left after a round); with
    it turned off (_plain = False sends every call through _append) decoding gives the same
    logits, the same kept positions and the same buffers."""
    prompt = np.random.default_rng(5).integers(0, 128, 150).tolist()
    runs = []
    for fast in (True, False):
        cache = make_prompt_cache(tiny_model, stats=tiny_stats, pruning_mode=mode, **OPTIONS)
        if not fast:
            for c in cache:
                c._plain = False
        logits = list(feed(tiny_model, cache, prompt, 150))
        for token in range(60):  # 60 steps: several rounds, and the steps between them
            logits.append(tiny_model(mx.array([[token % 128]]), cache=cache))
        runs.append((logits, cache))
    (fast_logits, fast), (slow_logits, slow) = runs
    assert fast[0].prune_rounds == slow[0].prune_rounds >= 3
    for a, b in zip(fast_logits, slow_logits):
        assert mx.array_equal(a, b)
    for a, b in zip(fast, slow):
        assert a.offset == b.offset and a.size() == b.size()
        assert mx.array_equal(a.token_positions(), b.token_positions())
        assert mx.array_equal(a._held()[0], b._held()[0]) and mx.array_equal(a._held()[1], b._held()[1])


@pytest.mark.parametrize("mode", ["per_layer_per_head", "per_head"])
def test_the_round_a_prompt_ends_with_runs_at_the_next_call_and_changes_nothing(tiny_model, tiny_stats, mode):
    """The token that ends a prompt leaves its round (the prompt's selection) to the next
    call, off the path to the first token. Deferred or run at once (_defers = False), the
    logits, the kept positions and the buffers are the same; and a cache read in between
    (its size, state, mask, positions) is read selected: never over budget."""
    prompt = np.random.default_rng(7).integers(0, 128, 300).tolist()
    runs = []
    for defers in (True, False):
        cache = make_prompt_cache(tiny_model, 96, stats=tiny_stats, window=16, pruning_mode=mode)
        for c in cache:
            c._defers = defers
        logits = list(feed(tiny_model, cache, prompt[:-1], 128))
        logits.append(tiny_model(mx.array([prompt[-1:]]), cache=cache))  # ends the prompt
        assert (cache[0]._deferred is not None) == defers
        if defers:
            assert cache[-1].size() == 96  # a reader settles the round (per_head: every layer's)
            assert all(c._deferred is None for c in cache) == (mode == "per_head")
            assert all(c.prune_rounds == 1 and c.size() == 96 for c in cache)
        for token in range(20):
            logits.append(tiny_model(mx.array([[token]]), cache=cache))
        runs.append((logits, cache))
    (deferred_logits, deferred), (at_once_logits, at_once) = runs
    for a, b in zip(deferred_logits, at_once_logits):
        assert mx.array_equal(a, b)
    for a, b in zip(deferred, at_once):
        assert a.offset == b.offset and a.size() == b.size() and a.prune_rounds == b.prune_rounds == 1
        assert mx.array_equal(a.token_positions(), b.token_positions())
        assert mx.array_equal(a._held()[0], b._held()[0])


def test_a_cache_saved_or_trimmed_right_after_its_prompt_is_selected(tiny_model, tiny_stats, tmp_path):
    """mlx-lm may save or trim a cache after one token (max_tokens=1): the round the
    prompt's end left pending runs first, so what is saved is within the budget."""
    prompt = np.random.default_rng(8).integers(0, 128, 300).tolist()
    cache = make_prompt_cache(tiny_model, 96, stats=tiny_stats, window=16)
    list(feed(tiny_model, cache, prompt[:-1], 128))
    tiny_model(mx.array([prompt[-1:]]), cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"), model=tiny_model)
    assert all(c.size() == 96 and c.offset == 300 for c in loaded)
    cache = make_prompt_cache(tiny_model, 96, stats=tiny_stats, window=16)
    list(feed(tiny_model, cache, prompt[:-1], 128))
    tiny_model(mx.array([prompt[-1:]]), cache=cache)
    assert cache[0].trim(4) == 4 and cache[0].size() == 92
