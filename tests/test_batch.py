"""Batch generation: each sequence of a batch keeps and generates what it would alone."""

from itertools import islice

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama
from mlx_lm.generate import BatchGenerator, batch_generate, generate_step
from mlx_lm.models.cache import save_prompt_cache

from triattn_mlx import calibrate, make_prompt_cache, remove_query_recorders, remove_taps
from triattn_mlx.batch import BatchTriAttentionKVCache

SETTINGS = dict(budget=64, window=16, divide_length=16, prompt_mode="chunked")  # prompts compressed as read
PREFILL = 64  # chunks of 64: long prompts are pruned during prefill, inside a right-padded batch
LENGTHS = (300, 180, 90, 40)


class Tokenizer:
    eos_token_ids = []

    def decode(self, tokens):
        return " ".join(map(str, tokens))


@pytest.fixture(scope="module")
def model_and_stats():
    model = tiny_llama(seed=3)
    stats = calibrate(model, np.random.default_rng(1).integers(0, 128, 256).tolist(), source="random tokens")
    return model, stats


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 128, n).tolist() for n in lengths]


def alone(model, cache, prompt, n, prefill=PREFILL):
    """n greedy tokens of `prompt` alone (generate_step feeds each token as it yields it)."""
    steps = generate_step(mx.array(prompt), model, prompt_cache=cache, prefill_step_size=prefill)
    return [int(t) for t, _ in islice(steps, n)]


def assert_same_cache(batch_layers, alone_layers):
    for b, a in zip(batch_layers, alone_layers):
        assert (b.offset, b.size(), b.prune_rounds) == (a.offset, a.size(), a.prune_rounds)
        np.testing.assert_array_equal(np.array(b.token_positions()), np.array(a.token_positions()))
        for x, y in zip(b._held(), a._held()):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5)


@pytest.mark.parametrize("mode, prompt_mode", [("per_head", "chunked"), ("per_layer_per_head", "chunked"),
                                               ("per_head", "whole"), ("per_layer_per_head", "keep")])
def test_each_sequence_keeps_and_generates_what_it_would_alone(model_and_stats, mode, prompt_mode):
    """4 prompts of different lengths, leaving the batch at different steps."""
    model, stats = model_and_stats
    max_tokens = [20, 8, 30, 14]
    options = dict(SETTINGS, pruning_mode=mode, prompt_mode=prompt_mode)  # observe: 32 (the default)
    caches = [make_prompt_cache(model, stats=stats, **options) for _ in LENGTHS]
    result = batch_generate(model, Tokenizer(), prompts(), prompt_caches=caches, max_tokens=max_tokens,
                            prefill_step_size=PREFILL, return_prompt_caches=True)
    for prompt, n, text, batch_cache in zip(prompts(), max_tokens, result.texts, result.caches):
        cache = make_prompt_cache(model, stats=stats, **options)
        tokens = alone(model, cache, prompt, n)
        assert text == Tokenizer().decode(tokens)
        assert_same_cache(batch_cache, cache)
    if prompt_mode == "keep":  # 20 tokens past a 300-token prompt: nothing was evictable
        assert result.caches[0][0].size() == LENGTHS[0] + max_tokens[0]
    else:
        assert any(c.prune_rounds > 0 for c in result.caches[0])


@pytest.mark.parametrize("method", ["snapkv", "rkv"])
def test_snapkv_and_rkv_batch_as_alone(model_and_stats, method):
    """Their caches keep the newest queries per row: batched, each sequence keeps and
    generates what it would alone, rounds while reading and while decoding included."""
    model, _ = model_and_stats
    max_tokens = [20, 8, 30, 14]
    caches = [make_prompt_cache(model, method=method, **SETTINGS) for _ in LENGTHS]
    result = batch_generate(model, Tokenizer(), prompts(), prompt_caches=caches, max_tokens=max_tokens,
                            prefill_step_size=PREFILL, return_prompt_caches=True)
    for prompt, n, text, batch_cache in zip(prompts(), max_tokens, result.texts, result.caches):
        cache = make_prompt_cache(model, method=method, **SETTINGS)
        assert text == Tokenizer().decode(alone(model, cache, prompt, n))
        assert_same_cache(batch_cache, cache)
    assert result.caches[2][0].prune_rounds > 1  # 90 prompt tokens and 30 generated: rounds in both
    remove_taps(model)


