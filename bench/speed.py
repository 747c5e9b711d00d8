"""Decode speed and KV memory vs context length: full KV, TriAttention, mlx-lm's bounded caches.

    python -m bench.speed [--lengths 8192 32768 65536] [--budget 4096] [--decode-tokens 512]

A random-weight 4-bit model with Qwen3-8B's config (decodes at the real model's speed) is
prefilled with N random tokens, then decodes --decode-tokens tokens. The decode rate
excludes prefill. A plain bounded cache of the budget's size (RotatingKVCache) is the
ceiling no eviction method can beat; TriAttention's prune rounds (every divide_length
steps) are timed by the cache itself. KV bytes are the arrays the caches hold.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, RotatingKVCache

from bench.common import plot, write_json
from bench.kernels import qwen3_8b_4bit
from triattn_mlx import make_prompt_cache
from triattn_mlx.cache import cache_report


def run(model, cache, N, decode_tokens, prefill_step=1024):
    tokens = mx.array(np.random.default_rng(0).integers(0, 1000, N + 1, dtype=np.int32))
    for start in range(0, N, prefill_step):
        logits = model(tokens[None, start : min(start + prefill_step, N)], cache=cache)
        mx.eval(logits, [c.keys for c in cache])
    report_before = cache_report(cache)
    y = tokens[N:][None]
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(decode_tokens):
        y = model(y, cache=cache)[:, -1:].argmax(-1)
        mx.async_eval(y)
    mx.eval(y)
    seconds = time.perf_counter() - start
    report = cache_report(cache)
    prune = report["prune_seconds"] - report_before["prune_seconds"]
    return {"decode_tok_s": decode_tokens / seconds, "decode_s": seconds, "prune_s": prune,
            "prune_share": prune / seconds, "kv_bytes": report["kv_bytes"],
            "prune_rounds": report["prune_rounds"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=512)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model = qwen3_8b_4bit()
    stats = "stats/qwen3-8b.safetensors"
    methods = {
        "full KV": lambda: [KVCache() for _ in model.layers],
        f"RotatingKVCache({args.budget})": lambda: [RotatingKVCache(args.budget, keep=4) for _ in model.layers],
        f"TriAttention {args.budget}": lambda: make_prompt_cache(model, args.budget, stats),
        # The same, with each prune round synchronized and timed: gives the prune share.
        f"TriAttention {args.budget} (timed prunes)": lambda: make_prompt_cache(
            model, args.budget, stats, measure_prune_time=True),
    }
    kwargs = {"folder": Path(args.output)} if args.output else {}
    rows = []
    for N in args.lengths:
        for name, make in methods.items():
            cache = make()
            row = {"N": N, "method": name, **run(model, cache, N, args.decode_tokens)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            # Written after every row: a later out-of-memory keeps what was measured.
            write_json("speed", {"args": vars(args), "device": str(mx.default_device()), "rows": rows}, **kwargs)
            del cache
            mx.clear_cache()
    with plot("speed", **kwargs) as (fig, ax):
        for name in methods:
            pts = [(r["N"], r["decode_tok_s"]) for r in rows if r["method"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tok/s (batch 1)")
        ax.set_title("Qwen3-8B-shaped 4-bit model")
        ax.legend()


if __name__ == "__main__":
    main()
