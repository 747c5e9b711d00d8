"""How a prompt is compressed (Settings.prompt_mode): read whole and selected when it ends
(with the prompt's last queries voting: observe), compressed as it is read (chunked), or
never evicted (keep). A prompt is what arrives several tokens a call; the single token
after it ends it (mlx-lm reads the last prompt token alone)."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama
from test_baselines import softmax
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache

from triattn_mlx import Settings, calibrate, make_prompt_cache, remove_taps
from triattn_mlx.baselines import QueryAwareScorer, observation_scores
from triattn_mlx.taps import LatestQueries

OPTIONS = dict(budget=64, window=16, divide_length=16, pruning_mode="per_head")


@pytest.fixture(scope="module")
def model_and_stats():
    model = tiny_llama(seed=11)
    return model, calibrate(model, np.random.default_rng(2).integers(0, 128, 300).tolist())


def read(model, cache, tokens, chunk):
    """A prompt as mlx-lm reads it: chunks, then the last token alone. Sizes after each call."""
    sizes, logits = [], []
    for start in range(0, len(tokens) - 1, chunk):
        logits.append(model(mx.array(tokens[start : min(start + chunk, len(tokens) - 1)])[None], cache=cache))
        sizes.append(cache[0].size())
    logits.append(model(mx.array(tokens[-1:])[None], cache=cache))
    sizes.append(cache[0].size())
    return sizes, logits


def test_whole_reads_as_full_attention_then_selects_at_the_end(model_and_stats):
    model, stats = model_and_stats
    tokens = np.random.default_rng(3).integers(0, 128, 300).tolist()
    cache = make_prompt_cache(model, stats=stats, prompt_mode="whole", prefill_limit=320, **OPTIONS)
    full = [KVCache() for _ in model.layers]
    sizes, logits = read(model, cache, tokens, 50)
    _, reference = read(model, full, tokens, 50)
    assert sizes == [50, 100, 150, 200, 250, 299, 64]  # held whole (300 < 320), selected at the end
    for a, b in zip(logits, reference):  # the prompt was read with full attention
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5)
    assert cache[0].prune_rounds == 1
    decoded = [cache[0].size()]
    for token in range(40):  # decoding: bounded as before
        model(mx.array([[token]]), cache=cache)
        decoded.append(cache[0].size())
    assert max(decoded) < 64 + 16 and cache[0].prune_rounds == 3


def test_whole_compresses_in_rounds_past_its_limit_and_chunked_as_it_reads(model_and_stats):
    model, stats = model_and_stats
    tokens = np.random.default_rng(4).integers(0, 128, 700).tolist()
    assert Settings(**OPTIONS).reading_limit == 8192 and Settings(budget=4096).reading_limit == 4 * 4096
    limited = make_prompt_cache(model, stats=stats, prompt_mode="whole", prefill_limit=256, **OPTIONS)
    sizes, _ = read(model, limited, tokens, 50)
    assert max(sizes) < 256 + 50 and sizes[-1] == 64 and limited[0].prune_rounds == 4  # 3 rounds reading, 1 at the end
    chunked = make_prompt_cache(model, stats=stats, prompt_mode="chunked", **OPTIONS)
    sizes, _ = read(model, chunked, tokens, 50)
    assert max(sizes) < 64 + 50 + 16 and sizes[-1] < 64 + 16


def test_keep_never_evicts_the_prompt(model_and_stats):
    model, stats = model_and_stats
    prompt = np.random.default_rng(5).integers(0, 128, 100).tolist()
    cache = make_prompt_cache(model, stats=stats, prompt_mode="keep", **OPTIONS)
    read(model, cache, prompt, 30)
    for token in range(150):
        model(mx.array([[token % 128]]), cache=cache)
        assert cache[0].size() < 100 + 16 + 16  # the prompt, the window, divide_length
    held = np.array(cache[0].token_positions())[0]
    for head in held:
        assert set(range(100)) <= set(head.tolist())  # every prompt token, in every head
    assert cache[0].prune_rounds > 3 and held.max() == 249


@pytest.mark.parametrize("settings, message", [
    (dict(prompt_mode="all"), "prompt_mode must be one of"),
    (dict(prefill_limit=70), "prefill_limit must be an integer >= 80"),
    (dict(observe=-1), "observe must be an integer >= 0"),
    (dict(observe_weight=-0.5), "observe_weight must be a number >= 0"),
    (dict(observe_redundancy=-1.0), "observe_redundancy must be a number >= 0"),
    (dict(observe_redundancy=True), "observe_redundancy must be a number >= 0"),
    (dict(observe_pool=0), "observe_pool must be an integer >= 1"),
    (dict(observe_pool=4), "observe_pool must be odd"),
    (dict(observe_rounds="decode"), "observe_rounds must be one of"),
    (dict(segments=-2), "segments must be an integer >= 0"),
    (dict(segments=4, segment_share=1.5), "segment_share must be a number from 0 to 1"),
    (dict(segment_rounds="decode"), "segment_rounds must be one of"),
])
def test_bad_prompt_settings_fail_where_they_are_made(settings, message):
    with pytest.raises(ValueError, match=message):
        Settings(**OPTIONS, **settings)


def test_observe_rounds_flag_reaches_the_settings():
    import argparse

    from triattn_mlx import settings as flags

    parser = argparse.ArgumentParser()
    flags.add_arguments(parser, "self-calibration")
    assert flags.from_args(parser.parse_args([])).observe_rounds == "prompt"
    assert flags.from_args(parser.parse_args(["--observe-rounds", "all"])).observe_rounds == "all"
    with pytest.raises(SystemExit):
        parser.parse_args(["--observe-rounds", "decode"])


def test_the_prompt_s_last_queries_vote_at_its_end():
    """A key the observation window attends to is kept over the method's favourites; in a
    later round (no window ends there) the method's score decides alone."""
    rng = np.random.default_rng(6)
    H, n_kv, N, D, offset = 4, 2, 400, 16, 1000  # the window's peak (pooled over 7 keys) stands out of 400
    keys = rng.normal(size=(1, n_kv, N, D)).astype(np.float32)
    positions = np.tile(np.arange(offset - N, offset), (n_kv, 1))[None]
    looking = 20 * keys[0, 0, 7] / np.linalg.norm(keys[0, 0, 7])  # every window query looks at key 7
    queries = np.broadcast_to(looking, (1, H, 8, D)).copy()

    def method(keys, positions, offset):  # ranks key 7 last of all
        return mx.broadcast_to(mx.abs(mx.arange(N) - 7).astype(mx.float32), (1, H, N))

    scorer = QueryAwareScorer(method, weight=1.0)
    voted = np.array(scorer(mx.array(keys), mx.array(positions), offset, queries=mx.array(queries)))[0]
    assert set(voted[:2].argmax(-1).tolist()) <= set(range(4, 11))  # key 7's neighbourhood, not key 399
    obs = np.array(observation_scores(mx.array(queries), mx.array(keys), mx.array(positions), offset))
    assert obs.shape == (1, H, N) and np.flatnonzero(obs[0, 0] > 0.5).tolist() == list(range(4, 11))
    later = np.array(scorer(mx.array(keys), mx.array(positions), offset + 5))[0]  # a decode round: no window
    np.testing.assert_array_equal(later, np.array(method(None, None, None))[0])


