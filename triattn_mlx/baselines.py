"""The baselines, as scorers in the same cache: only the scoring differs between methods.

Each maps (keys [B, H_kv, N, D], positions [B, H_kv, N], offset) to raw scores [B, H, N]
per query head (or [B, H_kv, N] where the signal is per KV head); selection.py normalizes,
reduces GQA groups and picks, as for TriAttention. Scorers that need attention (H2O,
SnapKV, R-KV) read post-RoPE queries: SnapKV and R-KV the newest ones, which their cache
keeps (its observation window, fed by a LatestQueries tap on the layer's rope), so they
batch and save like TriAttention; H2O every query since its last round, from a
RecentQueries tap it reads itself (make_prompt_cache installs the taps).
"""

import copy
import math

import mlx.core as mx
import numpy as np

from .selection import zscore

RKV_THRESHOLD = 0.5  # R-KV: a key this similar (cosine) to a newer one is not counted against it
REDUNDANCY_BLOCK = 2**24  # similarities computed at once (64 MiB of float32), whatever the prompt's length


def random_scores(keys, positions, offset):
    """Random eviction: the floor any method must clear. Seeded by the offset, so a rerun
    evicts the same tokens."""
    return mx.random.uniform(shape=positions.shape, key=mx.random.key(int(offset)))


def recency_scores(keys, positions, offset):
    """StreamingLLM: keep the most recent tokens (with the cache's sinks: sinks + window)."""
    return positions.astype(mx.float32)


def key_norm_scores(keys, positions, offset):
    """Key L2 norm: what scoring falls back to without calibrated query centers (the
    reference MLX port's placeholder calibration, see ../shared/TRIATTENTION.md)."""
    return mx.sqrt((keys.astype(mx.float32) ** 2).sum(-1))


def attention_probs(queries, keys, q_positions, k_positions):
    """Causal softmax attention of queries over the held keys, per query head:
    queries [B, H, M, D], keys [B, H_kv, N, D] -> [B, H, M, N] float32. The query heads of a
    KV head attend as one block: the keys are never repeated per query head."""
    B, H, M, D = queries.shape
    n_kv, N = keys.shape[1], keys.shape[2]
    group = H // n_kv
    q = queries.astype(mx.float32).reshape(B, n_kv, group * M, D)
    logits = (q @ keys.astype(mx.float32).swapaxes(-1, -2)).reshape(B, H, M, N) / math.sqrt(D)
    visible = k_positions[:, :, None, :] <= q_positions[None, None, :, None]  # [B, H_kv, M, N]
    visible = mx.repeat(visible, group, axis=1)
    logits = mx.where(visible, logits, -mx.inf)
    return mx.softmax(logits, axis=-1)


def pool1d(x, kernel, op):
    """Max or mean pooling along the last axis over `kernel` (odd) tokens centred on each,
    same length (SnapKV / R-KV smoothing)."""
    if kernel <= 1:
        return x
    pad, N = kernel // 2, x.shape[-1]
    fill = -mx.inf if op == "max" else 0.0
    padded = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], constant_values=fill)
    if op == "mean":
        total = padded[..., :N]
        for i in range(1, kernel):
            total = total + padded[..., i : i + N]
        return total / kernel
    # max over windows of 1, 2, 4, ... (each from two of the last), then two overlapping ones
    width, window = 1, padded
    while 2 * width <= kernel:
        window = mx.maximum(window[..., :-width], window[..., width:])
        width *= 2
    return mx.maximum(window[..., :N], window[..., kernel - width : kernel - width + N])


class H2OScorer:
    """H2O: attention each held token has received from every query seen, accumulated per
    query head and absolute position."""

    def __init__(self, recorder, n_heads):
        self.recorder, self.n_heads = recorder, n_heads
        self.total = None  # [B, H, positions] float64

    def __call__(self, keys, positions, offset):
        queries = self.recorder.drain(offset)
        B = keys.shape[0]
        if self.total is None or self.total.shape[-1] < offset:
            grown = np.zeros((B, self.n_heads, max(offset, 2 * (0 if self.total is None else self.total.shape[-1]))))
            if self.total is not None:
                grown[..., : self.total.shape[-1]] = self.total
            self.total = grown
        group = self.n_heads // keys.shape[1]
        pos = np.repeat(np.array(positions), group, axis=1)  # [B, H, N]
        if queries is not None:
            q_pos = mx.arange(offset - queries.shape[2], offset)
            received = np.array(attention_probs(queries, keys, q_pos, positions).sum(axis=2))  # [B, H, N]
            np.add.at(self.total, (np.arange(B)[:, None, None], np.arange(self.n_heads)[None, :, None], pos), received)
        return mx.array(np.take_along_axis(self.total, pos, axis=-1).astype(np.float32))

    def __deepcopy__(self, memo):
        new = copy.copy(self)  # the recorder is the model's; the totals are this sequence's
        new.total = None if self.total is None else self.total.copy()
        return new


class SnapKVScorer:
    """SnapKV: attention from an observation window of the most recent queries, averaged
    over the window and max-pooled along the sequence, per query head. The cache keeps the
    window (its newest `observe` queries, prompt or generated) and passes it every round."""

    observes = "always"
    OPTIONS = (("observe", int), ("kernel", int))  # the constructor's arguments, in order, as saved

    def __init__(self, observe=32, kernel=7):
        self.observe, self.kernel = observe, kernel

    def __call__(self, keys, positions, offset, queries=None):
        return self.importance(keys, positions, offset, queries)

    @property
    def state(self):
        """What a saved cache keeps of it (strings: saved files take them as they are)."""
        return {"options": [str(getattr(self, name)) for name, _ in self.OPTIONS]}

    @classmethod
    def from_state(cls, state):
        return cls(*(kind(value) for (_, kind), value in zip(cls.OPTIONS, state["options"], strict=True)))

    def importance(self, keys, positions, offset, queries):
        if queries is None:
            raise RuntimeError(f"{type(self).__name__} found no queries to observe: its cache needs its layer's "
                               "rope tap (make_prompt_cache installs it; load_prompt_cache(..., model=) reattaches it)")
        return observation_scores(queries, keys, positions, offset, self.kernel)


