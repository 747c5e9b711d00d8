"""TriAttentionKVCache on the real test model (SmolLM2-135M-Instruct)."""

import json
import os

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache, RotatingKVCache, save_prompt_cache

from support import prose_text, smollm2_model_dir
from support.evaluate import perplexity, reference_logprobs, reference_nll, teacher_forced
from triattn_mlx import load_prompt_cache, make_prompt_cache


def greedy(model, cache, first_token, steps):
    token, out = first_token, []
    for _ in range(steps):
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        token = int(logits.argmax())
        out.append((token, np.array(logits)))
    return out


def test_large_budget_gives_the_logits_of_the_full_cache(real_model, real_stats):
    model, tokenizer = real_model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}], add_generation_prompt=True)
    full = [KVCache() for _ in model.layers]
    ours = make_prompt_cache(model, 512, stats=real_stats)
    a = model(mx.array(prompt)[None], cache=full)[0, -1]
    b = model(mx.array(prompt)[None], cache=ours)[0, -1]
    assert float(mx.abs(a - b).max()) <= 1e-5
    first = int(a.argmax())
    for (ta, la), (tb, lb) in zip(greedy(model, full, first, 64), greedy(model, ours, first, 64)):
        assert ta == tb
        assert np.abs(la - lb).max() <= 1e-5
    assert ours[0].prune_rounds == 0 and ours[0].offset == len(prompt) + 64


def quality_table(model, tokens, stats, budget):
    """Teacher-forced perplexity and mean KL vs full attention, scored after the cache first fills."""
    ref = reference_logprobs(model, tokens)
    nll_full = reference_nll(ref, tokens)

    def compressed(**options):  # the text is one long prompt: compressed as it is read
        return make_prompt_cache(model, budget, prompt_mode="chunked", **options)

    methods = {
        "triattention (per_head)": lambda: compressed(stats=stats, pruning_mode="per_head"),
        "triattention (per_layer_per_head)": lambda: compressed(stats=stats, pruning_mode="per_layer_per_head"),
        "random eviction": lambda: compressed(method="random"),
        "sinks + recent window": lambda: compressed(sinks=4, method="streamingllm"),
        "mlx-lm RotatingKVCache(keep=4)": lambda: [RotatingKVCache(budget, keep=4) for _ in model.layers],
    }
    table = {"full attention": {"ppl": perplexity(nll_full, budget), "kl": 0.0}}
    mx.random.seed(0)
    for name, make in methods.items():
        nll, kl = teacher_forced(model, tokens, make(), ref)
        table[name] = {"ppl": perplexity(nll, budget), "kl": float(kl[budget:].mean())}
    print(f"\nbudget {budget}, {len(tokens)} tokens of prose (stats from Python source)")
    for name, row in table.items():
        print(f"  {name:36s} ppl {row['ppl']:7.3f}  KL {row['kl']:.4f}")
    if os.environ.get("TRIATTN_RESULTS"):
        path = os.path.join(os.environ["TRIATTN_RESULTS"], f"quality_{len(tokens)}_{budget}.json")
        with open(path, "w") as f:
            json.dump(table, f, indent=2)
    return table


@pytest.mark.parametrize("n_tokens, budget", [
    (1024, 256),
    pytest.param(1536, 256, marks=pytest.mark.slow),
    pytest.param(4608, 512, marks=pytest.mark.slow),
])
def test_triattention_beats_random_and_rotating_cache(real_model, real_stats, n_tokens, budget):
    model, tokenizer = real_model
    tokens = tokenizer.encode(prose_text())[:n_tokens]
    table = quality_table(model, tokens, real_stats, budget)
    for mode in ("per_head", "per_layer_per_head"):
        ours = table[f"triattention ({mode})"]
        for baseline in ("random eviction", "mlx-lm RotatingKVCache(keep=4)"):
            assert ours["kl"] < 0.5 * table[baseline]["kl"], (mode, baseline)
            assert ours["ppl"] < table[baseline]["ppl"]
        assert ours["ppl"] < 1.2 * table["full attention"]["ppl"]


@pytest.mark.parametrize("mode", ["per_head", pytest.param("per_layer_per_head", marks=pytest.mark.slow)])
def test_saved_compressed_cache_continues_identically(tmp_path, real_model, real_stats, mode):
    model, tokenizer = real_model
    tokens = tokenizer.encode(prose_text())[:700]
    cache = make_prompt_cache(model, 256, stats=real_stats, window=64, divide_length=64, pruning_mode=mode,
                              prompt_mode="chunked")  # compressed while the prompt is read
    for start in range(0, len(tokens), 256):
        mx.eval(model(mx.array(tokens[start : start + 256])[None], cache=cache))
    assert cache[0].prune_rounds > 0 and cache[0].size() < 320
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache, {"note": "compressed"})
    loaded, meta = load_prompt_cache(path, return_metadata=True, model=model)
    assert meta == {"note": "compressed"}
    first = tokens[-1]
    original, reloaded = greedy(model, cache, first, 80), greedy(model, loaded, first, 80)
    assert [t for t, _ in original] == [t for t, _ in reloaded]
    for (_, a), (_, b) in zip(original, reloaded):
        np.testing.assert_array_equal(a, b)
    assert loaded[0].prune_rounds == cache[0].prune_rounds >= 2  # pruned again after loading


def test_quantized_gguf_model_answers_with_the_compressed_cache(real_stats):
    model, tokenizer = mlx_lm.load(str(smollm2_model_dir(None)))  # the 4-bit GGUF as shipped
    assert "quantization" in json.loads((smollm2_model_dir(None) / "config.json").read_text())
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    cache = make_prompt_cache(model, 256, stats=real_stats, window=32)
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12, prompt_cache=cache)
    assert "Paris" in text
