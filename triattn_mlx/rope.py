"""RoPE geometry read from a model's own rope module.

Rather than re-derive each scaling scheme's frequencies (default, linear, llama3, yarn,
su/longrope, partial rotary), we probe the module: rotating the unit vector e_i by one
position gives cos(w) on coordinate i and sin(w) on its partner, with the module's
amplitude (yarn/su mscale) as the length. What the module does is what we score with.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class RopeGeometry:
    pairs: np.ndarray  # [D/2, 2] int: head_dim coordinates (real, imag) of each complex pair
    omega: np.ndarray  # [D/2] float64: rotation per position of each pair (0: not rotated)
    scale: np.ndarray  # [D/2] float64: amplitude the rope applies to each pair (fs)
    style: str  # "half" (x[f], x[f + d/2]) or "traditional" (x[2f], x[2f + 1])

    @property
    def head_dim(self):
        return 2 * len(self.omega)


def probe_rope(rope, head_dim):
    """Read pairs, per-pair angular frequency and amplitude from a rope module."""
    basis = mx.eye(head_dim, dtype=mx.float32).reshape(1, head_dim, 1, head_dim)
    rotated = np.array(rope(basis, offset=1)[0, :, 0, :], dtype=np.float64)  # [D in, D out]
    cos = np.diag(rotated).copy()
    off_diag = rotated - np.diag(cos)
    partner = np.abs(off_diag).argmax(axis=1)
    sin = off_diag[np.arange(head_dim), partner]
    # Unrotated coordinates (partial rotary) come back exactly; a rotated pair's sine is its
    # angle per position, which scaled ropes (llama3, yarn) bring well below 1e-6 for their
    # slowest pairs: they are rotated still, and keep their true frequency.
    is_rotated = np.abs(sin) > 1e-12

    pairs, omega, scale = [], [], []
    for i in np.flatnonzero(is_rotated & (sin > 0)):  # e_i -> cos e_i + sin e_partner: i is real
        j = partner[i]
        if partner[j] != i:
            raise ValueError(f"rope module is not a pairwise rotation (coordinate {i})")
        pairs.append((i, j))
        omega.append(np.arctan2(sin[i], cos[i]))
        scale.append(np.hypot(sin[i], cos[i]))
    traditional = bool(pairs) and all(j == i + 1 for i, j in pairs)
    for i, j in _pair_unrotated(np.flatnonzero(~is_rotated), head_dim, traditional):
        pairs.append((i, j))
        omega.append(0.0)
        scale.append(abs(cos[i]))
    if len(pairs) * 2 != head_dim:
        raise ValueError(f"could not pair the {head_dim} coordinates of the rope module")

    pairs = np.array(pairs, dtype=np.int64)
    order = np.argsort(pairs[:, 0], kind="stable")
    pairs, omega, scale = pairs[order], np.array(omega)[order], np.array(scale)[order]
    exact = _declared_frequencies(rope)
    n_rotated = int((omega > 0).sum())
    if exact is not None and len(exact) >= n_rotated:
        exact = exact[:n_rotated]
        # A probe only resolves w to float32 (~1e-8); over 65k-token offsets that is a
        # phase error of ~1e-3 rad. Take the module's own float64 values when they agree.
        if np.allclose(exact, omega[omega > 0], rtol=1e-5, atol=1e-7):
            omega[omega > 0] = exact
    return RopeGeometry(pairs, omega, scale, "traditional" if traditional else "half")


def _pair_unrotated(still, head_dim, traditional):
    """Pairs for the coordinates a partial-rotary rope leaves alone, with w = 0.

    The math: for such a pair the trig term is Re(qbar conj(k)) = qbar . k, the exact
    expected logit of those coordinates, however they are paired. Only the norm term,
    (a - |qbar|) |k|, groups coordinates two by two; we group them as the rope lays out
    its rotated pairs: neighbours for the traditional layout; (i, i + D/2) when both
    halves are unrotated (ProportionalRoPE); else the first half of the unrotated block
    with its second half (nn.RoPE(dims < D))."""
    still = list(still)
    half = head_dim // 2
    if len(still) % 2:
        raise ValueError(f"odd number of unrotated coordinates ({len(still)})")
    if traditional:
        return list(zip(still[0::2], still[1::2]))
    lower = [i for i in still if i < half]
    if sorted(lower + [i + half for i in lower]) == still:
        return [(i, i + half) for i in lower]
    n = len(still) // 2
    return list(zip(still[:n], still[n:]))


def _declared_frequencies(rope):
    """Angular frequencies a rope module declares: mlx-lm's scaled ropes keep 1/w in
    `_freqs`; nn.RoPE keeps base and scale. None when it declares neither."""
    freqs = getattr(rope, "_freqs", None)
    if isinstance(freqs, mx.array):
        freqs = np.array(freqs, dtype=np.float64)
        return 1.0 / freqs[np.isfinite(freqs)]  # inf: a pair left unrotated (partial rotary)
    base, scale, dims = (getattr(rope, k, None) for k in ("base", "scale", "dims"))
    if base is not None and scale is not None and dims is not None:
        return scale * float(base) ** (-np.arange(0, dims, 2, dtype=np.float64) / dims)
    return None