def test_observe_pool_max_pools_the_prompt_end_s_sum():
    """observe_pool: the sum z(method) + weight * z(observation) max-pooled over `pool`
    neighbouring tokens (a numpy reference); 1 leaves it as it is; later rounds are not
    pooled."""
    rng = np.random.default_rng(9)
    H, n_kv, N, D, offset = 4, 2, 50, 16, 300
    keys = mx.array(rng.normal(size=(1, n_kv, N, D)).astype(np.float32))
    positions = mx.array(np.tile(np.arange(offset - N, offset), (n_kv, 1))[None])
    queries = mx.array(rng.normal(size=(1, H, 8, D)).astype(np.float32))
    raw = mx.array(rng.normal(size=(1, H, N)).astype(np.float32))

    def method(keys, positions, offset):
        return raw

    plain = np.array(QueryAwareScorer(method, 2.0)(keys, positions, offset, queries=queries))
    pooled = np.array(QueryAwareScorer(method, 2.0, pool=5)(keys, positions, offset, queries=queries))
    padded = np.pad(plain, [(0, 0), (0, 0), (2, 2)], constant_values=-np.inf)
    expected = np.max([padded[..., i : i + N] for i in range(5)], axis=0)
    np.testing.assert_allclose(pooled, expected, rtol=1e-6)
    assert not np.allclose(pooled, plain)
    later = QueryAwareScorer(method, 2.0, pool=5)(keys, positions, offset + 5)
    np.testing.assert_array_equal(np.array(later), np.array(raw))


