"""Scoring cost on a GPU: achieved bandwidth of the fused kernel vs the MLX-op path.

    python -m bench.kernels [--lengths 4096 16384 65536] [--decode]

Qwen3-8B attention shapes (36 layers x 8 KV heads x head_dim 128, 32 query heads, fp16
keys). Bandwidth = bytes of keys read / time, next to the device's copy bandwidth
(measured here: (read + write bytes) / time of a large copy). Three ways of timing the
fused kernel: one launch per layer as a prune round runs it (`fused`, which includes the
host's fixed cost per launch), one launch over all layers' keys (`fused_one_launch`), and
four such launches per evaluation so that the host's work overlaps the GPU's
(`fused_device`: the kernel's own bandwidth). The fixed cost per launch is measured on
36 launches over 64 keys, next to 36 one-element MLX additions. --decode also times one
decode step of a random-weight 4-bit Qwen3-8B-shaped model at each length, so the
scoring cost can be read as a fraction of a decode step.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench.common import plot, write_json
from triattn_mlx import kernels
from triattn_mlx.scoring import triattention_scores

LAYERS, KV_HEADS, HEADS, HEAD_DIM = 36, 8, 32, 128


def timed(fn, repeats=20):
    fn()  # warm up / compile
    mx.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(gigabytes=2.0):
    x = mx.random.normal((int(gigabytes * 2**30 / 2),)).astype(mx.float16)
    mx.eval(x)
    seconds = timed(lambda: mx.eval(x + 0), repeats=10)
    return 2 * x.nbytes / seconds  # read + write


def layer_inputs(N, dtype=mx.float16):
    keys = [mx.random.normal((1, KV_HEADS, N, HEAD_DIM)).astype(dtype) for _ in range(LAYERS)]
    w = mx.random.normal((HEADS, HEAD_DIM))
    c = mx.random.normal((HEADS, HEAD_DIM // 2))
    f = np.arange(HEAD_DIM // 2)
    pairs = mx.array(np.stack([f, f + HEAD_DIM // 2], 1))
    mx.eval(keys, w, c, pairs)
    return keys, w, c, pairs


def qwen3_8b_bfloat16(**config):
    """A random-weight bfloat16 model with Qwen3-8B's config, fields of `config` replaced
    (smaller widths keep its attention geometry: 36 layers, 32 / 8 heads, head_dim 128)."""
    from mlx_lm.models import qwen3

    base = json.loads((Path(__file__).resolve().parent.parent / "stats/configs/qwen3-8b.json").read_text())
    model = qwen3.Model(qwen3.ModelArgs.from_dict({**base, **config}))
    model.set_dtype(mx.bfloat16)
    return model


def qwen3_8b_4bit():
    """A random-weight 4-bit model with Qwen3-8B's config, in bfloat16 like the published
    mlx-community conversion (so its KV cache is bfloat16 too): decodes at the real
    model's speed. (Runs before this change used float32: twice the KV bytes.)"""
    import mlx.nn as nn

    model = qwen3_8b_bfloat16()
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def decode_step_seconds(model, N):
    """One decode step of `model` with N cached tokens."""
    from mlx_lm.models.cache import KVCache

    cache = [KVCache() for _ in model.layers]
    for c in cache:
        k = mx.random.normal((1, KV_HEADS, N, HEAD_DIM)).astype(mx.float16)
        c.update_and_fetch(k, k)
        mx.eval(c.keys, c.values)
    token = mx.array([[1]])

    def step():
        mx.eval(model(token, cache=cache))
        for c in cache:
            c.trim(1)

    return timed(step, repeats=10)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4],
                        help="key blocks per warp pass to compare (the kernel's default is 2)")
    parser.add_argument("--lanes", type=int, nargs="+", default=[4, 8],
                        help="lanes per key to compare (the kernel's default for fp16 head_dim 128 is 8)")
    parser.add_argument("--output", default=None, help="results folder (default: results/)")
    args = parser.parse_args()
    kind = kernels.backend()
    copy = copy_bandwidth()
    print(f"device {mx.default_device()}, kernel backend {kind}, copy bandwidth {copy / 1e9:.0f} GB/s")
    model = qwen3_8b_4bit() if args.decode else None
    launch = {}
    if kind != "mlx":
        keys, w, c, pairs = layer_inputs(64)
        packed = kernels.fused_weights(w, c, pairs)
        launch["fused_36_launches_of_64_keys_us"] = 1e6 * timed(
            lambda: mx.eval([kernels.fused_scores(k, packed, "half") for k in keys]))
        ones = [mx.zeros((1,)) for _ in range(LAYERS)]
        launch["mlx_36_additions_us"] = 1e6 * timed(lambda: mx.eval([x + 1 for x in ones]))
        print(json.dumps(launch))
    rows = []
    for N in args.lengths:
        keys, w, c, pairs = layer_inputs(N)
        nbytes = sum(k.nbytes for k in keys)
        packed = kernels.fused_weights(w, c, pairs)
        row = {"N": N, "key_bytes": nbytes}
        row["mlx_ops_s"] = timed(lambda: mx.eval([triattention_scores(k, w, c, pairs) for k in keys]))
        if kind != "mlx":
            row["fused_s"] = timed(lambda: mx.eval([kernels.fused_scores(k, packed, "half") for k in keys]))
            # Launch-parameter sweep, and all layers in one launch (no per-launch overhead)
            for lanes in args.lanes:
                for per_pass in args.rows:
                    seconds = timed(lambda: mx.eval([
                        kernels.fused_scores(k, packed, "half", rows=per_pass, lanes_per_key=lanes) for k in keys]))
                    row[f"fused_lanes{lanes}_rows{per_pass}_GBps"] = nbytes / seconds / 1e9
            stacked = mx.concatenate(keys, axis=0)
            mx.eval(stacked)
            seconds = timed(lambda: mx.eval(kernels.fused_scores(stacked, packed, "half")))
            row["fused_one_launch_GBps"] = nbytes / seconds / 1e9
            seconds = timed(lambda: mx.eval([kernels.fused_scores(stacked, packed, "half") for _ in range(4)]))
            row["fused_device_GBps"] = 4 * nbytes / seconds / 1e9
            row["fused_device_of_copy"] = row["fused_device_GBps"] * 1e9 / copy
            del stacked
        # 4-bit keys (group 64): bytes read are the codes, scales and biases
        quantized = [mx.quantize(k, group_size=64, bits=4) for k in keys]
        mx.eval(quantized)
        row["q4_key_bytes"] = q4_bytes = sum(x.nbytes for q in quantized for x in q)
        row["q4_mlx_ops_s"] = timed(lambda: mx.eval([
            triattention_scores(mx.dequantize(*q, group_size=64, bits=4), w, c, pairs) for q in quantized]))
        if kind != "mlx":
            row["q4_fused_s"] = timed(lambda: mx.eval([
                kernels.fused_scores_quantized(q, 4, 64, packed, "half") for q in quantized]))
        for path in ("mlx_ops", "fused", "q4_mlx_ops", "q4_fused"):
            if f"{path}_s" in row:
                read = q4_bytes if path.startswith("q4") else nbytes
                row[f"{path}_GBps"] = read / row[f"{path}_s"] / 1e9
                row[f"{path}_of_copy"] = read / row[f"{path}_s"] / copy
        if args.decode:
            row["decode_step_s"] = decode_step_seconds(model, N)
            row["fused_share_of_decode_step"] = row.get("fused_s", row["mlx_ops_s"]) / row["decode_step_s"]
        rows.append(row)
        print(json.dumps(row))
    if kernels.disabled:  # then the fused rows timed the MLX-op path
        raise SystemExit(f"the fused kernel failed its self-test: {kernels.disabled}")
    out = Path(args.output) if args.output else None
    kwargs = {"folder": out} if out else {}
    write_json("kernels", {"copy_GBps": copy / 1e9, "backend": kind, "launch_cost": launch, "rows": rows}, **kwargs)
    with plot("kernels", **kwargs) as (fig, ax):
        x = np.arange(len(rows))
        paths = [p for p in ("mlx_ops", "fused", "fused_device", "q4_mlx_ops", "q4_fused") if f"{p}_GBps" in rows[0]]
        for i, path in enumerate(paths):
            ax.bar(x + 0.16 * i, [r[f"{path}_GBps"] for r in rows], width=0.16, label=path)
        ax.axhline(copy / 1e9, color="k", linestyle="--", label="copy bandwidth")
        ax.axhline(0.7 * copy / 1e9, color="k", linestyle=":", label="70% of copy")
        ax.set_xticks(x + 0.08 * (len(paths) - 1), [f"N={r['N']}" for r in rows])
        ax.set_ylabel("GB/s of keys read")
        ax.set_title(f"TriAttention scoring, Qwen3-8B shapes ({mx.default_device()})")
        ax.legend()


if __name__ == "__main__":
    main()
