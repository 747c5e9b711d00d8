"""BatchTriAttentionKVCache: TriAttentionKVCache with mlx-lm's batch-cache surface.

mlx-lm batches sequences by merging their per-layer caches (`merge`), growing and shrinking
the batch (`extend`, `filter`), and handing a finished sequence's cache back (`extract`).
The lifecycle is TriAttentionKVCache's: the rows here are right-aligned (padding on the
left, masked through `left_padding` as mlx-lm's BatchKVCache does), and each row is pruned
when *its* held tokens reach budget + divide_length, scored and selected exactly as it
would be alone (same keys, positions, offset). A right-padded prompt
(`prepare(lengths=..., right_padding=...)`) leaves padding after a short row's real
tokens: no real query attends to it (it comes after them), it is never scored or kept,
and `finalize` drops it. So every sequence keeps the tokens it would keep alone.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_causal_mask

from .cache import TriAttentionKVCache
from .groups import forming_group
from .methods import Unsaveable, check_batchable

ROW_FIELDS = ("_first", "_shift", "_garbage", "_trim_from", "_rounds", "_reading", "_prompt_end", "_ending",
              "_window_count")  # per-row bookkeeping (the observation window is an array of rows too)


class BatchTriAttentionKVCache(TriAttentionKVCache, batch_form_of=TriAttentionKVCache):
    _eval_on_compact = True  # each layer's compaction frees its old buffers before the next's
    _defers = False  # rows end their prompts apart, and the batch is filtered and extended between steps

    def __init__(self, *, settings, scorer, left_padding, group=None, observer=None):
        super().__init__(settings=settings, scorer=scorer, group=group, observer=observer)
        self._init_rows(len(left_padding))
        self._shift -= np.asarray(left_padding, np.int64)
        self._update_schedule()
        self._memo = {}  # name -> (host bytes, device array): see _device

    # -- building from and back to single-sequence caches -----------------------------------
    @classmethod
    def merge(cls, caches):
        head = caches[0]
        check_batchable(head.scorer)
        if any(c.settings != head.settings for c in caches):
            raise ValueError("caches with different compression settings cannot share a batch")
        if head.settings.kv_bits is not None:
            raise ValueError("quantized TriAttention caches (kv_bits) cannot be batched yet")
        group = None
        if head.group is not None:
            group = forming_group(("merge", *(c.group.id for c in caches)), len(head.group.members))
        batch = cls(settings=head.settings, scorer=head.scorer, left_padding=[0] * len(caches), group=group,
                    observer=head.observer)
        batch.switch = head.switch
        held = [c for c in caches if c.keys is not None]
        if held:
            L = max(c.size() for c in caches)
            like = held[0]
            batch.keys, batch.values, batch.positions = (mx.concatenate(x, axis=0) for x in zip(
                *(_left_padded(c, L, like) for c in caches)))
            batch._idx = batch._stored = L
        lengths = np.array([c.size() for c in caches], np.int64)
        batch._first = batch._idx - lengths
        batch._shift = np.array([c.offset for c in caches], np.int64) - batch._idx
        batch._trim_from = batch._idx - np.array([c.trimmable_tokens for c in caches], np.int64)
        batch._rounds = np.array([c.prune_rounds for c in caches], np.int64)
        for name in ROW_FIELDS[5:]:
            setattr(batch, name, np.concatenate([np.zeros(1, getattr(batch, name).dtype) if getattr(c, name) is None
                                                 else getattr(c, name)[:1] for c in caches]))
        batch._window = _stacked_windows([(c._window, 1) for c in caches])
        batch._update_schedule()
        return batch

    def extract(self, idx):
        group = None
        if self.group is not None:
            group = forming_group(("extract", self.group.id, idx), len(self.group.members))
        cache = TriAttentionKVCache(settings=self.settings, scorer=self.scorer, group=group, observer=self.observer)
        cache.switch = self.switch
        start, end = int(self._first[idx]), self._idx - int(self._garbage[idx])
        if end > start:
            self._materialize()
            cache.keys, cache.values, cache.positions = (
                mx.contiguous(x[idx : idx + 1, :, start:end]) for x in (self.keys, self.values, self.positions))
        n = end - start
        cache._init_rows(1, start=int(self._shift[idx]) + end - n)
        cache._idx = cache._stored = n
        cache._trim_from[:] = n - min(end - int(self._trim_from[idx]), n)
        cache._rounds[:] = self._rounds[idx]
        for name in ROW_FIELDS[5:]:
            getattr(cache, name)[:] = getattr(self, name)[idx]
        cache._window = None if self._window is None else self._window[idx : idx + 1]
        cache._update_schedule()
        return cache

    # -- the mlx-lm batch cache surface -----------------------------------------------------
    @property
    def offset(self):
        return self._device("offset", self._shift + self._idx)

    @property
    def left_padding(self):
        """Slots before each row's tokens, counting left padding still to come (prepare)."""
        return self._device("left_padding", self._padding())

    @property
    def prune_rounds(self):
        return self._rounds

    def _padding(self):
        return self._first + np.maximum(-(self._shift + self._idx), 0)

    def _device(self, name, values):
        """`values` (host bookkeeping) as an int32 mx array, remade only when they change:
        the model reads offset and the mask reads left_padding in every layer and step."""
        key = values.tobytes()
        memo = self._memo.get(name)
        if memo is None or memo[0] != key:
            memo = self._memo[name] = (key, mx.array(values.astype(np.int32)))
        return memo[1]

    def make_mask(self, N, return_array=False, window_size=None):
        self._switch_taps(decoding=False)  # rows may be reading prompts: the taps stay in
        if N == 1 and window_size is None and not self._padding().any():
            return None  # one new token per row and no padding: it may attend to everything
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, window_size=window_size)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty batch cache")
            self._shift = self._shift - np.asarray(left_padding, np.int64)
        if right_padding is not None and max(right_padding) > 0:
            self._pending = np.asarray(lengths, np.int64).copy()
        self._update_schedule()

    def finalize(self):
        """After a right-padded prompt: drop the padding after each row's real tokens."""
        self._pending = None
        if self._garbage.any():
            self._compact([], drop_garbage=True)  # every row keeps its real tokens, re-aligned
            self._shift = self._shift - self._garbage
            self._garbage[:] = 0
        self._update_schedule()

    def filter(self, batch_indices):
        idx = np.asarray(batch_indices, np.int64)
        if self._pending is not None:
            self._pending = self._pending[idx]
        if self.keys is not None:
            self._materialize()
            content = int((self._idx - self._first[idx]).max()) if len(idx) else 0
            start = self._idx - content
            rows = mx.array(idx.astype(np.int32))
            self.keys, self.values, self.positions = (
                x[rows][:, :, start : self._idx] for x in (self.keys, self.values, self.positions))
            self._first = self._first - start
            self._trim_from = self._trim_from - start
            self._shift = self._shift + start
            self._idx = self._stored = content
        for name in ROW_FIELDS:
            setattr(self, name, getattr(self, name)[idx])
        if self._window is not None:
            self._window = self._window[mx.array(idx.astype(np.int32))]
        self._update_schedule()

    def extend(self, other):
        if self._pending is not None or other._pending is not None:
            raise ValueError("cannot extend a batch cache while a right-padded prompt is in progress")
        L = max(self._idx, other._idx)
        if other.keys is not None or self.keys is not None:
            like = self if self.keys is not None else other
            parts = [_left_padded(c, L, like) for c in (self, other)]
            self.keys, self.values, self.positions = (mx.concatenate(x, axis=0) for x in zip(*parts))
        for c in (self, other):  # each batch's bookkeeping, moved to slots ending at L
            c._first, c._trim_from, c._shift = c._first + L - c._idx, c._trim_from + L - c._idx, c._shift - L + c._idx
        self._window = _stacked_windows([(self._window, len(self._first)), (other._window, len(other._first))])
        for name in ROW_FIELDS:
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))
        self._idx = self._stored = L
        self._update_schedule()

    @property
    def state(self):
        if self.keys is None:
            return []
        return (*self._held(), self.token_positions(),
                Unsaveable("a batch cache cannot be saved: extract each sequence's cache first"))

    def is_trimmable(self):
        return False

    def trim(self, n):
        return 0


def _stacked_windows(windows):
    """One observation window for rows joined from [(window or None, rows)]: a missing one
    is zeros (its rows' counts are 0: they have none)."""
    like = next((w for w, _ in windows if w is not None), None)
    if like is None:
        return None
    return mx.concatenate([w if w is not None else mx.zeros((n, *like.shape[1:]), like.dtype) for w, n in windows])


def _left_padded(cache, L, like):
    """A cache's held keys, values and positions ([B, H, n, ...]), padded on the left to L
    slots (padding positions -1); an empty cache is shaped like `like`."""
    if cache.keys is None:
        B = 1 if cache._first is None else len(cache._first)
        n_kv = like.keys.shape[1]
        keys, values = (mx.zeros((B, n_kv, 0, x.shape[3]), x.dtype) for x in (like.keys, like.values))
        positions = mx.zeros((B, n_kv, 0), mx.int32)
    else:
        (keys, values), positions = cache._held(), cache.token_positions()
    pad = [(0, 0), (0, 0), (L - keys.shape[2], 0)]
    return (mx.pad(keys, pad + [(0, 0)]), mx.pad(values, pad + [(0, 0)]),
            mx.pad(positions, pad, constant_values=-1))
