"""What the cache needs to know about a model's attention layers."""

from dataclasses import dataclass

from .rope import RopeGeometry, probe_rope


@dataclass(frozen=True)
class AttentionInfo:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: RopeGeometry


def _first_attr(obj, names):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def attention_module(layer):
    """The attention module of a transformer block (the child that owns a rope)."""
    for name in ("self_attn", "attention", "attn"):
        attn = getattr(layer, name, None)
        if attn is not None and hasattr(attn, "rope"):
            return attn
    return None


def own_rope(attn):
    """The attention's rope module, under any tap (taps.py) standing in for it."""
    rope = attn.rope
    while hasattr(rope, "on_queries"):
        rope = rope.rope
    return rope


def attention_info(attn):
    """Head counts and RoPE geometry of an attention."""
    n_heads = _first_attr(attn, ("n_heads", "num_heads", "num_attention_heads"))
    n_kv_heads = _first_attr(attn, ("n_kv_heads", "num_key_value_heads", "num_kv_heads"))
    head_dim = _first_attr(attn, ("head_dim",))
    if head_dim is None and n_heads:
        head_dim = attn.q_proj.weight.shape[0] // n_heads
    if not (n_heads and n_kv_heads and head_dim):
        raise ValueError(f"cannot read head counts from {type(attn).__name__}")
    return AttentionInfo(n_heads, n_kv_heads, head_dim, probe_rope(own_rope(attn), head_dim))


def model_layers(model):
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .layers: not an mlx-lm language model")
    return layers


def model_args(model):
    return getattr(model, "args", None)