def observation_scores(queries, keys, positions, offset, kernel=7):
    """SnapKV's signal: attention of an observation window (the queries at positions
    [offset - M, offset)) over the held keys, averaged over the window and max-pooled along
    the sequence: queries [B, H, M, D], keys [B, H_kv, N, D] -> [B, H, N]."""
    q_pos = mx.arange(offset - queries.shape[2], offset)
    return pool1d(attention_probs(queries, keys, q_pos, positions).mean(axis=2), kernel, "max")


class QueryAwareScorer:
    """A prompt's last queries vote beside a method's score: in the round that ends a
    prompt, the cache passes its observation window (`queries`: the prompt's last real
    queries, [B, H, M, D]) and the score is z(method) + weight * z(observation)
    - redundancy * z(mean_similarity), per query head, max-pooled along the sequence over
    `pool` tokens; in every other round, the method's score alone. With rounds "all" the
    newest queries vote in every round. The redundancy term (0: off) favours keys unlike
    the rest (a second fact in a document) over keys like many others (its running prose)."""

    def __init__(self, scorer, weight=1.0, pool=1, rounds="prompt", redundancy=0.0):
        self.scorer, self.weight, self.pool, self.redundancy = scorer, weight, pool, redundancy
        self.observes = "always" if rounds == "all" else "prompt"
        self.reads_quantized = getattr(scorer, "reads_quantized", False)

    def __call__(self, keys, positions, offset, queries=None):
        raw = self.scorer(keys, positions, offset)
        if queries is None:
            return raw
        if hasattr(keys, "dequantize"):  # quantized storage: attention reads the values it stands for
            keys = keys.dequantize()
        total = zscore(raw) + self.weight * zscore(observation_scores(queries, keys, positions, offset))
        if self.redundancy:
            alike = zscore(mean_similarity(keys))  # per KV head, for each query head of its group
            total = total - self.redundancy * mx.repeat(alike, total.shape[1] // alike.shape[1], axis=1)
        return pool1d(total, self.pool, "max")

    def __deepcopy__(self, memo):
        return self  # the method's scorer: nothing of a sequence's own


class RKVScorer(SnapKVScorer):
    """R-KV: mix * importance (SnapKV-style attention of the newest `observe` queries) -
    (1 - mix) * redundancy, redundancy being the softmaxed mean cosine similarity of a key
    to the others (for each key, the newest key very similar to it is not counted against it)."""

    OPTIONS = SnapKVScorer.OPTIONS + (("mix", float), ("threshold", float))

    def __init__(self, observe=8, kernel=7, mix=0.1, threshold=RKV_THRESHOLD):
        super().__init__(observe, kernel)
        self.mix, self.threshold = mix, threshold

    def __call__(self, keys, positions, offset, queries=None):
        importance = self.importance(keys, positions, offset, queries)  # [B, H, N]
        return self.mix * importance - (1 - self.mix) * mx.repeat(
            redundancy(keys, self.threshold), importance.shape[1] // keys.shape[1], axis=1)


def unit_keys(keys):
    # keys [..., D] -> float32, each scaled to length 1 (cosine similarities are their dot products)
    k = keys.astype(mx.float32)
    return k / (mx.linalg.norm(k, axis=-1, keepdims=True) + 1e-8)


def mean_similarity(keys):
    """Each key's mean cosine similarity to the other keys, softmaxed over the keys: keys
    [B, H_kv, N, D] -> [B, H_kv, N], in O(N D) (the sum of the unit keys, dotted with each).
    R-KV's redundancy without its exception for each key's newest similar key: that exception
    falls almost wholly on the newest key, which the recent window keeps anyway (on
    Qwen2.5-Coder-0.5B's keys of a 3k-token essay, every layer's and head's ranking of the
    other keys was the same: correlation 1.0000), and finding it takes all N x N similarities."""
    k = unit_keys(keys)
    # each key dotted with the sum of all keys (a matmul, not an N x D product summed), less itself
    others = (k @ k.sum(axis=2)[..., None])[..., 0] - mx.square(k).sum(axis=-1)
    return mx.softmax(others / k.shape[2], axis=-1)


def redundancy(keys, threshold):
    """R-KV's redundancy of each key: keys [B, H_kv, N, D] -> [B, H_kv, N], the softmax over
    the keys of each one's mean cosine similarity to the others (for each key, the newest
    key more similar to it than `threshold` is not counted against that one). The N x N
    similarities are taken a block of rows at a time (REDUNDANCY_BLOCK), so a long prompt's
    round never holds them all."""
    k = unit_keys(keys)
    B, H, N, _ = k.shape
    rows = max(1, REDUNDANCY_BLOCK // (B * H * N))
    idx = mx.arange(N)
    total = mx.zeros((B, H, N), mx.float32)
    for start in range(0, N, rows):
        sim = k[:, :, start : start + rows] @ k.swapaxes(-1, -2)  # [B, H_kv, rows, N]
        sim = mx.where(idx[start : start + rows, None] == idx, 0.0, sim)  # not itself
        newest_similar = mx.where(sim > threshold, idx, 0).max(axis=-1, keepdims=True)
        total = total + mx.where(idx == newest_similar, 0.0, sim).sum(axis=-2)
    return mx.softmax(total / N, axis=-1)
