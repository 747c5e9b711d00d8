"""Fused scoring kernels and the dispatcher that picks one.

The kernel bodies live in metal/ (one source per kernel, shared verbatim by the Metal
kernel and its CUDA twin; a short prologue maps thread indices, group memory and
barriers). On an Apple GPU they run through mx.fast.metal_kernel, on an NVIDIA GPU
through mx.fast.cuda_kernel, and elsewhere (CPU) the MLX-op path in scoring.py is used.

What was verified where: the CUDA twin, for plain and quantized keys, was checked against
the MLX-op path and numpy references on an NVIDIA H100 (tests/test_kernels.py run there);
the shared body also runs on CPU threads in tests/test_kernel_emulator.py (default
suite), and the MLX-op path is checked on CPU. No Mac was available, so the Metal path
has not been run: it shares the CUDA twin's body line for line.
"""

import os
from functools import lru_cache

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


@lru_cache(maxsize=None)
def _kernel(kind, storage="plain"):
    """The score kernel for `kind` (metal/cuda) reading keys stored `plain` or `quantized`."""
    body = (SOURCES / "triattention_score.body").read_text()
    prologue = (SOURCES / f"prologue.{kind}").read_text()
    header = (SOURCES / f"loads.{kind}.h").read_text() + "\n" + (SOURCES / f"keys_{storage}.h").read_text()
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    inputs = ["keys", "weights"] if storage == "plain" else ["keys", "scales", "biases", "weights"]
    return make(name=f"triattention_score_{storage}_{kind}", input_names=inputs, output_names=["scores"],
                header=header, source=prologue + "\n" + body)


def fused_weights(w, c, pairs):
    """Pack per-query-head weights for the kernel: [H, 3, D/2] float32 (W re, W im, c).
    w: [H, D] on head_dim coordinates (as scoring.complex_to_coordinates lays it out)."""
    return mx.stack([w[:, pairs[:, 0]], w[:, pairs[:, 1]], c.astype(mx.float32)], axis=1)


def pair_style(pairs):
    """'half' or 'traditional' when the pairs are exactly that layout, else None."""
    pairs = np.asarray(pairs)
    f = np.arange(len(pairs))
    if np.array_equal(pairs, np.stack([f, f + len(pairs)], 1)):
        return "half"
    if np.array_equal(pairs, np.stack([2 * f, 2 * f + 1], 1)):
        return "traditional"
    return None


def can_fuse(keys, style):
    return style is not None and keys.shape[-1] in FUSED_HEAD_DIMS and keys.dtype in FUSED_DTYPES


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


def _launch(kernel, inputs, shape, n_heads, template, **launch):
    (scores,) = kernel(inputs=inputs, **_launch_config(shape, n_heads, tuple(template), **launch))
    return scores


@lru_cache(maxsize=1024)
def _launch_config(shape, n_heads, template, warps_per_group=8, target_warps=8192, rows=2, lanes_per_key=8):
    """Grid, groups and template for one launch; cached, since a prune round launches the
    same shapes in every layer and the host's time per launch is the kernel's largest cost
    at short contexts."""
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


def fused_scores(keys, packed, style, kind=None, lanes_per_key=None, **launch):
    """The kernel's score: keys [B, H_kv, N, D], packed [H, 3, D/2] -> [B, H, N] float32.
    Rows are read in 16-byte loads: a row-contiguous array's rows start 16-byte aligned
    (D * itemsize is a multiple of 16 for every fused head_dim; MLX buffers are aligned)."""
    B, n_kv, N, D = keys.shape
    lanes = plain_lanes_per_key(D, keys.dtype, lanes_per_key)
    template = (("T", keys.dtype), ("KT", KEY_KIND[keys.dtype]), ("D", D), ("HALF", int(style == "half")))
    return _launch(_kernel(kind or backend()), [keys, packed], (B, n_kv, N), packed.shape[0], template,
                   lanes_per_key=lanes, **launch)


def can_fuse_quantized(quantized_keys, bits, group_size, style):
    """Whether the kernel supports these quantized keys."""
    codes, scales, _ = quantized_keys
    D = codes.shape[-1] * 32 // bits
    return (style is not None and bits in FUSED_KV_BITS and D in FUSED_HEAD_DIMS
            and scales.dtype in FUSED_DTYPES and D % group_size == 0)


def fused_scores_quantized(quantized_keys, bits, group_size, packed, style, kind=None, **launch):
    """The same score read straight from quantized keys (codes [B, H_kv, N, D*bits/32] uint32,
    scales, biases [B, H_kv, N, D/group_size]), dequantized in registers."""
    codes, scales, biases = quantized_keys
    B, n_kv, N, words = codes.shape
    template = [("T", scales.dtype), ("D", words * 32 // bits), ("HALF", int(style == "half")),
                ("BITS", bits), ("GS", group_size)]
    return _launch(_kernel(kind or backend(), "quantized"), [codes, scales, biases, packed], (B, n_kv, N),
                   packed.shape[0], template, **launch)
