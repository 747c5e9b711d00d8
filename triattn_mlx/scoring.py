"""The TriAttention score of cached keys, in the closed form of TRIATTENTION.md.

Keys in the cache are already rotated (k_post_f = fs_f k_f e^{i p w_f}), so for a query
center qbar_f at position t and future offsets o:

    S(k) = sum_f Re( W_f(t) conj(k_post_f) ) + sum_f c_f |k_post_f|
    W_f(t) = fs_f qbar_f e^{i t w_f} B_f,   B_f = mean_o e^{i o w_f},   c_f = fs_f (a_f - |qbar_f|)

With W laid out on the head_dim coordinates (real part on a pair's first coordinate,
imaginary on its second), the trig term is one real dot product per key.
"""

from typing import NamedTuple

import mlx.core as mx
import numpy as np

from . import kernels
from .rope import RopeGeometry


def geometric_offsets(max_offset=65536):
    """O = {1, 2, 4, ..., max_offset}: where future queries are expected (reference default)."""
    return 2 ** np.arange(int(np.log2(max_offset)) + 1)


def future_phase_mean(omega, offsets):
    # omega: [D/2], offsets: [O] -> B_f = mean_o e^{i o w_f}: [D/2] complex
    return np.exp(1j * np.outer(offsets, omega)).mean(axis=0)


def trig_weights(q_center, omega, scale, position, phase):
    # q_center: [H, D/2] complex, omega/scale: [D/2], phase: [D/2] or [O, D/2] -> W: [H, (O,) D/2]
    rotated = scale * q_center * np.exp(1j * position * omega)
    return rotated[:, None, :] * phase if phase.ndim == 2 else rotated * phase


def norm_weights(q_center, q_abs_mean, scale, mean_resultant=True):
    # c_f = fs_f (a_f - |qbar_f|): query energy the center does not explain. [H, D/2]
    # disable_mlr (reference option): c_f = fs_f a_f.
    return scale * (q_abs_mean - np.abs(q_center)) if mean_resultant else scale * q_abs_mean


def complex_to_coordinates(w, pairs, head_dim):
    # w: [..., D/2] complex -> [..., D] real with Re on pairs[:, 0] and Im on pairs[:, 1]
    out = np.zeros(w.shape[:-1] + (head_dim,), dtype=np.float32)
    out[..., pairs[:, 0]] = w.real
    out[..., pairs[:, 1]] = w.imag
    return out


def pair_magnitudes(keys, pairs, style=None):
    # keys: [B, H_kv, N, D] -> |k_f|: [B, H_kv, N, D/2]. style (kernels.pair_style of the
    # pairs): "half" and "traditional" read them as slices, not gathers (on the CPU a
    # gather over 8k keys took 23 ms a layer, the slices 0.06 ms)
    half = keys.shape[-1] // 2
    if style == "half":
        re, im = keys[..., :half], keys[..., half:]
    elif style == "traditional":
        both = keys.reshape(*keys.shape[:-1], half, 2)
        re, im = both[..., 0], both[..., 1]
    else:
        re, im = keys[..., pairs[:, 0]], keys[..., pairs[:, 1]]
    return mx.sqrt(re * re + im * im)


