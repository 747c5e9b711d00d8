"""Calibration statistics: per (layer, query head) pre-RoPE query centers.

File format (safetensors):
  q_mean_real, q_mean_imag: float32 [num_layers, num_attention_heads, head_dim / 2]
      the complex center qbar_f = E[q_f] of each RoPE pair f (pairs ordered by frequency)
  q_abs_mean:               float32 [num_layers, num_attention_heads, head_dim / 2]
      a_f = E|q_f|
  metadata key "triattn_stats": JSON with model_name, num_layers, num_attention_heads,
      num_kv_heads, head_dim, rope_style, rope_theta, rope_scaling, tokens_used, source,
      format_version.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .model_info import attention_info, attention_module, model_args, model_layers, model_shard

FORMAT_VERSION = 1
METADATA_KEY = "triattn_stats"
# Fields that must match the model exactly; rope_theta is compared numerically.
_STRUCTURE = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "rope_style")


class StatsError(ValueError):
    """Stats that cannot be used: unreadable, malformed, or made for another model."""


@dataclass
class Stats:
    q_mean: np.ndarray  # complex128 [L, H, D/2]
    q_abs_mean: np.ndarray  # float64 [L, H, D/2]
    metadata: dict = field(default_factory=dict)

    def mean_resultant_length(self):
        """R = |E q_f| / E|q_f| per (layer, head, pair): how tightly queries concentrate."""
        return np.abs(self.q_mean) / np.maximum(self.q_abs_mean, 1e-12)

    def head_concentration(self, weighting="dominant"):
        """R per (layer, head) [L, H]; NaN for layers without attention stats.

        "dominant": R of the pair with the largest E|q_f| (the paper's per-head figure);
        "energy": sum_f |E q_f| / sum_f E|q_f| (all pairs, weighted by magnitude).
        """
        total = self.q_abs_mean.sum(-1)
        if weighting == "dominant":
            dominant = self.q_abs_mean.argmax(-1)[..., None]
            r = np.take_along_axis(self.mean_resultant_length(), dominant, -1)[..., 0]
        elif weighting == "energy":
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.abs(self.q_mean).sum(-1) / total
        else:
            raise ValueError(f"weighting must be 'dominant' or 'energy', got {weighting!r}")
        return np.where(total > 0, r, np.nan)

    def save(self, path):
        arrays = {
            "q_mean_real": mx.array(self.q_mean.real.astype(np.float32)),
            "q_mean_imag": mx.array(self.q_mean.imag.astype(np.float32)),
            "q_abs_mean": mx.array(self.q_abs_mean.astype(np.float32)),
        }
        meta = dict(self.metadata, format_version=FORMAT_VERSION)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(path), arrays, metadata={METADATA_KEY: json.dumps(meta)})


def describe_model(model):
    """The metadata fields stats are validated against, read from the model itself (the
    whole model's, when this process holds a shard of it)."""
    infos = [attention_info(a) for a in map(attention_module, model_layers(model)) if a]
    if not infos:
        raise ValueError("model has no attention layer with a rope module")
    first = infos[0]
    args = model_args(model)
    scaling = getattr(args, "rope_scaling", None)
    shard = model_shard(model)
    return {
        "model_name": getattr(args, "model_type", type(model).__name__),
        "num_layers": shard.num_layers,
        "num_attention_heads": first.n_heads * shard.ranks,
        "num_kv_heads": first.n_kv_heads * shard.ranks,
        "head_dim": first.head_dim,
        "rope_style": first.rope.style,
        "rope_theta": getattr(args, "rope_theta", None),
        "rope_scaling": dict(scaling) if isinstance(scaling, dict) else None,
    }


def validate_stats(stats, model):
    """Raise StatsError naming the first field where stats and model disagree."""
    expected = describe_model(model)
    for name in _STRUCTURE:
        if stats.metadata.get(name) != expected[name]:
            raise StatsError(
                f"stats do not match the model: {name} is {stats.metadata.get(name)!r} in the "
                f"stats file but {expected[name]!r} in the model. Calibrate stats for this model "
                f"(python -m triattn_mlx.calibrate) or pass the right file."
            )
    theta, model_theta = stats.metadata.get("rope_theta"), expected["rope_theta"]
    if theta is not None and model_theta is not None:
        if not math.isclose(float(theta), float(model_theta), rel_tol=1e-6):
            raise StatsError(
                f"stats do not match the model: rope_theta is {theta} in the stats file but "
                f"{model_theta} in the model."
            )


def load_stats(path, model=None):
    """Read a stats file; with a model, also check that it was made for that model."""
    path = Path(path)
    if not path.is_file():
        raise StatsError(f"stats file not found: {path}")
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx reports corrupt files as RuntimeError/ValueError
        raise StatsError(f"cannot read stats file {path}: {e}") from None
    missing = {"q_mean_real", "q_mean_imag", "q_abs_mean"} - set(arrays)
    if missing or METADATA_KEY not in meta:
        raise StatsError(
            f"{path} is not a triattn-mlx stats file (missing {sorted(missing) or METADATA_KEY})"
        )
    try:
        metadata = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise StatsError(f"{path}: metadata is not valid JSON ({e})") from None
    real, imag, absm = (np.array(arrays[k], dtype=np.float64) for k in ("q_mean_real", "q_mean_imag", "q_abs_mean"))
    expected_shape = (
        metadata.get("num_layers"),
        metadata.get("num_attention_heads"),
        (metadata.get("head_dim") or 0) // 2,
    )
    for name, x in (("q_mean_real", real), ("q_mean_imag", imag), ("q_abs_mean", absm)):
        if x.shape != expected_shape:
            raise StatsError(f"{path}: {name} has shape {x.shape}, metadata says {expected_shape}")
        if not np.all(np.isfinite(x)):
            raise StatsError(f"{path}: {name} holds NaN or infinite values")
    if np.any(absm < 0):
        raise StatsError(f"{path}: q_abs_mean has negative values")
    stats = Stats(real + 1j * imag, absm, metadata)
    if model is not None:
        validate_stats(stats, model)
    return stats


def calibrate(model, token_ids, chunk_size=512, source="", progress=None):
    """Query centers of `model` on `token_ids` (list or 1-D array of ints)."""
    from mlx_lm.models.cache import KVCache

    from .taps import install_query_recorders, remove_query_recorders

    tokens = mx.array(np.asarray(token_ids, dtype=np.int32).reshape(-1))
    if tokens.size < 2:
        raise ValueError("calibration needs at least 2 tokens")
    shard = model_shard(model)
    if shard.layer_offset or shard.ranks > 1:
        raise ValueError("calibrate the whole model in one process: this one holds a shard of it")
    recorders = install_query_recorders(model)
    try:
        cache = [KVCache() for _ in model_layers(model)]
        if getattr(type(model), "make_cache", None) is not None:
            cache = type(model).make_cache(model)  # the model's own (not a compressed one)
        for start in range(0, tokens.size, chunk_size):
            model(tokens[None, start : start + chunk_size], cache=cache)
            mx.eval([(r.sum_re, r.sum_im, r.sum_abs) for r in recorders.values()])
            if progress:
                progress(min(start + chunk_size, tokens.size), tokens.size)
    finally:
        remove_query_recorders(model)

    meta = describe_model(model)
    n, h, half = meta["num_layers"], meta["num_attention_heads"], meta["head_dim"] // 2
    q_mean = np.zeros((n, h, half), dtype=np.complex128)
    q_abs = np.zeros((n, h, half))
    for i, r in recorders.items():
        q_mean[i], q_abs[i] = r.centers()
    meta.update(tokens_used=int(tokens.size), source=source)
    return Stats(q_mean, q_abs, meta)
