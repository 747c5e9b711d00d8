"""Decode and prefill speed and memory vs context length: full KV, TriAttention, mlx-lm's
bounded and quantized caches.

    python -m bench.speed [--quick] [--lengths 8192 32768 65536] [--budget 4096] [--decode-tokens 512]

GPU (default): a random-weight 4-bit model with Qwen3-8B's config (decodes at the real
model's speed). --quick (CPU, under 10 minutes on 2 cores): the real test model
(SmolLM2-135M, float32) at 1k and 4k tokens, budget 512 (--lengths up to 8064, its limit,
for longer; QuantizedKVCache at the first length only). Each run prefills N random tokens
in chunks (compressing as it reads), then decodes --decode-tokens tokens. Recorded per
row: prefill time and peak memory, decode rate (prefill excluded), peak memory, and the
bytes the caches hold. The ceiling no eviction method can beat is a plain
KVCache holding the budget's number of tokens (a context of --budget tokens, then the
decoded ones); mlx-lm's RotatingKVCache(budget) is timed too (on MLX CUDA it decodes slower
than that ceiling). TriAttention holds budget + 128 slots between prune rounds (the
reference's definition of the budget); a row at budget - 128 holds exactly --budget slots.
mlx-lm's QuantizedKVCache (8 and 4 bits, no eviction) is timed too. The prune share
(scoring + selection + compaction as a fraction of decode time) comes from a second
TriAttention run that synchronizes every step: a step that runs a prune round costs its
excess over the median plain step.
"""

import argparse
import json
import time
from pathlib import Path

import triattn_mlx  # noqa: F401  (OpenBLAS preload on Linux, before mlx)
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from bench.common import RESULTS, plot, write_json
from bench.kernels import qwen3_8b_4bit
from triattn_mlx import make_prompt_cache
from triattn_mlx.cache import cache_report


def prefill(model, cache, N, prefill_step=1024):
    tokens = mx.array(np.random.default_rng(0).integers(0, 1000, N + 1, dtype=np.int32))
    for start in range(0, N, prefill_step):
        logits = model(tokens[None, start : min(start + prefill_step, N)], cache=cache)
        mx.eval(logits, [c.keys for c in cache])
    return tokens[N:][None]


def timed_prefill(model, cache, N, prefill_step):
    """Prefill time and peak memory (from the cache's creation)."""
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    y = prefill(model, cache, N, prefill_step)
    seconds = time.perf_counter() - start
    return y, {"prefill_s": seconds, "prefill_tok_s": N / seconds, "prefill_peak_bytes": mx.get_peak_memory()}