def test_sequences_joining_a_running_batch(model_and_stats):
    """Two sequences decode, two more join mid-way; all four match their solo runs, and no row
    ever holds more than budget + divide_length + one prefill chunk."""
    model, stats = model_and_stats
    gen = BatchGenerator(model, max_tokens=12, prefill_step_size=PREFILL, completion_batch_size=4)
    first, later = prompts((250, 70)), prompts((130, 200), seed=5)
    make = lambda: make_prompt_cache(model, stats=stats, **SETTINGS)  # noqa: E731
    uids = gen.insert(first, caches=[make(), make()])
    out, largest = {}, 0
    for step in range(200):
        if step == 4:
            uids += gen.insert(later, caches=[make(), make()])
        responses = gen.next_generated()
        if not responses and step > 4:
            break
        for batch in (gen._prompt_batch, gen._generation_batch):
            largest = max([largest] + [c.size() for c in batch.prompt_cache])
        for r in responses:
            out.setdefault(r.uid, []).append(r.token)
    gen.close()
    assert largest <= SETTINGS["budget"] + SETTINGS["divide_length"] + PREFILL
    for uid, prompt in zip(uids, first + later):
        assert out[uid] == alone(model, make(), prompt, 12)


def test_merge_then_extract_gives_back_each_cache(model_and_stats):
    model, stats = model_and_stats
    singles = []
    for prompt in prompts((150, 30)) + [[]]:
        cache = make_prompt_cache(model, stats=stats, pruning_mode="per_layer_per_head", **SETTINGS)
        if prompt:
            model(mx.array(prompt)[None], cache=cache)
        singles.append(cache)
    merged = [BatchTriAttentionKVCache.merge([s[i] for s in singles]) for i in range(len(singles[0]))]
    L = singles[0][0].size()  # 150 tokens in one chunk, pruned to the budget
    assert merged[0].size() == L == SETTINGS["budget"]
    np.testing.assert_array_equal(np.array(merged[0].left_padding), [0, L - 30, L])
    for b, single in enumerate(singles[:2]):
        assert_same_cache([m.extract(b) for m in merged], single)
    empty = merged[0].extract(2)
    assert empty.size() == 0 and empty.offset == 0


def test_batches_refuse_what_they_cannot_hold(model_and_stats, tmp_path):
    model, stats = model_and_stats
    self_calibrated = make_prompt_cache(model, stats="self", **SETTINGS)[0]
    remove_query_recorders(model)
    with pytest.raises(ValueError, match="self-calibrated"):
        BatchTriAttentionKVCache.merge([self_calibrated, self_calibrated])
    quantized = [make_prompt_cache(model, stats=stats, kv_bits=8, **SETTINGS)[0] for _ in range(2)]
    with pytest.raises(ValueError, match="quantized"):
        BatchTriAttentionKVCache.merge(quantized)
    h2o = make_prompt_cache(model, method="h2o", **SETTINGS)[0]
    with pytest.raises(ValueError, match="h2o caches cannot be batched"):
        BatchTriAttentionKVCache.merge([h2o, h2o])
    remove_taps(model)
    batch = BatchTriAttentionKVCache.merge([make_prompt_cache(model, stats=stats, **SETTINGS)[0]])
    model(mx.array([[1, 2, 3]]), cache=[batch, batch.merge([make_prompt_cache(model, stats=stats, **SETTINGS)[1]])])
    with pytest.raises(ValueError, match="a batch cache cannot be saved: extract each sequence's cache first"):
        save_prompt_cache(str(tmp_path / "batch.safetensors"), [batch])


@pytest.mark.slow  # ~55 s; the tiny-model batch tests above run by default
def test_real_model_batch_of_four_generates_as_alone(real_model, real_stats):
    """SmolLM2: 4 prompts of different lengths, budget 128, greedy, batched vs alone."""
    from triattn_mlx.corpus import prose_text

    model, tokenizer = real_model
    text = tokenizer.encode(prose_text())
    batch_prompts = [text[i * 50 : i * 50 + n] for i, n in enumerate((600, 420, 260, 150))]
    settings = dict(budget=128, window=32, divide_length=32)
    caches = [make_prompt_cache(model, stats=real_stats, **settings) for _ in batch_prompts]
    result = batch_generate(model, tokenizer, batch_prompts, prompt_caches=caches, max_tokens=24,
                            prefill_step_size=128, return_token_ids=True)
    for prompt, tokens in zip(batch_prompts, result.token_ids):
        cache = make_prompt_cache(model, stats=real_stats, **settings)
        assert list(tokens) == alone(model, cache, prompt, 24, prefill=128)


