"""Batched decode throughput (GPU): TriAttention budget 4096 vs full KV at long context.

    python -m bench.batch [--context 32768] [--budget 4096] [--steps 256]
                          [--triattention-batches 1 8 16 32 64] [--full-batches 1 8 12]

A random-weight 4-bit model with Qwen3-8B's config (bench.kernels.qwen3_8b_4bit) decodes
`--steps` tokens for B sequences at once, each with `--context` tokens of history:
- full KV: mlx-lm's BatchKVCache holding the whole history;
- TriAttention: BatchTriAttentionKVCache holding `budget` kept tokens per sequence, which
  prunes every divide_length steps, scoring with the shipped qwen3-8b stats.
The histories are random keys/values written straight into the caches (a 32k prefill per
sequence would cost minutes and changes nothing in decode speed). Total tok/s = B * steps
/ seconds; peak memory is MLX's. A batch that does not fit is recorded with its error.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from bench.common import plot, write_json
from bench.kernels import qwen3_8b_4bit
from triattn_mlx import BatchTriAttentionKVCache, make_prompt_cache
from triattn_mlx.groups import SharedSelection

STATS = Path(__file__).resolve().parent.parent / "stats" / "qwen3-8b.safetensors"


def history(model, B, N):
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    dtype = model.model.embed_tokens.scales.dtype if hasattr(model.model.embed_tokens, "scales") else mx.float32
    return mx.random.normal((B, args.num_key_value_heads, N, head_dim), dtype=dtype)


def full_caches(model, B, N):
    caches = []
    for _ in model.layers:
        cache = BatchKVCache([0] * B)
        k = history(model, B, N)
        cache.update_and_fetch(k, k)
        mx.eval(cache.keys, cache.values)
        caches.append(cache)
    return caches


def triattention_caches(model, B, N, budget, stats=STATS):
    """Batch caches as B sequences with N tokens of history leave them: `budget` kept
    tokens each (the last `budget` positions), offset N."""
    singles = make_prompt_cache(model, budget, stats=stats)
    group = SharedSelection()
    caches = []
    for single in singles:
        cache = BatchTriAttentionKVCache(settings=single.settings, scorer=single.scorer, left_padding=[0] * B,
                                         group=group)
        k = history(model, B, budget)
        cache.update_and_fetch(k, k)  # budget < budget + divide_length: no prune yet
        cache._shift[:] = N - budget  # the held tokens are positions N - budget .. N - 1
        mx.eval(cache.keys, cache.values, cache.positions)
        caches.append(cache)
    return caches


def decode(model, caches, B, steps):
    y = mx.zeros((B, 1), dtype=mx.int32)
    y = model(y, cache=caches)[:, -1:].argmax(-1)  # warm up
    mx.eval(y)
    start = time.perf_counter()
    for _ in range(steps):
        y = model(y, cache=caches)[:, -1:].argmax(-1)
        mx.async_eval(y)
    mx.eval(y)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--triattention-batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--full-batches", type=int, nargs="+", default=[1, 8, 12])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model = qwen3_8b_4bit()
    kwargs = {"folder": Path(args.output)} if args.output else {}
    runs = [("TriAttention", B) for B in args.triattention_batches] + [("full KV", B) for B in args.full_batches]
    # Compile (JIT) what the timed runs use, a prune round included (after divide_length = 128 steps)
    decode(model, triattention_caches(model, 1, args.context, args.budget), 1, 130)
    decode(model, full_caches(model, 1, 1024), 1, 8)
    rows = []
    for method, B in runs:
        mx.clear_cache()
        mx.reset_peak_memory()
        row = {"method": method, "batch": B, "context": args.context, "steps": args.steps}
        try:
            caches = (triattention_caches(model, B, args.context, args.budget) if method == "TriAttention"
                      else full_caches(model, B, args.context))
            kv = sum(c.nbytes for c in caches)
            seconds = decode(model, caches, B, args.steps)
            row.update(total_tok_s=B * args.steps / seconds, seconds=seconds, kv_bytes=kv,
                       kv_bytes_per_sequence=kv / B, peak_memory=mx.get_peak_memory())
            if method == "TriAttention":
                row["prune_rounds_per_sequence"] = int(caches[0].prune_rounds.max())
            del caches
        except (RuntimeError, ValueError, MemoryError) as error:
            row["error"] = str(error).splitlines()[0][:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json("batch", {"args": vars(args), "device": str(mx.default_device()), "rows": rows}, **kwargs)
    best = {m: max((r["total_tok_s"] for r in rows if r["method"] == m and "total_tok_s" in r), default=None)
            for m in ("TriAttention", "full KV")}
    if all(best.values()):
        print(f"best total tok/s: TriAttention {best['TriAttention']:.0f}, full KV {best['full KV']:.0f}, "
              f"ratio {best['TriAttention'] / best['full KV']:.2f}x")
    plot_batch(rows, args.budget, args.context, **kwargs)


def plot_batch(rows, budget, context, **kwargs):
    with plot("batch", **kwargs) as (fig, ax):
        for method in ("TriAttention", "full KV"):
            pts = sorted({r["batch"]: r["total_tok_s"] for r in rows
                          if r["method"] == method and "total_tok_s" in r}.items())
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method + (f" {budget}" if method != "full KV" else ""))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences decoding at once")
        ax.set_ylabel("total decode tok/s")
        ax.set_title(f"Qwen3-8B-shaped 4-bit model, {context} tokens of context each")
        ax.legend()

if __name__ == "__main__":
    main()
