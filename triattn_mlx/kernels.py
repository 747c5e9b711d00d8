"""Fused scoring kernels and the dispatcher that picks one.

The kernel bodies live in metal/ (one source per kernel, shared verbatim by the Metal
kernel and its CUDA twin; a short prologue maps thread indices, group memory and
barriers). On an Apple GPU they run through mx.fast.metal_kernel, on an NVIDIA GPU
through mx.fast.cuda_kernel, and elsewhere (CPU) the MLX-op path in scoring.py is used.

What was verified where: the CUDA twin, for plain and quantized keys, was checked against
the MLX-op path and numpy references on an NVIDIA H100 (tests/test_kernels.py run there);
the shared body also runs on CPU threads in tests/test_kernel_emulator.py (default
suite), and the MLX-op path is checked on CPU. No Mac was available, so the Metal path
has not been run: it shares the CUDA twin's body line for line, and the Metal source MLX
generates for every instantiation launched here is syntax-checked with clang against a
shim of Metal's standard library (msl_check.py, default suite).

Before an instantiation scores real keys it scores a small random problem once and is
compared with the MLX-op path (self_test); if it fails to compile or disagrees, this
process scores that configuration with MLX ops (the same scores, slower) and says so once.
"""

import os
import sys
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ._data import data_dir

SOURCES = data_dir("triattn_mlx.kernel_sources", "metal")
FUSED_HEAD_DIMS = (64, 128, 256)
FUSED_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def backend():
    """'metal', 'cuda' or 'mlx' (MLX ops); TRIATTN_KERNEL=mlx forces the op path."""
    if os.environ.get("TRIATTN_KERNEL") == "mlx":
        return "mlx"
    if mx.default_device() == mx.cpu:
        return "mlx"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "mlx"


FUSED_KV_BITS = (2, 4, 8)  # bit widths whose codes never straddle a 32-bit word


def kernel_spec(kind, storage="plain", sources=SOURCES):
    """What mx.fast.metal_kernel (kind 'metal') or cuda_kernel ('cuda') is given for the
    score kernel reading keys stored `plain` or `quantized`, from the files in `sources`."""
    body = (sources / "triattention_score.body").read_text()
    prologue = (sources / f"prologue.{kind}").read_text()
    header = (sources / f"loads.{kind}.h").read_text() + "\n" + (sources / f"keys_{storage}.h").read_text()
    inputs = ["keys", "weights"] if storage == "plain" else ["keys", "scales", "biases", "weights"]
    return dict(name=f"triattention_score_{storage}_{kind}", input_names=inputs, output_names=["scores"],
                header=header, source=prologue + "\n" + body)


@lru_cache(maxsize=None)
def _kernel(kind, storage="plain"):
    """The score kernel for `kind` (metal/cuda) reading keys stored `plain` or `quantized`."""
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    return make(**kernel_spec(kind, storage))


def fused_weights(w, c, pairs):
    """Pack per-query-head weights for the kernel: [H, 3, D/2] float32 (W re, W im, c).
    w: [H, D] on head_dim coordinates (as scoring.complex_to_coordinates lays it out)."""
    return mx.stack([w[:, pairs[:, 0]], w[:, pairs[:, 1]], c.astype(mx.float32)], axis=1)


def pair_style(pairs):
    """'half' or 'traditional' when the pairs are exactly that layout, else None."""
    pairs = np.asarray(pairs)
    if np.array_equal(pairs, pair_layout("half", 2 * len(pairs))):
        return "half"
    if np.array_equal(pairs, pair_layout("traditional", 2 * len(pairs))):
        return "traditional"
    return None