def run(model, cache, N, decode_tokens, prefill_step=1024, segments=3):
    """Decode rate, pipelined as mlx-lm's generate does (one step in flight): the median of
    `segments` equal stretches of the decode (single runs on a shared GPU spread widely)."""
    y, measured = timed_prefill(model, cache, N, prefill_step)
    rounds = cache_report(cache)["prune_rounds"]
    rates = []
    for _ in range(segments):
        mx.synchronize()
        start = time.perf_counter()
        for _ in range(decode_tokens // segments):
            y = model(y, cache=cache)[:, -1:].argmax(-1)
            mx.async_eval(y)
        mx.eval(y)
        rates.append(decode_tokens // segments / (time.perf_counter() - start))
    report = cache_report(cache)
    return {**measured, "decode_tok_s": float(np.median(rates)), "segment_tok_s": rates,
            "peak_bytes": mx.get_peak_memory(), "kv_bytes": report["kv_bytes"],
            "prune_rounds": report["prune_rounds"] - rounds}


def run_per_step(model, cache, N, decode_tokens, prefill_step=1024):
    """Prune share: every step synchronized and timed; steps that ran a prune round cost
    their excess over the median of the others."""
    y = prefill(model, cache, N, prefill_step)
    times, pruned = [], []
    for _ in range(decode_tokens):
        rounds = cache_report(cache)["prune_rounds"]
        start = time.perf_counter()
        y = model(y, cache=cache)[:, -1:].argmax(-1)
        mx.eval(y)
        times.append(time.perf_counter() - start)
        pruned.append(cache_report(cache)["prune_rounds"] > rounds)
    times, pruned = np.array(times), np.array(pruned)
    base = float(np.median(times[~pruned]))
    excess = float((times[pruned] - base).sum())
    return {"decode_tok_s": decode_tokens / times.sum(), "prune_rounds": int(pruned.sum()),
            "step_median_s": base, "prune_round_s": excess / max(1, pruned.sum()),
            "prune_share": excess / float(times.sum()), "kv_bytes": cache_report(cache)["kv_bytes"]}


def test_model():
    """The real test model (SmolLM2-135M, float32) and stats calibrated on other text."""
    import mlx_lm

    from triattn_mlx import calibrate
    from support import code_text, smollm2_model_dir

    model, tokenizer = mlx_lm.load(str(smollm2_model_dir("float32")))
    return model, calibrate(model, tokenizer.encode(code_text())[:2048], source="inspect.py")


QUICK = dict(lengths=[1024, 4096], budget=512, decode_tokens=32, prefill_step=512)
FULL = dict(lengths=[8192, 32768, 65536], budget=4096, decode_tokens=512, prefill_step=1024)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, the real test model at 1k and 4k tokens")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--budget", type=int)
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--output", default=None, help="results folder (default: results/cpu with --quick, "
                                                       "else results/)")
    args = parser.parse_args()
    sizes = {**(QUICK if args.quick else FULL), **{k: v for k, v in (
        ("lengths", args.lengths), ("budget", args.budget), ("decode_tokens", args.decode_tokens)) if v}}
    budget, decode_tokens, step = sizes["budget"], sizes["decode_tokens"], sizes["prefill_step"]
    if args.quick:
        model, stats = test_model()
        name, folder = "speed-quick", Path(args.output or RESULTS / "cpu")
    else:
        model, stats = qwen3_8b_4bit(), "stats/qwen3-8b.safetensors"
        name, folder = "speed", Path(args.output or RESULTS)
    ceiling = f"full KV at {budget} tokens of context (ceiling)"
    below = f"full KV at {budget - decode_tokens} tokens of context"  # stays <= budget
    slots = f"TriAttention {budget - 128} ({budget} slots)"
    methods = {
        "full KV": lambda: [KVCache() for _ in model.layers],
        ceiling: lambda: [KVCache() for _ in model.layers],
        below: lambda: [KVCache() for _ in model.layers],
        "QuantizedKVCache 8-bit": lambda: [QuantizedKVCache(bits=8) for _ in model.layers],
        "QuantizedKVCache 4-bit": lambda: [QuantizedKVCache(bits=4) for _ in model.layers],
        f"RotatingKVCache({budget})": lambda: [RotatingKVCache(budget, keep=4) for _ in model.layers],
        f"TriAttention {budget}": lambda: make_prompt_cache(model, budget, stats),
        slots: lambda: make_prompt_cache(model, budget - 128, stats),
        f"TriAttention {budget} 4-bit": lambda: make_prompt_cache(model, budget, stats, kv_bits=4),
        # The same, each step synchronized and timed: gives the prune share.
        f"TriAttention {budget} (per-step timing)": lambda: make_prompt_cache(model, budget, stats),
    }
    left_out = {slots} if budget - 128 <= 128 else set()  # the default window (128) must fit in it
    if args.quick:  # under 10 minutes: the GPU run's extra ceiling and variant rows left out
        left_out |= {below, slots, f"TriAttention {budget} 4-bit"}
    methods = {label: make for label, make in methods.items() if label not in left_out}
    rows = []
    # Compile (JIT) the kernels every row uses, prune rounds included, before any timing
    run(model, [KVCache() for _ in model.layers], 512, 6)
    run(model, make_prompt_cache(model, 256, stats), 512, 6)
    for N in sizes["lengths"]:
        for label, make in methods.items():
            if args.quick and "Quantized" in label and N != sizes["lengths"][0]:
                continue  # its CPU prefill runs at ~16 tok/s at 4k: measured at the first length only
            cache = make()
            measure = run_per_step if "per-step" in label else run
            context = {ceiling: budget, below: budget - decode_tokens}.get(label, N)
            try:
                row = {"N": N, "method": label, "context": context,
                       **measure(model, cache, context, decode_tokens, prefill_step=step)}
            except RuntimeError as error:  # e.g. MLX CUDA lacks quantized attention's matmul shapes
                row = {"N": N, "method": label, "error": str(error).splitlines()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            # Written after every row: a later out-of-memory keeps what was measured.
            write_json(name, {"args": {**vars(args), **sizes}, "device": str(mx.default_device()), "rows": rows,
                              "model_dtype": str(model.model.norm.weight.dtype).split(".")[-1]}, folder)
            del cache
            mx.clear_cache()
    plot_speed(rows, folder=folder, name=name,
               title="SmolLM2-135M float32 (CPU)" if args.quick else "Qwen3-8B-shaped 4-bit model")


def plot_speed(rows, name="speed", title="Qwen3-8B-shaped 4-bit model", **kwargs):
    """Decode tok/s vs context per method (rows that failed, e.g. unsupported on the
    backend, are left out)."""
    with plot(name, **kwargs) as (fig, ax):
        for name in dict.fromkeys(r["method"] for r in rows if "per-step" not in r["method"]):
            pts = [(r["N"], r["decode_tok_s"]) for r in rows if r["method"] == name and "decode_tok_s" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tok/s (batch 1)")
        ax.set_title(title)
        ax.legend()

if __name__ == "__main__":
    main()