def trig_scores(keys, w):
    """keys: [B, H_kv, N, D] post-RoPE; w: [H, D] (mean over offsets) or [H, O, D] (max
    over offsets) -> [B, H, N] float32."""
    B, n_kv, N, D = keys.shape
    H = w.shape[0]
    k = keys.astype(mx.float32)[:, :, None]  # [B, H_kv, 1, N, D]
    if w.ndim == 2:
        trig = (k @ w.reshape(1, n_kv, H // n_kv, D, 1))[..., 0]
    else:
        wq = w.reshape(1, n_kv, H // n_kv, w.shape[1], D).swapaxes(-1, -2)  # [1, H_kv, G, D, O]
        trig = (k @ wq).max(axis=-1)
    return trig.reshape(B, H, N)


def norm_scores(keys, c, pairs, style=None):
    # keys: [B, H_kv, N, D], c: [H, D/2], pairs: [D/2, 2] -> sum_f c_f |k_f|: [B, H, N]
    B, n_kv, N, D = keys.shape
    mags = pair_magnitudes(keys.astype(mx.float32)[:, :, None], pairs, style)  # [B, H_kv, 1, N, D/2]
    return (mags @ c.reshape(1, n_kv, c.shape[0] // n_kv, -1, 1))[..., 0].reshape(B, -1, N)


def triattention_scores(keys, w, c, pairs, style=None):
    """The score S(k) of every cached key for every query head: [B, H, N] float32."""
    return trig_scores(keys, w) + norm_scores(keys, c, pairs, style)


class QuantizedKeys(NamedTuple):
    """Keys as a quantized cache holds them (mx.quantize layout)."""
    codes: mx.array  # [B, H_kv, N, D * bits / 32] uint32
    scales: mx.array  # [B, H_kv, N, D / group_size]
    biases: mx.array
    bits: int
    group_size: int

    def dequantize(self):
        return mx.dequantize(self.codes, self.scales, self.biases, group_size=self.group_size, bits=self.bits)


class TriAttentionScorer:
    """Scores one layer's cached keys from that layer's calibrated query centers: raw
    scores per query head, [B, H, N] (selection.py normalizes and reduces them)."""

    reads_quantized = True  # takes QuantizedKeys: the fused kernel reads them without dequantizing

    def __init__(self, q_center, q_abs_mean, geometry, n_kv_heads, aggregation="mean",
                 offsets=None, terms="both"):
        if aggregation not in ("mean", "max"):
            raise ValueError(f"aggregation must be 'mean' or 'max', got {aggregation!r}")
        if terms not in ("both", "trig", "norm"):
            raise ValueError(f"terms must be 'both', 'trig' or 'norm', got {terms!r}")
        self.geometry, self.n_kv_heads, self.terms = geometry, n_kv_heads, terms
        self.aggregation = aggregation
        self.offsets = offsets = geometric_offsets() if offsets is None else np.asarray(offsets)
        omega = geometry.omega
        self.phase = (
            future_phase_mean(omega, offsets) if aggregation == "mean"
            else np.exp(1j * np.outer(offsets, omega))
        )
        self.pairs = mx.array(geometry.pairs)
        self.style = kernels.pair_style(geometry.pairs)  # None: the fused kernel does not apply
        self.set_centers(q_center, q_abs_mean)

    def set_centers(self, q_center, q_abs_mean):
        self.q_center = np.asarray(q_center, dtype=np.complex128)  # [H, D/2]
        self.q_abs_mean = np.asarray(q_abs_mean, dtype=np.float64)  # [H, D/2]
        self.c = mx.array(norm_weights(self.q_center, self.q_abs_mean, self.geometry.scale).astype(np.float32))
        self._state = None  # built on first use: mlx-lm reads every cache's state after each prefill chunk

    def weights(self, position):
        w = trig_weights(self.q_center, self.geometry.omega, self.geometry.scale, position, self.phase)
        return mx.array(complex_to_coordinates(w, self.geometry.pairs, self.geometry.head_dim))

    def __call__(self, keys, positions, offset):
        # keys: [B, H_kv, N, D] (or QuantizedKeys), positions: [B, H_kv, N] -> [B, H, N]
        # The next query's position (the reference's round_start: the position after the
        # newest cached key); future queries arrive at t + o.
        t = offset
        if isinstance(keys, QuantizedKeys):
            q = keys[:3]
            if (self.terms == "both" and self.aggregation == "mean" and kernels.backend() != "mlx"
                    and kernels.can_fuse_quantized(q, keys.bits, keys.group_size, self.style)):
                packed = kernels.fused_weights(self.weights(t), self.c, self.pairs)
                return kernels.fused_scores_quantized(q, keys.bits, keys.group_size, packed, self.style)
            keys = keys.dequantize()
        if self.terms == "norm":
            return norm_scores(keys, self.c, self.pairs, self.style)
        if self.terms == "trig":
            return trig_scores(keys, self.weights(t))
        if self.aggregation == "mean" and kernels.backend() != "mlx" and kernels.can_fuse(keys, self.style):
            return kernels.fused_scores(keys, kernels.fused_weights(self.weights(t), self.c, self.pairs), self.style)
        return triattention_scores(keys, self.weights(t), self.c, self.pairs, self.style)

    # Saved with the cache, bit-exact (float64 travels as uint32 pairs), so that a loaded
    # cache prunes exactly as the original would have.
    @property
    def state(self):
        if self._state is None:
            self._state = self._build_state()
        return self._state

    def _build_state(self):
        g = self.geometry
        return {
            "q_center": _f64_to_mx(np.stack([self.q_center.real, self.q_center.imag], -1)),
            "q_abs_mean": _f64_to_mx(self.q_abs_mean),
            "pairs": mx.array(g.pairs.astype(np.int32)),
            "omega": _f64_to_mx(g.omega),
            "scale": _f64_to_mx(g.scale),
            "offsets": mx.array(self.offsets.astype(np.int64)),
            "options": [g.style, self.n_kv_heads, self.aggregation, self.terms],
        }

    def __deepcopy__(self, memo):
        return self  # its arrays never change: copies of a cache share it

    @classmethod
    def from_state(cls, state):
        center = _mx_to_f64(state["q_center"])
        style, n_kv_heads, aggregation, terms = state["options"]
        geometry = RopeGeometry(np.array(state["pairs"]).astype(np.int64), _mx_to_f64(state["omega"]),
                                _mx_to_f64(state["scale"]), str(style))
        return cls(center[..., 0] + 1j * center[..., 1], _mx_to_f64(state["q_abs_mean"]), geometry,
                   int(n_kv_heads), str(aggregation), np.array(state["offsets"]), str(terms))


def _f64_to_mx(x):
    x = np.ascontiguousarray(x, dtype=np.float64)
    return mx.array(x.view(np.uint32))


def _mx_to_f64(x):
    return np.ascontiguousarray(np.array(x, dtype=np.uint32)).view(np.float64)


class SelfCalibratedScorer(TriAttentionScorer):
    """TriAttention scoring from the queries this model is actually running: the centers
    are the running means a QueryRecorder keeps on the layer's rope, read at every prune
    (the prompt's own queries during prefill, refined online while decoding).
    Saved caches keep the centers of the moment they were saved."""

    def __init__(self, recorder, geometry, n_kv_heads, **options):
        self.recorder = recorder
        half = len(geometry.omega)
        # Until the first prune reads the recorder, a neutral center (never used for scoring).
        super().__init__(np.zeros((recorder.info.n_heads, half)), np.zeros((recorder.info.n_heads, half)),
                         geometry, n_kv_heads, **options)

    def __call__(self, keys, positions, offset):
        self.set_centers(*self.recorder.centers())
        return super().__call__(keys, positions, offset)

    @property
    def state(self):
        if self.recorder.tokens:
            self.set_centers(*self.recorder.centers())
        return super().state

    def __deepcopy__(self, memo):
        return self  # reads the model's recorder: copies of a cache share it
