"""The fused kernel's self-test on first use, its failure paths forced on the CPU: a kernel
that cannot be built or run, and one that returns wrong numbers, must leave the scores
exactly as the MLX-op path gives them, turn the kernel off for that configuration and say
so once; a kernel that passes is kept."""

import mlx.core as mx
import numpy as np
import pytest

from triattn_mlx import kernels
from triattn_mlx.rope import RopeGeometry
from triattn_mlx.scoring import QuantizedKeys, TriAttentionScorer

D, N_KV, G = 64, 2, 4


@pytest.fixture
def gpu(monkeypatch):
    """The process as on a GPU (backend 'metal'), with no self-test run yet."""
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    monkeypatch.setattr(kernels, "self_tests", {})
    monkeypatch.setattr(kernels, "disabled", {})
    monkeypatch.setattr(kernels, "_warned", [])


def scorer(seed=0):
    rng = np.random.default_rng(seed)
    f = np.arange(D // 2)
    geometry = RopeGeometry(kernels.pair_layout("half", D), 10000.0 ** (-2 * f / D), np.ones(D // 2), "half")
    q_center = rng.normal(size=(N_KV * G, D // 2)) + 1j * rng.normal(size=(N_KV * G, D // 2))
    return TriAttentionScorer(q_center, np.abs(q_center) * 1.2, geometry, N_KV)


def keys(dtype=mx.float16, N=300, seed=1):
    return mx.array(np.random.default_rng(seed).normal(size=(1, N_KV, N, D)).astype(np.float32)).astype(dtype)


def score(s, k):
    return np.array(s(k, mx.zeros((1, N_KV, 300), mx.int32), 1000))


def ops_path(s, k, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("TRIATTN_KERNEL", "mlx")
        m.setattr(kernels, "backend", lambda: "mlx")
        return score(s, k)


def exact_kernel(calls, error=0.0):
    """A stand-in kernel factory: what a correct kernel computes (quantized keys dequantized
    in float32, as the kernel does), times 1 + error; counts its launches."""
    def factory(kind, storage):
        def kernel(inputs, **config):
            calls.append(storage)
            *k, packed = inputs
            if storage == "quantized":
                k = [k[0], k[1].astype(mx.float32), k[2].astype(mx.float32)]
            return [kernels.ops_scores(kernels.Launch(storage, [*k, packed], config)) * (1 + error)]
        return kernel
    return factory


def raising_factory(kind, storage):
    raise RuntimeError("[metal::Device] Unable to build metal library from source\n"
                       "error: use of undeclared identifier 'simd_shufle_xor'")


def warnings_in(err):
    return [line for line in err.splitlines() if "warning" in line]


FAILURES = {
    "factory_raises": raising_factory,
    "wrong_numbers": exact_kernel([], error=0.05),
    "real_metal_kernel_without_metal": None,  # mx.fast.metal_kernel on this CPU build raises when run
}


@pytest.mark.parametrize("failure", FAILURES)
def test_failing_kernel_falls_back_to_the_mlx_op_path_and_warns_once(gpu, monkeypatch, capsys, failure):
    if FAILURES[failure] is not None:
        monkeypatch.setattr(kernels, "_kernel", FAILURES[failure])
    elif mx.metal.is_available():
        pytest.skip("Metal is available: the real kernel runs here")
    s, k = scorer(), keys()
    expected = ops_path(s, k, monkeypatch)
    assert kernels.can_fuse(k, s.style)
    first, second = score(s, k), score(s, k)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert not kernels.can_fuse(k, s.style)  # scoring.py now takes the MLX-op path itself
    assert kernels.can_fuse(keys(mx.float32), s.style)  # other configurations are untouched
    lines = warnings_in(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert "self-test" in lines[0] and "MLX ops" in lines[0] and "python -m triattn_mlx.doctor" in lines[0]
    assert "plain keys, T=float16 D=64 HALF=1 G=4" in lines[0]
    (reason,) = kernels.disabled.values()
    if failure == "wrong_numbers":
        assert reason.startswith("max |fused - MLX ops|")
    else:
        assert reason.startswith("RuntimeError")


def test_quantized_keys_fall_back_too_and_the_warning_stays_single(gpu, monkeypatch, capsys):
    monkeypatch.setattr(kernels, "_kernel", exact_kernel([], error=0.05))
    s = scorer()
    plain = keys()
    quantized = QuantizedKeys(*mx.quantize(keys(), group_size=64, bits=4), 4, 64)
    expected_plain = ops_path(s, plain, monkeypatch)
    expected_quantized = ops_path(s, quantized, monkeypatch)
    np.testing.assert_array_equal(score(s, plain), expected_plain)
    np.testing.assert_array_equal(score(s, quantized), expected_quantized)
    assert not kernels.can_fuse_quantized(quantized[:3], 4, 64, s.style)
    other_group_size = mx.quantize(keys(), group_size=32, bits=4)
    assert kernels.can_fuse_quantized(other_group_size, 4, 32, s.style)
    assert len(kernels.disabled) == 2
    assert len(warnings_in(capsys.readouterr().err)) == 1


@pytest.mark.parametrize("storage", ["plain", "quantized"])
def test_passing_kernel_is_kept(gpu, monkeypatch, capsys, storage):
    calls = []
    monkeypatch.setattr(kernels, "_kernel", exact_kernel(calls, error=1e-5))  # float32 noise and then some
    s = scorer()
    k = keys() if storage == "plain" else QuantizedKeys(*mx.quantize(keys(), group_size=32, bits=8), 8, 32)
    expected = ops_path(s, k, monkeypatch)
    # Raw scores (~10 here). The op path rounds dequantized keys to float16, the kernel
    # keeps them in float32: a relative error of ~1e-3 of the largest score.
    tolerance = (1e-4 if storage == "plain" else 2e-3) * np.abs(expected).max()
    for _ in range(3):
        np.testing.assert_allclose(score(s, k), expected, atol=tolerance)
    assert calls == [storage] * 4  # the self-test, then every call scores with the kernel
    assert list(kernels.self_tests.values()) == [None] and not kernels.disabled
    assert (kernels.can_fuse(k, s.style) if storage == "plain"
            else kernels.can_fuse_quantized(k[:3], 8, 32, s.style))
    assert not warnings_in(capsys.readouterr().err)


def test_self_test_tolerance(monkeypatch):
    """SELF_TEST_TOLERANCE is 1e-3 of the largest score: a relative error of 2e-4 passes,
    5e-3 fails."""
    launch = kernels.plain_launch(keys(mx.bfloat16), mx.zeros((N_KV * G, 3, D // 2)), "half")
    for error, passes in [(2e-4, True), (5e-3, False)]:
        monkeypatch.setattr(kernels, "_kernel", exact_kernel([], error=error))
        assert (kernels.self_test("cuda", "plain", launch.config) is None) == passes


def test_fused_scores_on_the_cpu_backend_are_the_mlx_op_path(capsys):
    s, k = scorer(), keys()
    packed = kernels.fused_weights(s.weights(999), s.c, s.pairs)
    got = kernels.fused_scores(k, packed, "half", kind="mlx")
    from triattn_mlx.scoring import triattention_scores
    np.testing.assert_array_equal(np.array(got), np.array(triattention_scores(k, s.weights(999), s.c, s.pairs)))
    assert not capsys.readouterr().err
