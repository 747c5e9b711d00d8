"""What the cache needs to know about a model's attention layers."""

from dataclasses import dataclass

import mlx.core as mx

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
    if n_heads == 0 or n_kv_heads == 0:  # mlx-lm's shard() divides head counts by the group size
        raise ValueError(f"this process holds {n_heads} query / {n_kv_heads} KV heads of each layer: the model's "
                         "heads do not divide evenly over the processes of its tensor-parallel group; run it "
                         "on a number of processes that divides its KV heads")
    if not (n_heads and n_kv_heads and head_dim):
        raise ValueError(f"cannot read head counts from {type(attn).__name__}")
    return AttentionInfo(n_heads, n_kv_heads, head_dim, probe_rope(own_rope(attn), head_dim))


@dataclass(frozen=True)
class Shard:
    """This process's part of a model that mlx-lm's sharded_load split under mlx.launch.
    Pipeline parallelism gives a process a run of layers (the first is `layer_offset` of
    `num_layers`); tensor parallelism gives it a contiguous block of every layer's heads
    (the `rank`-th of `ranks` equal blocks, query and KV heads alike)."""
    layer_offset: int = 0
    num_layers: int = 0
    rank: int = 0
    ranks: int = 1

    def head_rows(self, n_local):
        """The global query-head rows of this process's `n_local` heads."""
        return slice(self.rank * n_local, (self.rank + 1) * n_local)


def model_shard(model):
    """What part of its model this process holds (Shard()) when it holds all of it."""
    layers = model_layers(model)
    attn = next((a for a in map(attention_module, layers) if a is not None), None)
    args = model_args(model)
    inner = getattr(model, "model", None)
    offset = int(getattr(inner, "start_idx", 0) or 0)  # mlx-lm's PipelineMixin
    total = getattr(args, "num_hidden_layers", None) or offset + len(layers)
    if attn is None:
        return Shard(offset, total)
    info = attention_info(attn)
    heads, kv_heads = (getattr(args, k, None) for k in ("num_attention_heads", "num_key_value_heads"))
    if not heads or heads == info.n_heads:
        return Shard(offset, total)
    ranks = heads // info.n_heads
    kv_heads = kv_heads or heads
    if info.n_heads == 0 or heads % info.n_heads or info.n_kv_heads * ranks != kv_heads:
        raise ValueError(f"this model's {heads} query / {kv_heads} KV heads do not divide evenly over the "
                         f"processes of its tensor-parallel group (this one holds {info.n_heads} / "
                         f"{info.n_kv_heads}): run it on a number of processes that divides {kv_heads}")
    import mlx.core as mx

    return Shard(offset, total, mx.distributed.init().rank(), ranks)


def wait_for_ranks(group):
    """Under mlx.launch: return once every rank got here, so no rank exits while another
    still has a step in flight with it (mlx-lm's generate_step evaluates one step ahead)."""
    if group.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.zeros(1), group=group))


def model_layers(model):
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .layers: not an mlx-lm language model")
    return layers


def model_args(model):
    return getattr(model, "args", None)
