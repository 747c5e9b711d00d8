"""Decode speed and KV memory vs context length: full KV, TriAttention, mlx-lm's bounded caches.

    python -m bench.speed [--lengths 8192 32768 65536] [--budget 4096] [--decode-tokens 512]

A random-weight 4-bit model with Qwen3-8B's config (decodes at the real model's speed) is
prefilled with N random tokens, then decodes --decode-tokens tokens. The decode rate
excludes prefill. The ceiling no eviction method can beat is a plain KVCache holding the
budget's number of tokens (a context of --budget tokens, then the decoded ones); mlx-lm's
RotatingKVCache(budget) is timed too (on MLX CUDA it decodes slower than that ceiling).
TriAttention holds budget + 128 slots between prune rounds (the reference's definition of
the budget); a row at budget - 128 holds exactly --budget slots. mlx-lm's QuantizedKVCache (8 and 4 bits, no eviction)
is timed too. The prune share (scoring + selection + compaction as a fraction of decode
time) comes from a second TriAttention run that synchronizes every step: a step that runs
a prune round costs its excess over the median plain step. KV bytes are the arrays the
caches hold.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

from bench.common import plot, write_json
from bench.kernels import qwen3_8b_4bit
from triattn_mlx import make_prompt_cache
from triattn_mlx.cache import cache_report


def prefill(model, cache, N, prefill_step=1024):
    tokens = mx.array(np.random.default_rng(0).integers(0, 1000, N + 1, dtype=np.int32))
    for start in range(0, N, prefill_step):
        logits = model(tokens[None, start : min(start + prefill_step, N)], cache=cache)
        mx.eval(logits, [c.keys for c in cache])
    return tokens[N:][None]


def run(model, cache, N, decode_tokens, segments=3):
    """Decode rate, pipelined as mlx-lm's generate does (one step in flight): the median of
    `segments` equal stretches of the decode (single runs on a shared GPU spread widely)."""
    y = prefill(model, cache, N)
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
    return {"decode_tok_s": float(np.median(rates)), "segment_tok_s": rates, "kv_bytes": report["kv_bytes"],
            "prune_rounds": report["prune_rounds"] - rounds}


def run_per_step(model, cache, N, decode_tokens):
    """Prune share: every step synchronized and timed; steps that ran a prune round cost
    their excess over the median of the others."""
    y = prefill(model, cache, N)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=512)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model = qwen3_8b_4bit()
    stats = "stats/qwen3-8b.safetensors"
    ceiling = f"full KV at {args.budget} tokens of context (ceiling)"
    below = f"full KV at {args.budget - args.decode_tokens} tokens of context"  # stays <= budget
    methods = {
        "full KV": lambda: [KVCache() for _ in model.layers],
        ceiling: lambda: [KVCache() for _ in model.layers],
        below: lambda: [KVCache() for _ in model.layers],
        "QuantizedKVCache 8-bit": lambda: [QuantizedKVCache(bits=8) for _ in model.layers],
        "QuantizedKVCache 4-bit": lambda: [QuantizedKVCache(bits=4) for _ in model.layers],
        f"RotatingKVCache({args.budget})": lambda: [RotatingKVCache(args.budget, keep=4) for _ in model.layers],
        f"TriAttention {args.budget}": lambda: make_prompt_cache(model, args.budget, stats),
        f"TriAttention {args.budget - 128} ({args.budget} slots)": lambda: make_prompt_cache(
            model, args.budget - 128, stats),
        f"TriAttention {args.budget} 4-bit": lambda: make_prompt_cache(model, args.budget, stats, kv_bits=4),
        # The same, each step synchronized and timed: gives the prune share.
        f"TriAttention {args.budget} (per-step timing)": lambda: make_prompt_cache(model, args.budget, stats),
    }
    kwargs = {"folder": Path(args.output)} if args.output else {}
    rows = []
    # Compile (JIT) the kernels every row uses, prune rounds included, before any timing
    run(model, [KVCache() for _ in model.layers], 1024, 48)
    run(model, make_prompt_cache(model, 256, stats), 1024, 48)
    for N in args.lengths:
        for name, make in methods.items():
            cache = make()
            measure = run_per_step if "per-step" in name else run
            context = {ceiling: args.budget, below: args.budget - args.decode_tokens}.get(name, N)
            try:
                row = {"N": N, "method": name, "context": context,
                       **measure(model, cache, context, args.decode_tokens)}
            except RuntimeError as error:  # e.g. MLX CUDA lacks quantized attention's matmul shapes
                row = {"N": N, "method": name, "error": str(error).splitlines()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            # Written after every row: a later out-of-memory keeps what was measured.
            write_json("speed", {"args": vars(args), "device": str(mx.default_device()), "rows": rows,
                                 "model_dtype": str(model.model.norm.weight.dtype).split(".")[-1]}, **kwargs)
            del cache
            mx.clear_cache()
    plot_speed(rows, **kwargs)


def plot_speed(rows, **kwargs):
    """Decode tok/s vs context per method (rows that failed, e.g. unsupported on the
    backend, are left out)."""
    with plot("speed", **kwargs) as (fig, ax):
        for name in dict.fromkeys(r["method"] for r in rows if "per-step" not in r["method"]):
            pts = [(r["N"], r["decode_tok_s"]) for r in rows if r["method"] == name and "decode_tok_s" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tok/s (batch 1)")
        ax.set_title("Qwen3-8B-shaped 4-bit model")
        ax.legend()

if __name__ == "__main__":
    main()