def numpy_mean_similarity(k):
    """keys [H_kv, N, D] -> [H_kv, N]: each key's mean cosine similarity to the others, softmaxed."""
    unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
    sim = unit @ unit.transpose(0, 2, 1)
    for h in range(len(k)):
        np.fill_diagonal(sim[h], 0)
    return softmax(sim.sum(1) / k.shape[1])


def numpy_z(x):
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)


def test_observe_redundancy_takes_mean_similarity_off_the_prompt_end_s_score():
    """observe_redundancy: z(method) + weight * z(observation) - r * z(mean similarity of
    each key to the others), each query head taking its KV head's (a numpy reference); 0
    leaves the sum as it is; later rounds read the method alone."""
    rng = np.random.default_rng(12)
    H, n_kv, N, D, offset = 4, 2, 60, 16, 300
    keys = rng.normal(size=(1, n_kv, N, D)).astype(np.float32)
    keys[0, 0, 10:30] = keys[0, 0, 5] + 0.05 * keys[0, 0, 10:30]  # running prose: keys alike
    positions = mx.array(np.tile(np.arange(offset - N, offset), (n_kv, 1))[None])
    queries = mx.array(rng.normal(size=(1, H, 8, D)).astype(np.float32))
    raw = rng.normal(size=(1, H, N)).astype(np.float32)

    def method(keys, positions, offset):
        return mx.array(raw)

    plain = np.array(QueryAwareScorer(method, 2.0)(mx.array(keys), positions, offset, queries=queries))
    got = np.array(QueryAwareScorer(method, 2.0, redundancy=1.5)(mx.array(keys), positions, offset, queries=queries))
    obs = np.array(observation_scores(queries, mx.array(keys), positions, offset))
    np.testing.assert_allclose(plain, numpy_z(raw) + 2.0 * numpy_z(obs), rtol=1e-4, atol=1e-4)
    alike = np.repeat(numpy_z(numpy_mean_similarity(keys[0])), H // n_kv, axis=0)[None]
    np.testing.assert_allclose(got, plain - 1.5 * alike, rtol=1e-4, atol=1e-4)
    assert got[0, :2, 10:30].mean() < plain[0, :2, 10:30].mean()  # the alike keys lost ground
    later = QueryAwareScorer(method, 2.0, redundancy=1.5)(mx.array(keys), positions, offset + 5)
    np.testing.assert_array_equal(np.array(later), raw)


def test_observe_redundancy_reaches_the_prompt_s_selection_and_a_saved_cache(model_and_stats, tmp_path):
    """--observe-redundancy is wired through make_prompt_cache (it changes what a prompt
    keeps) and a saved cache loads with it."""
    from mlx_lm.models.cache import save_prompt_cache

    from triattn_mlx import load_prompt_cache

    model, stats = model_and_stats
    tokens = np.random.default_rng(13).integers(0, 128, 240).tolist()
    kept = []
    try:
        for weight in (0.0, 3.0):
            cache = make_prompt_cache(model, stats=stats, prompt_mode="whole", observe=8,
                                      observe_redundancy=weight, **OPTIONS)
            assert cache[0].scorer.redundancy == weight
            read(model, cache, tokens, 60)
            kept.append(np.array(cache[0].token_positions()))
            remove_taps(model)
        save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
        loaded = load_prompt_cache(str(tmp_path / "c.safetensors"), model=model)
        assert loaded[0].settings.observe_redundancy == 3.0 and loaded[0].scorer.redundancy == 3.0
    finally:
        remove_taps(model)
    assert kept[0].shape == kept[1].shape and not np.array_equal(kept[0], kept[1])


def test_segment_fill_distinct_fills_the_quotas_by_dissimilarity(model_and_stats, tmp_path, monkeypatch):
    """segment_fill "distinct": in the prompt's round the stretches' quotas are ranked by
    each key's dissimilarity to the others, -z(mean similarity) over the candidates,
    averaged over the layers (per_head), against a numpy reference on full attention's
    keys of the same prompt; the rest still go by the round's score; a saved cache keeps it."""
    from mlx_lm.models.cache import save_prompt_cache

    from triattn_mlx import cache as cache_module
    from triattn_mlx import load_prompt_cache

    model, stats = model_and_stats
    tokens = np.random.default_rng(14).integers(0, 128, 240).tolist()
    full = [KVCache() for _ in model.layers]
    model(mx.array(tokens)[None], cache=full)
    window, budget = OPTIONS["window"], OPTIONS["budget"]
    candidates = np.arange(len(tokens)) < len(tokens) - window
    want = 0
    for c in full:
        d = -numpy_mean_similarity(np.array(c.keys[0, :, : len(tokens)], np.float32))
        mean, std = d[:, candidates].mean(-1, keepdims=True), d[:, candidates].std(-1, keepdims=True)
        want = want + (d - mean) / (std + 1e-6) / len(full)
    seen, select = [], cache_module.select_tokens

    def recording(*args):
        seen.append(args[8])
        return select(*args)

    monkeypatch.setattr(cache_module, "select_tokens", recording)
    kept = {}
    try:
        for fill in ("score", "distinct"):
            cache = make_prompt_cache(model, stats=stats, prompt_mode="whole", observe=8, segments=4,
                                      segment_rounds="prompt", segment_fill=fill, **OPTIONS)
            read(model, cache, tokens, 60)
            kept[fill] = np.array(cache[0].token_positions())
            remove_taps(model)
        save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
        assert load_prompt_cache(str(tmp_path / "c.safetensors"), model=model)[0].settings.segment_fill == "distinct"
    finally:
        remove_taps(model)
    assert seen[0] is None and seen[1] is not None  # one prompt round each (per_head: one selection)
    np.testing.assert_allclose(np.array(seen[1])[0], want, rtol=1e-3, atol=1e-3)
    assert kept["score"].shape == kept["distinct"].shape == (1, full[0].keys.shape[1], budget)
    assert not np.array_equal(kept["score"], kept["distinct"])
    with pytest.raises(ValueError, match="segment_fill must be one of"):
        Settings(segment_fill="novel")


def test_observe_pool_reaches_the_prompt_s_selection(model_and_stats):
    """--observe-pool is wired through make_prompt_cache: it changes what a prompt keeps."""
    model, stats = model_and_stats
    tokens = np.random.default_rng(10).integers(0, 128, 240).tolist()
    kept = []
    try:
        for pool in (1, 9):
            cache = make_prompt_cache(model, stats=stats, prompt_mode="whole", observe=8, observe_pool=pool,
                                      **OPTIONS)
            read(model, cache, tokens, 60)
            kept.append(np.array(cache[0].token_positions()))
            remove_taps(model)
    finally:
        remove_taps(model)
    assert kept[0].shape == kept[1].shape and not np.array_equal(kept[0], kept[1])


def test_observation_keeps_what_the_prompt_end_attends_to(model_and_stats):
    """End to end on a tiny model: with observe, the tokens the last prompt queries attend
    to most are kept; without it the method may drop them."""
    model, stats = model_and_stats
    tokens = np.random.default_rng(7).integers(0, 128, 240).tolist()
    try:
        cache = make_prompt_cache(model, stats=stats, prompt_mode="whole", observe=8, observe_weight=100.0,
                                  **{**OPTIONS, "pruning_mode": "per_layer_per_head"})
        assert isinstance(model.layers[0].self_attn.rope, LatestQueries)
        read(model, cache, tokens, 60)
        window = cache[0]._window  # the prompt's last 8 queries, as layer 0 saw them
        assert window.shape[2] == 8 and cache[0]._window_count.tolist() == [8]
        keys, positions = cache[0].keys[..., : cache[0].size(), :], cache[0].token_positions()
        # the observation of the full prompt, recomputed: its top tokens must have been kept
        full = [KVCache() for _ in model.layers]
        read(model, full, tokens, 60)
        obs = observation_scores(window, full[0].keys[..., :240, :],
                                 mx.broadcast_to(mx.arange(240)[None, None], (1, 2, 240)), 240)
        top = np.argsort(-np.array(obs)[0].reshape(2, 2, 240).max(1), axis=-1)[:, :5]
        kept = np.array(positions)[0]
        for head in range(2):
            assert set(top[head].tolist()) <= set(kept[head].tolist())
        assert keys.shape[2] == 64
    finally:
        remove_taps(model)


@pytest.mark.parametrize("mode", ["whole", "keep"])
def test_generate_step_runs_each_prompt_mode_like_alone(model_and_stats, mode):
    """mlx-lm's own generation loop; the same prompt twice gives the same tokens."""
    model, stats = model_and_stats
    prompt = mx.array(np.random.default_rng(8).integers(0, 128, 200))
    outs = []
    for _ in range(2):
        cache = make_prompt_cache(model, stats=stats, prompt_mode=mode, observe=8, **OPTIONS)
        steps = generate_step(prompt, model, prompt_cache=cache, prefill_step_size=64, max_tokens=30)
        outs.append([int(t) for t, _ in steps])
        remove_taps(model)
    assert outs[0] == outs[1] and len(outs[0]) == 30


def test_coverage_keeps_every_stretch_of_a_long_prompt():
    """With segments, the prompt's selection keeps, in every KV head, at least each
    stretch's quota of the evictable positions (a CLI user's --segments 4)."""
    model = tiny_llama(seed=2)
    stats = calibrate(model, np.random.default_rng(3).integers(0, 128, 200))
    settings = dict(budget=96, window=16, segments=4, segment_share=1.0)
    cache = make_prompt_cache(model, stats=stats, **settings)
    prompt = np.random.default_rng(4).integers(0, 128, 600).tolist()
    read(model, cache, prompt, 256)
    quota = (96 - 16) // 4
    for c in cache:
        held = np.array(c.token_positions())[0]
        assert held.shape[-1] == 96
        for head in held:
            evictable = head[head < 600 - 16]
            assert (np.bincount(evictable * 4 // (600 - 16), minlength=4) >= quota).all()


@pytest.mark.parametrize("rounds", ["prompt", "all"])
def test_coverage_acts_in_the_rounds_segment_rounds_names(rounds, monkeypatch):
    """Coverage (off by default) acts in every round, or with segment_rounds "prompt" only
    in the round that ends a prompt: generation rounds then select by score alone."""
    import argparse

    from triattn_mlx import cache as cache_module
    from triattn_mlx import settings as flags

    seen, select = [], cache_module.select_tokens

    def recording(*args):
        seen.append(args[6:8])  # (segments, segment_share)
        return select(*args)

    monkeypatch.setattr(cache_module, "select_tokens", recording)
    model = tiny_llama(seed=2)
    stats = calibrate(model, np.random.default_rng(3).integers(0, 128, 200))
    cache = make_prompt_cache(model, stats=stats, segments=8, segment_rounds=rounds, **OPTIONS)
    read(model, cache, np.random.default_rng(4).integers(0, 128, 300).tolist(), 128)
    prompt_rounds = len(seen)
    for token in range(40):  # decoding past divide_length: two more rounds
        model(mx.array([[token]]), cache=cache)
    assert prompt_rounds == 1 and len(seen) == 3  # per_head: one selection a round for every layer
    assert seen[0] == (8, 0.5)
    assert seen[1:] == [(8, 0.5) if rounds == "all" else (0, 0.0)] * 2
    assert Settings(segments=0).coverage(ending=True) == (0, 0.0, "score")
    assert Settings().segments == 0 and Settings().segment_rounds == "all"  # off by default
    assert Settings(segments=4).coverage(ending=False) == (4, 0.5, "score")
    assert Settings(segments=4, segment_rounds="prompt").coverage(ending=False) == (0, 0.0, "score")
    parser = argparse.ArgumentParser()
    flags.add_arguments(parser, "self-calibration")
    assert flags.from_args(parser.parse_args(["--segment-rounds", rounds])).segment_rounds == rounds
    assert flags.from_args(parser.parse_args(["--segments", "4"])).segments == 4