def test_left_padded_prompt_keeps_only_the_real_tokens(model_and_stats):
    """prepare(left_padding=...) on an empty batch (BatchKVCache's convention): the padding
    tokens get negative positions, are masked, never scored, and extract drops them."""
    model, stats = model_and_stats
    long, short = prompts((120, 90), seed=7)
    batch = [BatchTriAttentionKVCache.merge([a, b]) for a, b in zip(
        *(make_prompt_cache(model, stats=stats, pruning_mode="per_layer_per_head", **SETTINGS) for _ in range(2)))]
    for c in batch:
        c.prepare(left_padding=[0, 30])
    logits = model(mx.array([long, [0] * 30 + short]), cache=batch)
    for b, prompt in enumerate((long, short)):
        alone_cache = make_prompt_cache(model, stats=stats, pruning_mode="per_layer_per_head", **SETTINGS)
        alone_logits = model(mx.array(prompt)[None], cache=alone_cache)
        np.testing.assert_allclose(np.array(logits[b, -1]), np.array(alone_logits[0, -1]), atol=1e-4)
        assert_same_cache([c.extract(b) for c in batch], alone_cache)


def test_extending_an_empty_batch_and_filtering_to_none(model_and_stats):
    model, stats = model_and_stats
    make = lambda: make_prompt_cache(model, stats=stats, pruning_mode="per_layer_per_head", **SETTINGS)  # noqa: E731
    full, empty = make(), make()
    model(mx.array(prompts((50,))[0])[None], cache=full)
    batch = BatchTriAttentionKVCache.merge([empty[0]])
    batch.extend(BatchTriAttentionKVCache.merge([full[0]]))
    np.testing.assert_array_equal(np.array(batch.left_padding), [50, 0])
    assert_same_cache([batch.extract(1)], [full[0]])
    batch.filter([])
    assert batch.size() == 0 and batch.keys.shape[0] == 0


def test_dropped_caches_free_their_arrays_without_the_cycle_collector(model_and_stats):
    """A per_head group must not keep its caches alive: a server dropping a conversation's
    cache (or a batch) gets its memory back at once, not whenever Python's cycle collector
    runs. Checked with the collector off, for single and batch caches."""
    import gc
    import weakref

    model, stats = model_and_stats
    gc.collect()
    gc.disable()
    try:
        singles = [make_prompt_cache(model, stats=stats, **SETTINGS) for _ in range(2)]
        for cache, prompt in zip(singles, prompts((200, 100))):
            model(mx.array(prompt)[None], cache=cache)
        batch = [BatchTriAttentionKVCache.merge(list(layer)) for layer in zip(*singles)]
        model(mx.array([[1], [2]]), cache=batch)
        refs = [weakref.ref(c) for c in singles[0] + batch]
        del singles, batch, cache
        assert all(r() is None for r in refs)
    finally:
        gc.enable()


def test_a_deep_copy_prunes_as_its_original(model_and_stats):
    """mlx-lm deep-copies prompt caches (BatchGenerator, the server's prompt cache): the
    copy's per_head group must hold the copies, not the originals."""
    import copy

    model, stats = model_and_stats
    first, rest = prompts((150, 150))
    caches = make_prompt_cache(model, stats=stats, pruning_mode="per_head", **SETTINGS)
    model(mx.array(first)[None], cache=caches)
    copies = copy.deepcopy(caches)
    group = copies[0].group
    assert group is not caches[0].group and set(group.members) == set(copies)
    for layers in (caches, copies):
        model(mx.array(rest)[None], cache=layers)
    assert copies[0].prune_rounds == caches[0].prune_rounds > 1
    for a, b in zip(caches, copies):
        np.testing.assert_array_equal(np.array(a.token_positions()), np.array(b.token_positions()))
