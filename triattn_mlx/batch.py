"""BatchTriAttentionKVCache: TriAttention eviction inside mlx-lm's batch generation.

mlx-lm batches sequences by merging their per-layer caches (`merge`), growing and shrinking
the batch (`extend`, `filter`), and handing a finished sequence's cache back (`extract`).
This cache implements that surface for TriAttentionKVCache:

- one [B, H_kv, L, D] buffer; each row holds its sequence's tokens right-aligned, padding
  on the left (masked through `left_padding`, as mlx-lm's BatchKVCache does);
- each row is pruned on its own schedule: when *its* held tokens reach budget +
  divide_length, it is scored and selected exactly as it would be alone (same keys, same
  positions, same offset), and the rows are re-aligned in one gather per buffer;
- a right-padded prompt (`prepare(lengths=..., right_padding=...)`) leaves padding after a
  short row's real tokens; no real query can attend to it (it comes after them), it is
  never scored or kept, and `finalize` drops it.

So every sequence of a batch keeps the tokens it would keep alone, and the buffer never
holds more than budget + divide_length (plus the chunk being read) tokens per row.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import _BaseCache

from .cache import CacheGroup
from .selection import select_tokens

_FORMING = {}  # key -> group whose member caches are still being created, one per layer


def _group(key, size, make):
    """The group for `key`, shared by the `size` caches created under it (one per layer)."""
    group = _FORMING.get(key)
    if group is None:
        group = _FORMING[key] = make()
    if len(group.members) + 1 >= size:
        _FORMING.pop(key, None)
    return group


def _left_pad(keys, values, positions, L):
    """[B, H, n, ...] buffers padded on the left to length L (padding positions: -1)."""
    pad = [(0, 0), (0, 0), (L - keys.shape[2], 0)]
    return (mx.pad(keys, pad + [(0, 0)]), mx.pad(values, pad + [(0, 0)]),
            mx.pad(positions, pad, constant_values=-1))


class BatchSharedSelection(CacheGroup):
    """`per_head` pruning over a batch: for each due row, one token set per KV head for all
    layers, from scores averaged over layers (the layers reach a prune in the same pass)."""

    def submit(self, cache, scores, views):
        """`views`: the submitting layer's _due_views (the rows and positions are every layer's)."""
        self._scores.append(scores)
        if len(self._scores) < len(self.members):
            return
        submitted, self._scores = self._scores, []
        mean = {key: sum(s[key] for s in submitted) / len(submitted) for key in views}
        keeps = cache._select(views, mean)
        for member in self.members:
            member._compact(keeps)


class BatchTriAttentionKVCache(_BaseCache):
    step = 256

    def __init__(self, budget, scorer, window, divide_length, sinks, left_padding, shared=None):
        self.budget, self.scorer, self.window = budget, scorer, window
        self.divide_length, self.sinks = divide_length, sinks
        self.shared = shared
        if shared is not None:
            shared.members.add(self)
        B = len(left_padding)
        self.keys = self.values = self.positions = None  # positions: [B, H, cap] int32, -1 = padding
        self._idx = 0  # physical length: every row ends here
        self._next = -np.asarray(left_padding, dtype=np.int64)  # position the next token of each row gets
        self._real = np.zeros(B, np.int64)  # real tokens held per row
        self._garbage = np.zeros(B, np.int64)  # right padding after them (prompt in progress)
        self._pending = None  # real tokens still to come per row in a right-padded prompt
        self._trimmable = np.zeros(B, np.int64)
        self.prune_rounds = np.zeros(B, np.int64)
        self._memo = {}  # name -> (host bytes, device array): see _device

    # -- building from and back to single-sequence caches -----------------------------------
    @classmethod
    def merge(cls, caches):
        from .cache import SelfCalibratedScorer

        first = caches[0]
        if isinstance(first.scorer, SelfCalibratedScorer):
            raise ValueError("caches with self-calibrated stats ('self') cannot be batched: each sequence "
                             "would need its own query centers; calibrate once (python -m "
                             "triattn_mlx.calibrate) and pass the stats file")
        if any(getattr(c, "bits", None) is not None for c in caches):
            raise ValueError("quantized TriAttention caches (kv_bits) cannot be batched yet")
        if any((c.budget, c.window, c.divide_length, c.sinks) != (first.budget, first.window, first.divide_length,
                                                                   first.sinks) for c in caches):
            raise ValueError("caches with different budget, window, divide_length or sinks cannot share a batch")
        shared = None
        if first.shared is not None:
            key = ("merge", tuple(c.shared.id for c in caches))
            shared = _group(key, len(first.shared.members), BatchSharedSelection)
        batch = cls(first.budget, first.scorer, first.window, first.divide_length, first.sinks,
                    [0] * len(caches), shared)
        held = [c for c in caches if c.keys is not None]
        batch._next = np.array([c.offset for c in caches], np.int64)
        batch._real = np.array([c.length for c in caches], np.int64)
        batch._trimmable = np.array([c.trimmable_tokens for c in caches], np.int64)
        batch.prune_rounds = np.array([c.prune_rounds for c in caches], np.int64)
        if held:
            L = int(batch._real.max())
            H, D, Dv = held[0].keys.shape[1], held[0].keys.shape[3], held[0].values.shape[3]
            dtype = held[0].keys.dtype
            empty = (mx.zeros((1, H, 0, D), dtype), mx.zeros((1, H, 0, Dv), dtype), mx.zeros((1, H, 0), mx.int32))
            rows = [_left_pad(*((*c._held(), c.token_positions()) if c.keys is not None else empty), L)
                    for c in caches]
            batch.keys, batch.values, batch.positions = (mx.concatenate(x, axis=0) for x in zip(*rows))
            batch._idx = L
        return batch

    def extract(self, idx):
        from .cache import SharedSelection, TriAttentionKVCache

        shared = None
        if self.shared is not None:
            shared = _group(("extract", self.shared.id, idx), len(self.shared.members), SharedSelection)
        cache = TriAttentionKVCache(self.budget, self.scorer, self.window, self.divide_length, self.sinks, shared)
        start, end = self._span(idx)
        if end > start:
            cache.keys, cache.values, cache.positions = (
                mx.contiguous(x[idx : idx + 1, :, start:end]) for x in (self.keys, self.values, self.positions))
        cache.length = cache.kept = end - start
        cache.offset = int(self._next[idx] - self._garbage[idx])
        cache.trimmable_tokens = int(min(self._trimmable[idx], cache.length))
        cache.prune_rounds = int(self.prune_rounds[idx])
        return cache

    # -- the mlx-lm batch cache surface -----------------------------------------------------
    @property
    def offset(self):
        return self._device("offset", self._next)

    @property
    def left_padding(self):
        """Slots before each row's tokens, counting left padding still to come (prepare)."""
        return self._device("left_padding", self._padding())

    def _padding(self):
        return self._idx - self._real - self._garbage + np.maximum(-self._next, 0)

    def _device(self, name, values):
        """`values` (host bookkeeping) as an int32 mx array, remade only when they change:
        the model reads offset and the mask reads left_padding in every layer and step."""
        key = values.tobytes()
        memo = self._memo.get(name)
        if memo is None or memo[0] != key:
            memo = self._memo[name] = (key, mx.array(values.astype(np.int32)))
        return memo[1]

    def make_mask(self, N, return_array=False, window_size=None):
        if N == 1 and window_size is None and not self._padding().any():
            return None  # one new token per row and no padding: it may attend to everything
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, window_size=window_size)

    def update_and_fetch(self, keys, values):
        self._append(keys, values)
        held = self.keys[..., : self._idx, :], self.values[..., : self._idx, :]
        if self._due().any():
            self._prune()
        return held

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty batch cache")
            self._next = self._next - np.asarray(left_padding, np.int64)
        if right_padding is not None and max(right_padding) > 0:
            self._pending = np.asarray(lengths, np.int64).copy()

    def finalize(self):
        """After a right-padded prompt: drop the padding after each row's real tokens."""
        self._pending = None
        if self._garbage.any():
            spans = {b: self._real_slots(b) for b in range(len(self._real))}
            self._next = self._next - self._garbage
            self._garbage[:] = 0
            self._rebuild(spans)

    def filter(self, batch_indices):
        idx = np.asarray(batch_indices, np.int64)
        for name in ("_next", "_real", "_garbage", "_trimmable", "prune_rounds"):
            setattr(self, name, getattr(self, name)[idx])
        if self._pending is not None:
            self._pending = self._pending[idx]
        if self.keys is None:
            return
        rows = mx.array(idx.astype(np.int32))
        content = int((self._real + self._garbage).max()) if len(idx) else 0
        start = self._idx - content
        self.keys, self.values, self.positions = (
            x[rows][:, :, start : self._idx] for x in (self.keys, self.values, self.positions))
        self._idx = content

    def extend(self, other):
        if self._pending is not None or other._pending is not None:
            raise ValueError("cannot extend a batch cache while a right-padded prompt is in progress")
        if other.keys is not None or self.keys is not None:
            L = max(self._idx, other._idx)
            like = self if self.keys is not None else other
            parts = [c._left_padded(L, like) for c in (self, other)]
            self.keys, self.values, self.positions = (mx.concatenate(x, axis=0) for x in zip(*parts))
            self._idx = L
        for name in ("_next", "_real", "_garbage", "_trimmable", "prune_rounds"):
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self._idx, :], self.values[..., : self._idx, :], self.positions[..., : self._idx]

    @property
    def meta_state(self):
        raise ValueError("a batch cache cannot be saved: extract each sequence's cache first")

    def is_trimmable(self):
        return False

    def trim(self, n):
        return 0

    def size(self):
        return self._idx

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes + self.positions.nbytes

    # -- internals ---------------------------------------------------------------------------
    def _span(self, b):
        """Physical slots [start, end) of row b's real tokens."""
        end = self._idx - int(self._garbage[b])
        return end - int(self._real[b]), end

    def _real_slots(self, b):
        start, end = self._span(b)
        return mx.arange(start, end, dtype=mx.int32)

    def _left_padded(self, L, like):
        """Buffers cut to the held length, padded on the left to L (empty ones shaped like `like`)."""
        if self.keys is None:
            B = len(self._real)
            k, v = (mx.zeros((B, x.shape[1], 0, x.shape[3]), x.dtype) for x in (like.keys, like.values))
            return _left_pad(k, v, mx.zeros((B, like.keys.shape[1], 0), mx.int32), L)
        return _left_pad(*(x[:, :, : self._idx] for x in (self.keys, self.values, self.positions)), L)

    def _append(self, keys, values):
        B, H, N, D = keys.shape
        cap = 0 if self.keys is None else self.keys.shape[2]
        if self._idx + N > cap:
            grow = (self._idx + N - cap + self.step - 1) // self.step * self.step
            room = [mx.zeros((B, H, grow, x.shape[3]), x.dtype) for x in (keys, values)]
            room.append(mx.full((B, H, grow), -1, mx.int32))
            if self.keys is None:
                self.keys, self.values, self.positions = room
            else:
                self.keys, self.values, self.positions = (
                    mx.concatenate([x[:, :, : self._idx], r], axis=2)
                    for x, r in zip((self.keys, self.values, self.positions), room))
                mx.eval(self.keys, self.values, self.positions)  # free the old buffers now (see _rebuild)
        if self._pending is None and self._next.min() >= 0:
            # The usual case (decode, unpadded prompts): every new token is real and the
            # positions follow the offsets, computed on the device
            self._real += N
            self._trimmable += N
            before = self.offset
            marked = before[:, None] + mx.arange(N, dtype=mx.int32)
            self._next = self._next + N
            self._memo["offset"] = (self._next.tobytes(), before + N)
        else:
            j = np.arange(N)
            pos = self._next[:, None] + j[None]
            real = pos >= 0  # left padding of an empty cache comes first, at negative positions
            if self._pending is not None:
                real &= j[None] < self._pending[:, None]
                self._pending = self._pending - real.sum(1)
            n_real = real.sum(1)
            # Right padding: a row's tokens past its prompt are padding (after its real ones)
            self._garbage += (N - n_real) - (pos < 0).sum(1)
            self._real += n_real
            self._trimmable += n_real
            marked = mx.array(np.where(real, pos, -1).astype(np.int32))
            self._next = self._next + N
        end = self._idx + N
        self.keys[..., self._idx : end, :] = keys
        self.values[..., self._idx : end, :] = values
        self.positions[..., self._idx : end] = mx.broadcast_to(marked[:, None], (B, H, N))
        self._idx = end

    def _due(self):
        return self._real >= self.budget + self.divide_length

    def _due_views(self):
        """Rows due for pruning, grouped by where their real tokens lie: {(start, end,
        offset): (rows, keys, positions)}, keys/positions [len(rows), H, end - start, ...].
        Rows in step (the usual case) are scored in one call."""
        groups = {}
        for b in np.flatnonzero(self._due()):
            start, end = self._span(b)
            groups.setdefault((start, end, int(self._next[b] - self._garbage[b])), []).append(int(b))
        views = {}
        for (start, end, offset), rows in groups.items():
            keys, positions = self.keys[..., start:end, :], self.positions[..., start:end]
            if len(rows) < len(self._real):
                index = mx.array(rows)
                keys, positions = mx.take(keys, index, axis=0), mx.take(positions, index, axis=0)
            views[(start, end, offset)] = (rows, keys, positions)
        return views

    def _prune(self):
        views = self._due_views()
        scores = {key: self.scorer(keys, positions, key[2]) for key, (_, keys, positions) in views.items()}
        mx.eval(list(scores.values()))  # frees the scored copies before the next layer makes its own
        if self.shared is not None:
            self.shared.submit(self, scores, views)
            return
        self._compact(self._select(views, scores))

    def _select(self, views, scores):
        """{row: [1, H, budget] kept indices into its real tokens}."""
        keeps = {}
        for key, (rows, _, positions) in views.items():
            keep = select_tokens(scores[key], positions, key[2], self.budget, self.window, self.sinks)
            keeps.update({b: keep[i : i + 1] for i, b in enumerate(rows)})
        return keeps

    def _compact(self, keeps):
        """Rows in `keeps` ({row: [1, H, K] indices into its real tokens}) keep those tokens,
        then their right padding if a prompt is in progress; other rows keep everything."""
        spans = {}
        for b in range(len(self._real)):
            start, end = self._span(b)
            if b in keeps:
                kept = keeps[b] + start
                tail = mx.broadcast_to(mx.arange(end, self._idx, dtype=mx.int32), (1, kept.shape[1], self._idx - end))
                spans[b] = mx.concatenate([kept.astype(mx.int32), tail], axis=-1)
                self._real[b] = keeps[b].shape[-1]
                self._trimmable[b] = min(self._trimmable[b], self.window)
                self.prune_rounds[b] += 1
            else:
                spans[b] = mx.arange(start, self._idx, dtype=mx.int32)
        self._rebuild(spans)

    def _rebuild(self, spans):
        """Re-align the rows: row b becomes the slots spans[b] ([n] or [1, H, n]), right-aligned,
        in one gather per buffer, with divide_length free slots after them."""
        H = self.keys.shape[1]
        lengths = {b: s.shape[-1] for b, s in spans.items()}
        L = max(lengths.values())
        room = self.divide_length
        rows, pads = [], []
        for b in range(len(spans)):
            s = mx.broadcast_to(spans[b].reshape(1, -1, lengths[b]), (1, H, lengths[b]))
            rows.append(mx.concatenate([mx.zeros((1, H, L - lengths[b]), mx.int32), s,
                                        mx.zeros((1, H, room), mx.int32)], axis=-1))
            pads.append(np.r_[np.ones(L - lengths[b], bool), np.zeros(lengths[b], bool), np.ones(room, bool)])
        index = mx.concatenate(rows, axis=0)
        self.keys, self.values = (mx.take_along_axis(x, index[..., None], axis=2) for x in (self.keys, self.values))
        positions = mx.take_along_axis(self.positions, index, axis=2)
        self.positions = mx.where(mx.array(np.stack(pads))[:, None], -1, positions)
        self._idx = L
        # Materialize now, so the old buffers are freed before the next layer compacts: a
        # lazy prune step would hold every layer's old and new buffers at once (twice the KV).
        mx.eval(self.keys, self.values, self.positions)
