"""Fused scoring kernel: CUDA twin (on an NVIDIA GPU) and Metal (on a Mac) against the
MLX-op path and a numpy reference. The MLX-op path is checked everywhere."""

import sys

import mlx.core as mx
import numpy as np
import pytest

from triattn_mlx import kernels
from triattn_mlx.scoring import QuantizedKeys, triattention_scores

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def numpy_reference(keys, w, c, pairs):
    """score[b, h, n] = sum_f W_re k_re + W_im k_im + c |k_f| on float64."""
    k = np.array(keys.astype(mx.float32), dtype=np.float64)  # [B, H_kv, N, D]
    B, n_kv, N, D = k.shape
    H = w.shape[0]
    re, im = k[..., pairs[:, 0]], k[..., pairs[:, 1]]
    mag = np.sqrt(re**2 + im**2)
    out = np.zeros((B, H, N))
    for h in range(H):
        g = h // (H // n_kv)
        out[:, h] = (re[:, g] @ w[h, pairs[:, 0]] + im[:, g] @ w[h, pairs[:, 1]] + mag[:, g] @ c[h])
    return out


def case(D, G, style, dtype, N=300, n_kv=2, B=1, seed=0):
    rng = np.random.default_rng(seed)
    keys = mx.array(rng.normal(size=(B, n_kv, N, D)).astype(np.float32)).astype(DTYPES[dtype])
    w = rng.normal(size=(n_kv * G, D)).astype(np.float32)
    c = rng.normal(size=(n_kv * G, D // 2)).astype(np.float32)
    f = np.arange(D // 2)
    pairs = np.stack([f, f + D // 2], 1) if style == "half" else np.stack([2 * f, 2 * f + 1], 1)
    return keys, w, c, pairs


def tolerance(dtype, ref):
    return 2e-5 * np.abs(ref).max() if dtype == "float32" else 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("style", ["half", "traditional"])
@pytest.mark.parametrize("D", kernels.FUSED_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlx_op_path_matches_numpy(dtype, D, style):
    keys, w, c, pairs = case(D, 4, style, dtype, N=200)
    ref = numpy_reference(keys, w, c, pairs)
    got = np.array(triattention_scores(keys, mx.array(w), mx.array(c), mx.array(pairs)))
    np.testing.assert_allclose(got, ref, atol=tolerance(dtype, ref))


def test_pair_style_and_packing():
    f = np.arange(4)
    assert kernels.pair_style(np.stack([f, f + 4], 1)) == "half"
    assert kernels.pair_style(np.stack([2 * f, 2 * f + 1], 1)) == "traditional"
    assert kernels.pair_style(np.array([[0, 2], [1, 3], [4, 5], [6, 7]])) is None
    w, c = mx.arange(16.0).reshape(2, 8), mx.ones((2, 4))
    packed = kernels.fused_weights(w, c, mx.array(np.stack([f, f + 4], 1)))
    assert packed.shape == (2, 3, 4)
    np.testing.assert_array_equal(np.array(packed[1, 1]), [12, 13, 14, 15])


GPU = kernels.backend()
needs_gpu = pytest.mark.skipif(
    GPU == "mlx",
    reason=("the fused kernel needs an Apple GPU (Metal) or an NVIDIA GPU (CUDA twin); "
            f"this is {sys.platform} on {mx.default_device()}: only the MLX-op path runs here"))


# The default launch gives these small cases one key per warp; target_warps=64 gives each
# warp 32 keys, 4 per pass (the kernel's ROWS), with a ragged last pass.
LAUNCHES = {"one_key_per_warp": {}, "four_keys_per_pass": {"target_warps": 64, "rows": 4}}


@needs_gpu
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("style", ["half", "traditional"])
@pytest.mark.parametrize("D", kernels.FUSED_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_kernel_matches_mlx_ops_and_numpy(dtype, D, style, G, launch):
    keys, w, c, pairs = case(D, G, style, dtype, N=1001 + D, n_kv=2, B=2)
    ref = numpy_reference(keys, w, c, pairs)
    ops = np.array(triattention_scores(keys, mx.array(w), mx.array(c), mx.array(pairs)))
    packed = kernels.fused_weights(mx.array(w), mx.array(c), mx.array(pairs))
    fused = np.array(kernels.fused_scores(keys, packed, style, **LAUNCHES[launch]))
    assert not kernels.disabled, kernels.disabled  # else `fused` is the MLX-op path's
    np.testing.assert_allclose(fused, ref, atol=tolerance(dtype, ref))
    np.testing.assert_allclose(fused, ops, atol=tolerance(dtype, ref))


def quantized_case(D, G, style, dtype, bits, group_size, N=300, n_kv=2, B=1):
    keys, w, c, pairs = case(D, G, style, dtype, N=N, n_kv=n_kv, B=B)
    quantized = QuantizedKeys(*mx.quantize(keys, group_size=group_size, bits=bits), bits, group_size)
    return quantized, w, c, pairs


def numpy_dequantize(keys):
    """mx.quantize's layout decoded in float64: element j of a row is bits (j % per_word) *
    bits of word j // per_word, times its group's scale, plus its bias."""
    codes = np.array(keys.codes).astype(np.uint64)
    per_word = 32 // keys.bits
    shifts = (np.arange(per_word) * keys.bits).astype(np.uint64)
    q = (codes[..., None] >> shifts) & np.uint64((1 << keys.bits) - 1)
    q = q.reshape(*codes.shape[:-1], -1).astype(np.float64)
    scales = np.repeat(np.array(keys.scales.astype(mx.float32), dtype=np.float64), keys.group_size, axis=-1)
    biases = np.repeat(np.array(keys.biases.astype(mx.float32), dtype=np.float64), keys.group_size, axis=-1)
    return q * scales + biases


def magnitude_bound(keys, w, c, pairs):
    """sum_f |W_re k_re| + |W_im k_im| + |c| |k_f|: what rounding errors scale with."""
    return numpy_reference(mx.array(np.abs(keys).astype(np.float32)), np.abs(w), np.abs(c), pairs)


ROUNDING = {"float16": 2**-10, "bfloat16": 2**-7, "float32": 2**-20}


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (2, 64)])
def test_numpy_dequantize_decodes_mx_quantize(bits, group_size):
    keys, *_ = quantized_case(128, 4, "half", "float32", bits, group_size)
    np.testing.assert_allclose(numpy_dequantize(keys), np.array(keys.dequantize()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_quantized_keys_on_the_mlx_op_path_score_as_their_dequantized_values(bits, group_size):
    keys, w, c, pairs = quantized_case(128, 4, "half", "float16", bits, group_size)
    exact = numpy_dequantize(keys)
    ref = numpy_reference(mx.array(exact.astype(np.float32)), w, c, pairs)
    got = np.array(triattention_scores(keys.dequantize(), mx.array(w), mx.array(c), mx.array(pairs)))
    # mx.dequantize rounds each value to float16 before scoring
    np.testing.assert_array_less(np.abs(got - ref), 2 * ROUNDING["float16"] * magnitude_bound(exact, w, c, pairs))


@needs_gpu
@pytest.mark.parametrize("bits,group_size", [(4, 64), (4, 32), (8, 64), (8, 128), (2, 64)])
@pytest.mark.parametrize("style", ["half", "traditional"])
@pytest.mark.parametrize("D", kernels.FUSED_HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_quantized_kernel_matches_dequantize_then_score(dtype, D, style, bits, group_size):
    """Parity of scoring on quantized keys (dequantized in registers, in float32) against the
    numpy score of the float64-decoded keys (float32 rounding), and against MLX ops on
    mx.dequantize'd keys (which round every value to the dtype first). Several keys per
    pass, ragged last pass (see LAUNCHES)."""
    if group_size > D:
        pytest.skip(f"group size {group_size} > head_dim {D}: mx.quantize refuses it")
    keys, w, c, pairs = quantized_case(D, 4, style, dtype, bits, group_size, N=1001 + D, n_kv=2, B=2)
    exact = numpy_dequantize(keys)
    ref = numpy_reference(mx.array(exact.astype(np.float32)), w, c, pairs)
    bound = magnitude_bound(exact, w, c, pairs)
    ops = np.array(triattention_scores(keys.dequantize(), mx.array(w), mx.array(c), mx.array(pairs)))
    packed = kernels.fused_weights(mx.array(w), mx.array(c), mx.array(pairs))
    assert kernels.can_fuse_quantized(keys[:3], bits, group_size, style)
    fused = np.array(kernels.fused_scores_quantized(keys[:3], bits, group_size, packed, style,
                                                    **LAUNCHES["four_keys_per_pass"]))
    assert not kernels.disabled, kernels.disabled
    np.testing.assert_array_less(np.abs(fused - ref), 1e-5 * bound + 1e-6)
    np.testing.assert_array_less(np.abs(fused - ops), 2 * ROUNDING[dtype] * bound + 1e-6)


@needs_gpu
def test_self_test_passes_for_every_checked_instantiation():
    """What the doctor runs: each instantiation the Metal source check covers, compiled and
    compared with the MLX-op path on a small random problem."""
    from triattn_mlx import msl_check

    failed = {}
    for launch in msl_check.checked_launches():
        reason = kernels.self_test(GPU, launch.storage, launch.config)
        if reason is not None:
            failed[kernels.describe(launch.storage, launch.config["template"])] = reason
    assert not failed, failed
