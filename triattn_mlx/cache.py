"""TriAttentionKVCache: an mlx-lm KV cache that stays at a fixed budget.

Lifecycle of one update_and_fetch call:
  1. append the new keys/values to the buffer;
  2. hand the full buffer to attention for this call;
  3. if the buffer holds budget + divide_length tokens, score every cached key, keep the
     best `budget` per KV head (recent window and sinks always), and compact the buffer.
Pruning after the fetch keeps this call's mask (made from the size before the append)
consistent, and means a chunk of a long prompt is compressed as soon as it is read.
`offset` is the absolute position, so RoPE keeps seeing true positions after eviction.
"""

import copy
import time
import uuid
import weakref

import mlx.core as mx
import mlx_lm.models.cache as mlx_cache
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import KVCache, _BaseCache, create_attention_mask

from .model_info import attention_info, attention_module, model_layers
from .scoring import QuantizedKeys, SelfCalibratedScorer, TriAttentionScorer
from .selection import gather_tokens, select_tokens
from .stats import Stats, install_query_recorders, load_stats, validate_stats

PRUNING_MODES = ("per_layer_per_head", "per_head")


def first(buffer):
    """The array of a buffer that gives its shape: itself, or a quantized triple's packed part."""
    return buffer[0] if isinstance(buffer, tuple) else buffer


