"""The closed-form score against a brute-force evaluation of its definition."""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from triattn_mlx.rope import probe_rope
from triattn_mlx.scoring import TriAttentionScorer, geometric_offsets, triattention_scores
from triattn_mlx.selection import head_scores

D, BASE = 32, 10000.0

SCALINGS = {
    "default": None,
    "linear": {"type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 256,
             "beta_fast": 32, "beta_slow": 1},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 256,
                 "short_factor": [1.0] * (D // 2), "long_factor": list(np.linspace(1.0, 4.0, D // 2))},
    "partial": {"rope_type": "proportional", "partial_rotary_factor": 0.5},
}


def reference_rope(scaling):
    """Per-pair angular frequency and amplitude, from the published formulas (numpy)."""
    inv = BASE ** (-np.arange(0, D, 2) / D)
    if scaling is None:
        return inv, np.ones(D // 2)
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind == "linear":
        return inv / scaling["factor"], np.ones(D // 2)
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        out = np.where(wavelen > old / low, inv / factor, inv)
        medium = (wavelen > old / high) & (wavelen < old / low)
        return np.where(medium, (1 - smooth) * inv / factor + smooth * inv, out), np.ones(D // 2)
    if kind == "yarn":
        factor, orig = scaling["factor"], scaling["original_max_position_embeddings"]
        def corr(rotations):
            return D * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(BASE))

        lo, hi = max(math.floor(corr(scaling["beta_fast"])), 0), min(math.ceil(corr(scaling["beta_slow"])), D - 1)
        ramp = np.clip((np.arange(D // 2) - lo) / max(hi - lo, 1e-3), 0, 1)
        extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by factor
        inv_out = inv / factor * (1 - extrapolate) + inv * extrapolate
        mscale = 0.1 * math.log(factor) + 1.0
        return inv_out, np.full(D // 2, mscale)
    if kind == "longrope":  # long factors divide the frequencies; mscale from the context ratio
        factor = 4096 / scaling["original_max_position_embeddings"]
        mscale = math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))
        return inv / np.array(scaling["long_factor"]), np.full(D // 2, mscale)
    if kind == "proportional":  # the first rotated_dims / 2 pairs rotate, the rest do not
        rotated = int(D * scaling["partial_rotary_factor"]) // 2
        return np.where(np.arange(D // 2) < rotated, inv, 0.0), np.ones(D // 2)
    raise ValueError(kind)


def pair_layout(traditional):
    f = np.arange(D // 2)
    return np.stack([2 * f, 2 * f + 1], 1) if traditional else np.stack([f, f + D // 2], 1)


def brute_force_scores(q_center, q_abs, keys_pre, positions, t, omega, fs, offsets, aggregation):
    """S(k) by definition: explicit loop over offsets on pre-RoPE keys.
    q_center: [H, D/2] complex, keys_pre: [H_kv, N, D/2] complex -> [H, N]."""
    H, n_kv = q_center.shape[0], keys_pre.shape[0]
    out = np.zeros((H, keys_pre.shape[1]))
    for h in range(H):
        k = keys_pre[h // (H // n_kv)]
        qbar = q_center[h]
        phi = np.angle(qbar[None] * np.conj(k))
        amp = np.abs(qbar)[None] * np.abs(k)
        per_offset = []
        for o in offsets:
            angle = (t - positions[:, None] + o) * omega[None] + phi
            per_offset.append((fs**2 * amp * np.cos(angle)).sum(-1))
        per_offset = np.array(per_offset)
        trig = per_offset.mean(0) if aggregation == "mean" else per_offset.max(0)
        norm = (fs**2 * (q_abs[h] - np.abs(qbar))[None] * np.abs(k)).sum(-1)
        out[h] = trig + norm
    return out


@pytest.mark.parametrize("aggregation", ["mean", "max"])
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_closed_form_matches_definition(scaling, traditional, aggregation):
    if scaling == "longrope" and traditional:
        pytest.skip("mlx-lm's longrope (SuScaledRoPE) is half-style only")
    rng = np.random.default_rng(0)
    H, n_kv, N, t = 4, 2, 40, 3000
    rope = initialize_rope(D, BASE, traditional, SCALINGS[scaling], max_position_embeddings=4096)
    geometry = probe_rope(rope, D)
    omega, fs = reference_rope(SCALINGS[scaling])
    pairs = pair_layout(traditional)
    np.testing.assert_array_equal(geometry.pairs, pairs)
    np.testing.assert_allclose(geometry.omega, omega, rtol=1e-5)
    np.testing.assert_allclose(geometry.scale, fs, rtol=1e-5)
    omega = geometry.omega  # the model's own (float32-rounded) frequencies, as it rotates keys
    assert geometry.style == ("traditional" if traditional else "half")

    q_center = rng.normal(size=(H, D // 2)) + 1j * rng.normal(size=(H, D // 2))
    q_abs = np.abs(q_center) * (1 + rng.uniform(0.05, 0.5, size=q_center.shape))
    keys = rng.normal(size=(n_kv, N, D)).astype(np.float32)
    positions = np.sort(rng.choice(t, size=N, replace=False))
    keys_pre = keys[..., pairs[:, 0]] + 1j * keys[..., pairs[:, 1]]
    # Explicit RoPE in float64: the closed form is checked on exactly rotated keys, and
    # mlx-lm's own rope (float32 angles) is checked against the same rotation.
    rotated = fs * keys_pre * np.exp(1j * positions[:, None] * omega)
    exact = np.zeros_like(keys)
    exact[..., pairs[:, 0]], exact[..., pairs[:, 1]] = rotated.real, rotated.imag
    by_mlx = mx.concatenate(
        [rope(mx.array(keys[None, :, i : i + 1]), offset=int(p)) for i, p in enumerate(positions)], axis=2
    )
    np.testing.assert_allclose(np.array(by_mlx)[0], exact, atol=2e-3)
    cached = mx.array(exact[None])
    offsets = geometric_offsets()
    expected = brute_force_scores(q_center, q_abs, keys_pre, positions, t, omega, fs, offsets, aggregation)

    scorer = TriAttentionScorer(q_center, q_abs, geometry, n_kv, aggregation=aggregation)
    got = np.array(triattention_scores(cached, scorer.weights(t), scorer.c, scorer.pairs))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    # The scorer returns these raw scores per query head; selection z-normalizes each
    # head, then takes the max over each GQA group.
    raw = scorer(cached, mx.array(positions[None, None]), t)  # offset t: the next query arrives at t
    np.testing.assert_allclose(np.array(raw)[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    z = (expected - expected.mean(-1, keepdims=True)) / expected.std(-1, keepdims=True)
    grouped = z.reshape(n_kv, H // n_kv, N).max(1)
    np.testing.assert_allclose(np.array(head_scores(raw, n_kv))[0], grouped, atol=1e-3)


def test_partial_rotary_pairs_unrotated_dims_as_plain_dot_product():
    import mlx.nn as nn

    rope = nn.RoPE(16, base=BASE)  # rotates the first 16 of 32 coordinates (phi-style)
    g = probe_rope(rope, 32)
    assert (g.omega[:8] > 0).all() and (g.omega[8:] == 0).all()
    assert g.pairs[:8].tolist() == [[f, f + 8] for f in range(8)]
    assert g.pairs[8:].tolist() == [[16 + i, 24 + i] for i in range(8)]
    # With w = 0 the trig term of the unrotated pairs is their exact dot product with qbar.
    rng = np.random.default_rng(1)
    q_center = rng.normal(size=(1, 16)) + 1j * rng.normal(size=(1, 16))
    scorer = TriAttentionScorer(q_center, np.abs(q_center), g, 1)
    w = np.array(scorer.weights(1000))[0]
    qbar = np.zeros(32)
    qbar[g.pairs[8:, 0]], qbar[g.pairs[8:, 1]] = q_center[0, 8:].real, q_center[0, 8:].imag
    np.testing.assert_allclose(w[16:], qbar[16:], rtol=1e-6)


def test_slowly_rotating_pairs_keep_their_true_frequency():
    """llama3 scaling (factor 8, theta 500000) brings the slowest pairs below 1e-6 rad per
    position: they rotate still (over 100k tokens, by radians), so the probe must not take
    them for unrotated coordinates."""
    rope = initialize_rope(128, 500000.0, False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                           max_position_embeddings=131072)
    geometry = probe_rope(rope, 128)
    expected = 1.0 / np.array(rope._freqs, dtype=np.float64)
    assert geometry.omega.min() > 0 and expected.min() < 1e-6
    np.testing.assert_allclose(geometry.omega, expected, rtol=1e-9)
    np.testing.assert_array_equal(geometry.pairs, np.stack([np.arange(64), np.arange(64) + 64], 1))


@pytest.mark.parametrize("style", ["half", "traditional"])
def test_pair_magnitudes_read_as_slices_equal_the_gather(style):
    from triattn_mlx.kernels import pair_layout
    from triattn_mlx.scoring import pair_magnitudes

    keys = mx.array(np.random.default_rng(0).normal(size=(2, 3, 17, 16)).astype(np.float32))
    pairs = mx.array(pair_layout(style, 16))
    gathered = pair_magnitudes(keys, pairs)
    assert mx.array_equal(pair_magnitudes(keys, pairs, style), gathered)
    other = "traditional" if style == "half" else "half"
    assert not mx.allclose(pair_magnitudes(keys, pairs, other), gathered)