def pair_layout(style, head_dim):
    """The pairs [D/2, 2] of a layout: 'half' (f, f + D/2) or 'traditional' (2f, 2f + 1)."""
    f = np.arange(head_dim // 2)
    return np.stack([f, f + head_dim // 2], 1) if style == "half" else np.stack([2 * f, 2 * f + 1], 1)


def can_fuse(keys, style):
    return (style is not None and keys.shape[-1] in FUSED_HEAD_DIMS and keys.dtype in FUSED_DTYPES
            and (not disabled or _usable(backend(), "plain", plain_template(keys.dtype, keys.shape[-1], style))))


KEY_KIND = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}  # the kernel's KT


@lru_cache(maxsize=None)
def plain_lanes_per_key(head_dim, dtype, lanes_per_key=None):
    """Lanes that share one key (the kernel's SUB) for plain keys: each lane loads its run
    of D/2 / SUB consecutive elements in 16-byte loads, so the run must fill them. The
    default gives every lane one 16-byte load per half of its pairs."""
    lanes = lanes_per_key or min(32, head_dim // 2 * dtype.size // 16)
    if lanes not in (1, 2, 4, 8, 16, 32) or (head_dim // 2 // lanes) * dtype.size % 16:
        raise ValueError(f"lanes_per_key={lanes} does not split head_dim {head_dim} ({dtype}) into 16-byte runs")
    return lanes


class Launch(NamedTuple):
    """One launch of the score kernel: which keys header it reads through, its inputs (in
    kernel_spec's input_names order) and the rest of the kernel call (template, grid, ...)."""
    storage: str  # 'plain' or 'quantized'
    inputs: list
    config: dict


def plain_template(dtype, head_dim, style):
    """The template arguments fixed by the keys (the launch adds G, SUB and ROWS)."""
    return (("T", dtype), ("KT", KEY_KIND[dtype]), ("D", head_dim), ("HALF", int(style == "half")))


def quantized_template(dtype, head_dim, style, bits, group_size):
    return (("T", dtype), ("D", head_dim), ("HALF", int(style == "half")), ("BITS", bits), ("GS", group_size))


@lru_cache(maxsize=1024)
def _launch_config(shape, n_heads, template, warps_per_group=8, target_warps=8192, rows=2, lanes_per_key=8):
    """Grid, groups and template for one launch; cached, since a prune round launches the
    same shapes in every layer and the host's time per launch is the kernel's largest cost
    at short contexts. (Shared by every launch of that shape: never modified.)"""
    B, n_kv, N = shape
    # Enough warps to fill the GPU, each looping over several keys (`rows` blocks of
    # 32 / lanes_per_key keys per pass, their loads issued together) so that a group's
    # weight load is amortized over many keys.
    block = 32 // lanes_per_key
    keys_per_warp = max(block, min(64, B * n_kv * N // target_warps))
    warps_y = -(-N // (keys_per_warp * warps_per_group)) * warps_per_group
    return dict(
        template=[*template, ("G", n_heads // n_kv), ("SUB", lanes_per_key),
                  ("ROWS", max(1, min(rows, keys_per_warp // block)))],
        grid=(32, warps_y, B * n_kv),
        threadgroup=(32, warps_per_group, 1),
        output_shapes=[(B, n_heads, N)],
        output_dtypes=[mx.float32],
    )


def plain_launch(keys, packed, style, lanes_per_key=None, **launch):
    B, n_kv, N, D = keys.shape
    lanes = plain_lanes_per_key(D, keys.dtype, lanes_per_key)
    return Launch("plain", [keys, packed], _launch_config(
        (B, n_kv, N), packed.shape[0], plain_template(keys.dtype, D, style), lanes_per_key=lanes, **launch))


def quantized_launch(quantized_keys, bits, group_size, packed, style, **launch):
    codes, scales, biases = quantized_keys
    B, n_kv, N, words = codes.shape
    template = quantized_template(scales.dtype, words * 32 // bits, style, bits, group_size)
    return Launch("quantized", [codes, scales, biases, packed],
                  _launch_config((B, n_kv, N), packed.shape[0], template, **launch))


def fused_scores(keys, packed, style, kind=None, lanes_per_key=None, **launch):
    """The kernel's score: keys [B, H_kv, N, D], packed [H, 3, D/2] -> [B, H, N] float32.
    Rows are read in 16-byte loads: a row-contiguous array's rows start 16-byte aligned
    (D * itemsize is a multiple of 16 for every fused head_dim; MLX buffers are aligned)."""
    return _score(kind or backend(), plain_launch(keys, packed, style, lanes_per_key, **launch))


def can_fuse_quantized(quantized_keys, bits, group_size, style):
    """Whether the kernel supports these quantized keys."""
    codes, scales, _ = quantized_keys
    D = codes.shape[-1] * 32 // bits
    return (style is not None and bits in FUSED_KV_BITS and D in FUSED_HEAD_DIMS
            and scales.dtype in FUSED_DTYPES and D % group_size == 0
            and (not disabled
                 or _usable(backend(), "quantized", quantized_template(scales.dtype, D, style, bits, group_size))))


def fused_scores_quantized(quantized_keys, bits, group_size, packed, style, kind=None, **launch):
    """The same score read straight from quantized keys (codes [B, H_kv, N, D*bits/32] uint32,
    scales, biases [B, H_kv, N, D/group_size]), dequantized in registers."""
    return _score(kind or backend(), quantized_launch(quantized_keys, bits, group_size, packed, style, **launch))


def ops_scores(launch):
    """What the kernel computes, by the MLX-op path (scoring.triattention_scores, on
    mx.dequantize'd keys for quantized storage): [B, H, N] float32."""
    from .scoring import triattention_scores  # scoring imports this module

    t = dict(launch.config["template"])
    *keys, packed = launch.inputs
    keys = keys[0] if launch.storage == "plain" else mx.dequantize(*keys, group_size=t["GS"], bits=t["BITS"])
    H, D = packed.shape[0], t["D"]
    w_re, w_im, c = packed[:, 0], packed[:, 1], packed[:, 2]
    # fused_weights' inverse: W back on head_dim coordinates
    w = mx.concatenate([w_re, w_im], -1) if t["HALF"] else mx.stack([w_re, w_im], -1).reshape(H, D)
    pairs = mx.array(pair_layout("half" if t["HALF"] else "traditional", D))
    return triattention_scores(keys, w, c, pairs)


def _score(kind, launch):
    template = launch.config["template"]
    if kind == "mlx" or (disabled and not _usable(kind, launch.storage, template)):
        return ops_scores(launch)
    key = (kind, launch.storage, tuple(template), launch.config["threadgroup"])
    if key not in self_tests:
        self_tests[key] = self_test(kind, launch.storage, launch.config)
        if self_tests[key] is not None:
            _disable(kind, launch.storage, template, self_tests[key])
            return ops_scores(launch)
    (scores,) = _kernel(kind, launch.storage)(inputs=launch.inputs, **launch.config)
    fused_launches[(kind, launch.storage)] += 1
    return scores


fused_launches = Counter()  # (kind, storage) -> launches that scored real keys (the doctor reports them)


# Self-test on first use. A kernel instantiation (kind, storage, template, group shape)
# runs once on a small random problem before it scores real keys; one that raises (a
# compile error surfaces when the result is evaluated) or disagrees with the MLX-op path
# turns the fused kernel off for its keys' configuration (kind, storage, dtype, head_dim,
# pair layout, bits, group size) for the rest of the process: can_fuse* then answer False
# and fused_scores* return the MLX-op path's scores.
SELF_TEST_TOLERANCE = 1e-3  # |fused - MLX ops| <= this * max |MLX ops| (float32 rounding alone: ~1e-6)
REPORT = ("please report it with the output of `python -m triattn_mlx.doctor` "
          "on the triattn-mlx issue tracker")
self_tests = {}  # (kind, storage, template, threadgroup) -> None (passed) or why it failed
disabled = {}  # (kind, storage, keys' template) -> why
_warned = []  # one warning per process


def _keys_template(template):
    return tuple((name, value) for name, value in template if name not in ("G", "SUB", "ROWS"))


def _usable(kind, storage, template):
    return (kind, storage, _keys_template(template)) not in disabled


def describe(storage, template):
    """'plain keys, T=float16 D=128 HALF=1 G=4 SUB=8 ROWS=2' (KT, which repeats T, left out)."""
    args = " ".join(f"{n}={str(v).replace('mlx.core.', '')}" for n, v in template if n != "KT")
    return f"{storage} keys, {args}"


def _disable(kind, storage, template, reason):
    disabled[(kind, storage, _keys_template(template))] = reason
    if not _warned:
        _warned.append(reason)
        print(f"triattn-mlx: warning: the fused {kind} score kernel failed its self-test "
              f"({describe(storage, template)}: {reason}); scoring with MLX ops for the rest of this "
              f"process (same scores, slower); {REPORT}", file=sys.stderr, flush=True)


def self_test(kind, storage, config, seed=0):
    """Run the kernel instantiation of `config` on a small random problem (2 KV heads, two
    passes of every warp and a ragged last block) and compare it with the MLX-op path.
    None if it agrees within SELF_TEST_TOLERANCE, else a one-line reason."""
    t = dict(config["template"])
    D, G, warps = t["D"], t["G"], config["threadgroup"][1]
    n_kv, N = 2, 2 * warps * t["ROWS"] * (32 // t["SUB"]) + 3
    rng = np.random.default_rng(seed)
    keys = mx.array(rng.standard_normal((1, n_kv, N, D), dtype=np.float32)).astype(t["T"])
    packed = mx.array(rng.standard_normal((n_kv * G, 3, D // 2), dtype=np.float32))
    run = dict(config, grid=(32, warps, n_kv), output_shapes=[(1, n_kv * G, N)])
    if storage == "plain":
        inputs = reference = [keys, packed]
    else:
        codes, scales, biases = mx.quantize(keys, group_size=t["GS"], bits=t["BITS"])
        inputs = [codes, scales, biases, packed]
        # dequantized in float32, as the kernel does (mx.dequantize would round to T)
        reference = [codes, scales.astype(mx.float32), biases.astype(mx.float32), packed]
    expected = np.array(ops_scores(Launch(storage, reference, run)))
    try:
        (scores,) = _kernel(kind, storage)(inputs=inputs, **run)
        scores = np.array(scores)  # compiles and runs it: errors surface here
    except Exception as e:  # noqa: BLE001  (any failure means: do not use this kernel)
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())  # one line
        return f"{type(e).__name__}: {message[:400]}"
    if scores.shape != expected.shape:
        return f"scores of shape {scores.shape}, expected {expected.shape}"
    error = float(np.nan_to_num(np.abs(scores - expected), nan=np.inf).max())
    bound = SELF_TEST_TOLERANCE * float(np.abs(expected).max())
    if not error <= bound:
        return f"max |fused - MLX ops| = {error:.3g} > {bound:.3g}"
    return None


def example_launches(groups=(1, 4), rows=(1, 2), bits=FUSED_KV_BITS, group_sizes=(32, 64, 128),
                     storages=("plain", "quantized")):
    """A launch of every instantiation the package runs for `groups` query heads per KV
    head and `rows` key blocks per pass (kernels' default lanes per key), on small keys that
    are never evaluated: what msl_check compiles and the doctor self-tests."""
    launches = []
    for dtype in FUSED_DTYPES:
        for D in FUSED_HEAD_DIMS:
            for style in ("half", "traditional"):
                for G in groups:
                    for per_pass in rows:
                        # ROWS=2 needs keys to spare per warp: target_warps=1 gives each warp 64
                        shape = dict(rows=per_pass, target_warps=1 if per_pass > 1 else 8192)
                        keys = mx.zeros((1, 2, 64, D), dtype)
                        packed = mx.zeros((2 * G, 3, D // 2), mx.float32)
                        if "plain" in storages:
                            launches.append(plain_launch(keys, packed, style, **shape))
                        for b in bits if "quantized" in storages else ():
                            for gs in group_sizes:
                                if D % gs == 0:
                                    q = mx.quantize(keys, group_size=gs, bits=b)
                                    launches.append(quantized_launch(q, b, gs, packed, style, **shape))
    return launches