def check_sizes(budget, window, divide_length, sinks):
    for name, value, low in (("budget", budget, 1), ("window", window, 0),
                             ("divide_length", divide_length, 1), ("sinks", sinks, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if budget <= window + sinks:
        raise ValueError(
            f"budget ({budget}) must be larger than window ({window}) + sinks ({sinks}): "
            "those tokens are always kept and count in the budget"
        )


def check_quantization(bits, group_size):
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"kv bits must be one of 2, 3, 4, 5, 6, 8, got {bits!r}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"kv group size must be 32, 64 or 128, got {group_size!r}")


class CacheGroup:
    """Caches that prune together, one per layer. The group holds them weakly, so a dropped
    cache frees its arrays at once (cache and group refer to each other: with strong
    references, only Python's cycle collector would free them)."""

    def __init__(self, group_id=None):
        self.id = group_id or uuid.uuid4().hex
        self.members, self._scores = weakref.WeakSet(), []

    def __deepcopy__(self, memo):
        # mlx-lm deep-copies prompt caches (BatchGenerator): the copy groups the members' copies
        new = copy.copy(self)
        memo[id(self)] = new
        new.id, new._scores = uuid.uuid4().hex, copy.deepcopy(self._scores, memo)
        new.members = weakref.WeakSet(copy.deepcopy(m, memo) for m in list(self.members))
        return new


class SharedSelection(CacheGroup):
    """`per_head` pruning: one token set per KV head for all layers, chosen from scores
    averaged over layers. Every member prunes in the same forward pass (they grow in
    lockstep); the last one to submit its scores compacts them all."""

    def submit(self, cache, scores):
        self._scores.append(scores)
        if len(self._scores) < len(self.members):
            return
        if any(m.length != cache.length for m in self.members):
            self._scores = []
            raise RuntimeError("per_head caches fell out of step (a layer was trimmed or fed "
                               "alone?): trim them together, e.g. mlx_lm's trim_prompt_cache")
        start = time.perf_counter()
        mean = sum(self._scores) / len(self._scores)
        self._scores = []
        positions = cache.token_positions()
        keep = select_tokens(mean, positions, cache.offset, cache.budget, cache.window, cache.sinks)
        for member in self.members:
            member.compact(keep)
        if cache.measure_prune_time:
            mx.eval([(m.keys, m.values, m.positions) for m in self.members])
            cache.prune_seconds += time.perf_counter() - start


_LOADING_GROUPS = {}  # group id -> group being filled by load_prompt_cache


class TriAttentionKVCache(_BaseCache):
    step = 256

    def __init__(self, budget, scorer, window=128, divide_length=128, sinks=0, shared=None,
                 measure_prune_time=False):
        check_sizes(budget, window, divide_length, sinks)
        if not callable(scorer):
            raise ValueError("scorer must be callable: (keys, positions, offset) -> scores")
        self.budget, self.window, self.divide_length, self.sinks = budget, window, divide_length, sinks
        self.scorer, self.shared = scorer, shared
        if shared is not None:
            shared.members.add(self)
        self.keys = self.values = None
        # Absolute positions of the first `kept` tokens (the last compaction's survivors);
        # the tokens appended since follow contiguously up to offset - 1, so their
        # positions need no bookkeeping on the decode path.
        self.positions, self.kept = None, 0
        self.offset = 0  # absolute position of the next token
        self.length = 0  # tokens held (mlx-lm's size())
        self.trimmable_tokens = 0  # newest positions guaranteed present in every head
        self.prune_rounds = 0
        # Timing a round needs two synchronizations per layer: off unless asked for.
        self.measure_prune_time, self.prune_seconds = measure_prune_time, 0.0

    # -- the mlx-lm cache surface ---------------------------------------------------------
    def update_and_fetch(self, keys, values):
        self._append(keys, values)
        k, v = self._held()
        if self.length >= self.budget + self.divide_length:
            self._prune()
        return k, v

    @classmethod
    def merge(cls, caches):
        """One batch cache from one cache per sequence (mlx-lm's batch generation calls this)."""
        from .batch import BatchTriAttentionKVCache

        return BatchTriAttentionKVCache.merge(caches)

    def make_mask(self, N, return_array=False, window_size=None):
        # The new tokens follow every cached one: the mask only needs the physical length.
        return create_attention_mask(N, offset=self.length, return_array=return_array, window_size=window_size)

    def is_trimmable(self):
        return True

    def trim(self, n):
        """Drop the newest n tokens if they are all still cached; else trim nothing, return 0."""
        n = min(self.offset, n)
        if n > self.trimmable_tokens:
            return 0
        self.length -= n
        self.offset -= n
        self.trimmable_tokens -= n
        self.kept = min(self.kept, self.length)
        return n

    def size(self):
        return self.length

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        held = sum(x.nbytes for _, x in tree_flatten((self.keys, self.values)))
        return held + (0 if self.positions is None else self.positions.nbytes)

    def token_positions(self):
        """Absolute position of every cached token: [B, H_kv, size()] int32."""
        B, n_kv = first(self.keys).shape[:2]
        fresh = self.length - self.kept
        recent = mx.broadcast_to(mx.arange(self.offset - fresh, self.offset, dtype=mx.int32), (B, n_kv, fresh))
        if self.kept == 0:
            return recent
        return mx.concatenate([self.positions[..., : self.kept], recent], axis=2)

    # -- storage: plain arrays here; (packed, scales, biases) in QuantizedTriAttentionKVCache --
    def _held(self):
        return tree_map(lambda x: x[..., : self.length, :], (self.keys, self.values))

    def _stored(self, keys, values):
        """New keys/values in storage form."""
        return keys, values

    def _scoring_keys(self):
        """The held keys as the scorer takes them."""
        return self.keys[..., : self.length, :]

    def dense_bytes_per_token(self):
        """Bytes one token takes in an unquantized cache (mlx-lm's KVCache) of this model."""
        B, n_kv = self.keys.shape[:2]
        return B * n_kv * (self.keys.shape[3] * self.keys.dtype.size + self.values.shape[3] * self.values.dtype.size)

    # -- lifecycle --------------------------------------------------------------------------
    def _append(self, keys, values):
        B, n_kv, N, _ = keys.shape
        new = self._stored(keys, values)
        if self.keys is None or self.length + N > first(self.keys).shape[2]:
            grow = (N + self.step - 1) // self.step * self.step
            room = tree_map(lambda x: mx.zeros((B, n_kv, grow, x.shape[3]), x.dtype), new)
            if self.keys is None:
                self.keys, self.values = room
            else:
                self.keys, self.values = tree_map(lambda o, n: mx.concatenate([o, n], axis=2), self._held(), room)
        end = self.length + N

        def write(buf, x):
            buf[..., self.length : end, :] = x

        tree_map(write, (self.keys, self.values), new)
        self.length, self.offset = end, self.offset + N
        self.trimmable_tokens += N

    def _prune(self):
        keys, positions = self._scoring_keys(), self.token_positions()
        if self.measure_prune_time:
            mx.eval(self._held(), positions)  # what the forward pass owes is not scoring time
        start = time.perf_counter()
        scores = self.scorer(keys, positions, self.offset)
        if self.shared is not None:
            if self.measure_prune_time:
                mx.eval(scores)
                self.prune_seconds += time.perf_counter() - start
            self.shared.submit(self, scores)
            return
        self.compact(select_tokens(scores, positions, self.offset, self.budget, self.window, self.sinks))
        if self.measure_prune_time:
            mx.eval(self.keys, self.values, self.positions)
            self.prune_seconds += time.perf_counter() - start

    def compact(self, keep):
        """Keep only the tokens `keep` ([B, H_kv, K] indices into the buffer, ascending)."""
        K = keep.shape[-1]
        positions = gather_tokens(self.token_positions(), keep)
        # One gather per buffer also makes room to decode until the next round: the
        # divide_length slots after the kept tokens take copies of token 0 (never read).
        room = mx.concatenate([keep, mx.zeros((*keep.shape[:2], self.divide_length), keep.dtype)], axis=-1)
        self.keys, self.values = tree_map(lambda buf: gather_tokens(buf, room), self._held())
        self.positions, self.kept = positions, K
        self.length = K
        self.trimmable_tokens = min(self.trimmable_tokens, self.window)
        self.prune_rounds += 1

    # -- save / load (mlx_lm.save_prompt_cache / load_prompt_cache) -------------------------
    @property
    def state(self):
        if not hasattr(self.scorer, "state"):
            raise ValueError(f"a cache scored by {self.scorer!r} cannot be saved")
        held = None if self.keys is None else (*self._held(), self.token_positions())
        return {
            "tokens": held,
            "offset": self.offset,
            "config": [self.budget, self.window, self.divide_length, self.sinks,
                       self.trimmable_tokens, self.prune_rounds],
            "shared": [self.shared.id, len(self.shared.members)] if self.shared else None,
            "scorer": self.scorer.state,
        }

    @state.setter
    def state(self, v):
        self.budget, self.window, self.divide_length, self.sinks, self.trimmable_tokens, self.prune_rounds = (
            int(x) for x in v["config"])
        self.offset = int(v["offset"])
        self.keys = self.values = self.positions = None
        self.length = self.kept = 0
        if v["tokens"] is not None:
            # load_prompt_cache gives nested lists where tuples were saved
            self.keys, self.values, self.positions = (tuple(x) if isinstance(x, list) else x for x in v["tokens"])
            self.length = self.kept = first(self.keys).shape[2]
        self.scorer = TriAttentionScorer.from_state(v["scorer"])
        self.measure_prune_time, self.prune_seconds = False, 0.0
        self.shared = None
        if v["shared"] is not None:
            # load_prompt_cache rebuilds the layers one by one: they rejoin one group,
            # which leaves the registry once complete (loading the file twice gives two).
            group_id, group_size = str(v["shared"][0]), int(v["shared"][1])
            group = _LOADING_GROUPS.setdefault(group_id, SharedSelection(group_id))
            group.members.add(self)
            if len(group.members) == group_size:
                del _LOADING_GROUPS[group_id]
            self.shared = group

    @property
    def meta_state(self):
        return tuple(str(x) for x in (self.budget, self.window, self.divide_length, self.sinks))

    @meta_state.setter
    def meta_state(self, v):
        self.budget, self.window, self.divide_length, self.sinks = (int(x) for x in v)


class QuantizedTriAttentionKVCache(TriAttentionKVCache):
    """TriAttention eviction with keys/values stored quantized (mlx-lm's mx.quantize layout,
    as in its QuantizedKVCache). `bits` makes mlx-lm models attend through its quantized
    attention. TriAttention scoring takes the quantized keys (on a GPU the fused kernel
    dequantizes them in registers; on CPU MLX ops dequantize first); other scorers get
    dequantized keys. Selection compacts the packed storage in place."""

    def __init__(self, budget, scorer, window=128, divide_length=128, sinks=0, shared=None,
                 measure_prune_time=False, bits=4, group_size=64):
        check_quantization(bits, group_size)
        super().__init__(budget, scorer, window, divide_length, sinks, shared, measure_prune_time)
        self.bits, self.group_size = bits, group_size

    def _stored(self, keys, values):
        if keys.shape[-1] % self.group_size or values.shape[-1] % self.group_size:
            raise ValueError(f"head_dim {keys.shape[-1]} is not a multiple of the kv group size {self.group_size}")
        return (tuple(mx.quantize(keys, group_size=self.group_size, bits=self.bits)),
                tuple(mx.quantize(values, group_size=self.group_size, bits=self.bits)))

    def _scoring_keys(self):
        keys = QuantizedKeys(*self._held()[0], self.bits, self.group_size)
        return keys if getattr(self.scorer, "reads_quantized", False) else keys.dequantize()

    def dense_bytes_per_token(self):
        B, n_kv = self.keys[0].shape[:2]
        dims = [x[0].shape[3] * 32 // self.bits for x in (self.keys, self.values)]
        return B * n_kv * sum(dims) * self.keys[1].dtype.size

    @property
    def state(self):
        return {**super().state, "quantization": [self.bits, self.group_size]}

    @state.setter
    def state(self, v):
        TriAttentionKVCache.state.fset(self, v)
        self.bits, self.group_size = (int(x) for x in v["quantization"])


def cache_report(caches):
    """Measured state of a prompt cache: tokens kept vs seen, bytes held vs what a full
    cache of the same tokens would hold, prune rounds and their time."""
    ours = [c for c in caches if isinstance(c, TriAttentionKVCache)]
    held = sum(c.nbytes for c in caches if not c.empty())
    full = held - sum(c.nbytes for c in ours if not c.empty())
    for c in ours:
        if not c.empty():  # what mlx-lm's KVCache allocates for every token seen (256-token steps)
            allocated = -(-c.offset // KVCache.step) * KVCache.step
            full += allocated * c.dense_bytes_per_token()
    return {
        "tokens_seen": max((c.offset for c in caches), default=0),
        "tokens_kept": max((c.size() for c in ours), default=None),
        "budget": ours[0].budget if ours else None,
        "divide_length": ours[0].divide_length if ours else None,
        "kv_bytes": held,
        "full_kv_bytes": full,
        "prune_rounds": max((c.prune_rounds for c in ours), default=0),
        "prune_seconds": sum(c.prune_seconds for c in ours),
    }


# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
mlx_cache.TriAttentionKVCache = TriAttentionKVCache
mlx_cache.QuantizedTriAttentionKVCache = QuantizedTriAttentionKVCache


def make_prompt_cache(model, budget, stats=None, window=128, divide_length=128, sinks=0,
                      pruning_mode="per_head", aggregation="mean", terms="both",
                      scorer_factory=None, measure_prune_time=False, kv_bits=None, kv_group_size=64):
    """One cache per layer: TriAttention caches for full-attention layers, the model's own
    caches (sliding-window, recurrent) elsewhere.

    stats: a Stats object, a path to a stats file (validated against the model), or
        "self": estimate the query centers from the model's own queries as it runs (the
        prompt's during prefill, refined while decoding). This wraps the model's rope
        modules with recorders until triattn_mlx.remove_query_recorders(model).
    scorer_factory(layer_index, attention_info) -> scorer replaces TriAttention scoring
    (baselines and ablations); stats are then not needed.
    measure_prune_time: time each prune round (prune_seconds); costs two synchronizations
    per layer and round.
    kv_bits (4 or 8; None: unquantized), kv_group_size: store the kept keys/values
    quantized, as mlx-lm's QuantizedKVCache does (from the first token).
    """
    check_sizes(budget, window, divide_length, sinks)
    if kv_bits is not None:
        check_quantization(kv_bits, kv_group_size)
    if pruning_mode not in PRUNING_MODES:
        raise ValueError(f"pruning_mode must be one of {PRUNING_MODES}, got {pruning_mode!r}")
    layers = model_layers(model)
    base = model.make_cache() if hasattr(model, "make_cache") else [KVCache() for _ in layers]
    infos = {i: attention_info(attention_module(layer)) for i, layer in enumerate(layers)
             if attention_module(layer) is not None}  # read before any rope is wrapped
    # Only plain KV caches are replaced: sliding-window and recurrent caches are bounded already.
    compressed = [i for i, cache in enumerate(base) if type(cache) is KVCache and i in infos]
    if not compressed:
        raise ValueError(
            f"{type(model).__name__} has no full-attention layer with a plain KV cache: "
            "TriAttention has nothing to compress in this model"
        )
    recorders = None
    if scorer_factory is None:
        if stats is None:
            raise ValueError(
                "TriAttention needs calibration stats for this model: pass stats=<file or Stats>, "
                "or stats='self' to estimate them from the prompt "
                "(reusable stats: python -m triattn_mlx.calibrate)"
            )
        if isinstance(stats, str) and stats == "self":
            recorders = install_query_recorders(model)
        else:
            if not isinstance(stats, Stats):
                stats = load_stats(stats)
            validate_stats(stats, model)

    shared = SharedSelection() if pruning_mode == "per_head" else None
    caches = list(base)
    for i in compressed:
        info = infos[i]
        if scorer_factory is not None:
            scorer = scorer_factory(i, info)
        elif recorders is not None:
            scorer = SelfCalibratedScorer(recorders[i], info.rope, info.n_kv_heads,
                                          aggregation=aggregation, terms=terms)
        else:
            scorer = TriAttentionScorer(stats.q_mean[i], stats.q_abs_mean[i], info.rope,
                                        info.n_kv_heads, aggregation=aggregation, terms=terms)
        if kv_bits is None:
            caches[i] = TriAttentionKVCache(budget, scorer, window, divide_length, sinks, shared,
                                            measure_prune_time)
        else:
            caches[i] = QuantizedTriAttentionKVCache(budget, scorer, window, divide_length, sinks, shared,
                                                     measure_prune_time, kv_bits, kv_group_size)
    return caches
