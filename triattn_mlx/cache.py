"""TriAttentionKVCache: an mlx-lm KV cache that stays at a fixed budget.

Lifecycle of one update_and_fetch call:
  1. append the new keys/values to the buffer;
  2. hand the held tokens to attention for this call;
  3. for each row holding budget + divide_length tokens: score its keys (the method's
     scorer), select (selection.py: normalize, GQA, window and sinks, top-k; per_head
     pruning first averages the layers' scores, groups.py) and compact the buffer.
Pruning after the fetch keeps this call's mask (made from the size before the append)
consistent, and means a chunk of a long prompt is compressed as soon as it is read.

The buffer is [B, H_kv, slots, D]. Each row's tokens end at the same slot `_idx`; a row may
start later (left padding, batch.py) and, while a right-padded prompt is read, end with
padding (`_garbage`). A single-sequence cache's rows move in lockstep; the batch cache is
this cache with mlx-lm's batch surface, its rows pruned each on its own schedule.
Positions are absolute (`offset` is the next token's), so RoPE keeps seeing true positions
after eviction. They are stored for the slots before `_stored` (survivors of the last
compaction, padding = -1); the slots after it hold fresh tokens whose positions follow
from the row's `_shift` (position = shift + slot), so decoding does no position bookkeeping.
"""

import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import _BaseCache, create_attention_mask

from .baselines import mean_similarity
from .groups import forming_group
from .methods import restore_scorer, saved_scorer
from .scoring import QuantizedKeys
from .selection import gather_tokens, head_scores, protected_tokens, select_tokens
from .settings import Settings
from .taps import plug_all


def first(buffer):
    """The array of a buffer that gives its shape: itself, or a quantized triple's packed part."""
    return buffer[0] if isinstance(buffer, tuple) else buffer


class TriAttentionKVCache(_BaseCache):
    step = 256
    _plain = True  # keys and values are arrays (QuantizedTriAttentionKVCache: packed triples)
    _eval_on_compact = False  # batch caches materialize each layer's compaction (memory)
    _batch_form = None  # the batch cache class (batch.py registers itself here)
    _defers = True  # the round a prompt's last token makes due runs at the next call (batch: at once)
    switch = None  # taps.QuerySwitch of the cache set: its query taps leave the decode path

    def __init_subclass__(cls, batch_form_of=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if batch_form_of is not None:
            batch_form_of._batch_form = cls

    def __init__(self, *, settings, scorer, group=None, observer=None, measure_prune_time=False):
        if not isinstance(settings, Settings):
            raise TypeError(f"settings must be a triattn_mlx.Settings, got {type(settings).__name__}")
        if not callable(scorer):
            raise ValueError("scorer must be callable: (keys, positions, offset) -> scores")
        self.settings, self.scorer, self.group = settings, scorer, group
        if group is not None:
            group.add(self)
        # The layer's rope tap (observer) hands over each call's queries; the cache keeps the
        # last `observe` real ones per row (its window) for scorers that read them: "prompt"
        # (TriAttention's vote, settings.observe) keeps those of a prompt being read, and they
        # vote in the round that ends it; "always" (SnapKV, R-KV: their `observe`) keeps the
        # newest seen, prompt or generated, and they score every round.
        self.observer, self._window, self._chunk_real = observer, None, None
        self._round_positions = None  # token_positions() of a round under way, for its compaction
        self._deferred = None  # rows due when a prompt ended: their round runs at the next call (_settle)
        self.keys = self.values = self.positions = None
        self._idx = self._stored = 0  # slots held; slots whose positions are stored
        self._first = None  # per row, np.int64 [B]: first slot of its real tokens
        self._shift = None  # per row: position of a fresh slot s is shift + s
        self._garbage = None  # per row: right padding after its real tokens
        self._trim_from = None  # per row: slots from here are trimmable (in every head)
        self._rounds = None  # per row: prune rounds
        self._reading = None  # per row: a prompt is being read (tokens arrive several per call)
        self._ending = None  # per row: this call's token ends a prompt
        self._window_count = None  # per row: real queries in the observation window
        self._prompt_end = None  # per row: position after the last prompt read (prompt_mode "keep")
        self._reading_any = False
        self._pending = None  # right-padded prompt: real tokens still to come per row
        self._padded_input = False  # the next tokens may include padding: track them slot by slot
        self._due_at = settings.budget + settings.divide_length  # _idx at which a row is due
        # Timing a round needs two synchronizations per layer: off unless asked for.
        self.measure_prune_time, self.prune_seconds = measure_prune_time, 0.0
        self.prune_phases = {"score": 0.0, "select_compact": 0.0}  # of prune_seconds, when measured

    def _init_rows(self, B, start=0):
        self._first, self._garbage = np.zeros(B, np.int64), np.zeros(B, np.int64)
        self._shift = np.full(B, start, np.int64)
        self._trim_from, self._rounds = np.zeros(B, np.int64), np.zeros(B, np.int64)
        self._reading, self._prompt_end = np.zeros(B, bool), np.zeros(B, np.int64)
        self._ending, self._window_count = np.zeros(B, bool), np.zeros(B, np.int64)

    # -- the mlx-lm cache surface ---------------------------------------------------------
    def update_and_fetch(self, keys, values):
        if self._deferred is not None:
            self._settle()
        N, i = keys.shape[2], self._idx
        if N == 1 and self._plain and not (self._reading_any or self._padded_input) and self.keys is not None \
                and i < self.keys.shape[2]:
            # A decode step into the room the last round left (what _append does, minus the
            # bookkeeping it needs: batch-1 decode is launch-bound, every microsecond counts)
            self.keys[..., i : i + 1, :] = keys
            self.values[..., i : i + 1, :] = values
            self._idx = i = i + 1
            self._chunk_real = None
            if self.observer is not None:
                if self.observes == "always":
                    self._observe(1)
                else:
                    self.observer.latest = None  # its copy of this step's queries: only a prompt's are used
            held = self.keys[..., :i, :], self.values[..., :i, :]
            if i >= self._due_at:
                self._prune()
            return held
        self._append(keys, values)
        held = self._held()
        reading = N > 1 or self._reading_any  # a prompt chunk, or the single token that ends a prompt
        if self.observer is not None and (reading or self.observes == "always"):
            self._observe(N)
        if reading:
            due = self._prompt_due(N)
            if due.any():
                if N == 1 and self._defers:
                    # The prompt's last token: its attention reads the whole prompt, and the
                    # round that selects it waits for the next call, so that building it (a
                    # few hundred microseconds of host time per layer) is not on the path to
                    # the first token: mlx-lm builds the next step while the GPU computes it.
                    self._deferred = due
                    return held  # _ending stays set: the round votes with the prompt's window
                self._prune(due)
            self._ending[:] = False
        elif self._idx >= self._due_at:
            self._prune()
        return held

    def _settle(self):
        """Run the round a prompt's last token left pending, in every layer of the group at
        once (they select together). Anything that reads or changes what the cache holds
        calls this first."""
        if self._deferred is None:
            return
        for member in list(self.group.members) if self.group is not None else [self]:
            due, member._deferred = member._deferred, None
            if due is not None:
                member._prune(due)
                member._ending[:] = False

    @classmethod
    def merge(cls, caches):
        """One batch cache from one cache per sequence (mlx-lm's batch generation calls this)."""
        return cls._batch_form.merge(caches)

    @property
    def offset(self):
        return 0 if self._shift is None else int(self._shift[0]) + self._idx

    @property
    def observes(self):
        """What the scorer reads of the queries: None, "prompt" or "always" (see __init__)."""
        return getattr(self.scorer, "observes", None)

    @property
    def observe(self):
        """Queries the window keeps."""
        return getattr(self.scorer, "observe", self.settings.observe)

    @property
    def prune_rounds(self):
        self._settle()
        return 0 if self._rounds is None else int(self._rounds.max())

    @property
    def trimmable_tokens(self):
        """Newest tokens guaranteed present in every head: trim(n) works up to this."""
        self._settle()
        return 0 if self._trim_from is None else int((self._idx - self._garbage - self._trim_from).min())

    def make_mask(self, N, return_array=False, window_size=None):
        # The new tokens follow every cached one: the mask only needs the physical length.
        self._settle()
        self._switch_taps(decoding=N == 1 and not self._reading_any)
        return create_attention_mask(N, offset=self._idx, return_array=return_array, window_size=window_size)

    def _switch_taps(self, decoding):
        """A forward is starting (mlx-lm models make their mask first): the query taps are
        needed while a prompt is read (and by scorers that observe always) and are taken out
        of the path of a decode step."""
        if not decoding or self.observes == "always":
            plug_all()
        elif self.switch is not None:
            self.switch.unplug()

    def is_trimmable(self):
        # As mlx-lm's RotatingKVCache: trimmable until tokens are evicted. After that only
        # the newest trimmable_tokens can be trimmed (trim says how many it did), and
        # mlx-lm's prompt cache must not count on trimming it back arbitrarily.
        return self.prune_rounds == 0

    def trim(self, n):
        """Drop the newest n tokens if they are all still cached; else trim nothing, return 0."""
        self._settle()
        n = min(self.offset, n)
        if n > self.trimmable_tokens:
            return 0
        self._idx -= n
        self._stored = min(self._stored, self._idx)
        self._round_positions = None
        return n

    def size(self):
        self._settle()
        return self._idx

    def empty(self):
        return self.keys is None

    @property
    def nbytes(self):
        self._settle()
        if self.keys is None:
            return 0
        return sum(x.nbytes for _, x in tree_flatten((self.keys, self.values))) + self.positions.nbytes

    def token_positions(self):
        """Absolute position of every held slot: [B, H_kv, size()] int32 (padding: -1)."""
        self._settle()
        B, n_kv = first(self.keys).shape[:2]
        fresh = mx.array(self._shift.astype(np.int32))[:, None, None] + mx.arange(self._stored, self._idx,
                                                                                    dtype=mx.int32)
        fresh = mx.broadcast_to(fresh, (B, n_kv, self._idx - self._stored))
        if self._stored == 0:
            return fresh
        return mx.concatenate([self.positions[..., : self._stored], fresh], axis=2)

    # -- storage: plain arrays here; (packed, scales, biases) in QuantizedTriAttentionKVCache --
    def _held(self):
        return tree_map(lambda x: x[..., : self._idx, :], (self.keys, self.values))

    def _storage_form(self, keys, values):
        return keys, values

    def _scoring_keys(self, start, end):
        """The keys of slots [start, end) as the scorer takes them."""
        return self.keys[..., start:end, :]

    def dense_bytes_per_token(self):
        """Bytes one token takes in an unquantized cache (mlx-lm's KVCache) of this model."""
        B, n_kv = self.keys.shape[:2]
        return B * n_kv * (self.keys.shape[3] * self.keys.dtype.size + self.values.shape[3] * self.values.dtype.size)

    # -- lifecycle --------------------------------------------------------------------------
    def _append(self, keys, values):
        B, n_kv, N, _ = keys.shape
        if self._shift is None:
            self._init_rows(B)
        new = self._storage_form(keys, values)
        capacity = 0 if self.keys is None else first(self.keys).shape[2]
        if self._idx + N > capacity:  # grow: the held slots, then room for N more in whole steps
            grow = (N + self.step - 1) // self.step * self.step
            room = tree_map(lambda x: mx.zeros((B, n_kv, grow, x.shape[3]), x.dtype), new)
            room_positions = mx.full((B, n_kv, grow), -1, mx.int32)
            if self.keys is None:
                (self.keys, self.values), self.positions = room, room_positions
            else:
                self.keys, self.values = tree_map(lambda o, r: mx.concatenate([o, r], axis=2), self._held(), room)
                self.positions = mx.concatenate([self.positions[..., : self._idx], room_positions], axis=2)
                if self._eval_on_compact:
                    mx.eval(self.keys, self.values, self.positions)  # free the old buffers now
        end = self._idx + N

        def write(buffer, x):
            buffer[..., self._idx : end, :] = x

        tree_map(write, (self.keys, self.values), new)
        self._chunk_real = None
        padded = self._padded_input
        if padded:
            self._mark_padded(N)
        self._idx = end
        if padded:
            self._update_schedule()

    def _mark_padded(self, N):
        """Positions of a chunk that may hold padding (batch.py: a left-padded start, or a
        right-padded prompt), stored slot by slot: padding gets -1 and is never scored."""
        self._materialize()
        j = np.arange(N)
        pos = (self._shift + self._idx)[:, None] + j[None]
        real = pos >= 0  # left padding of an empty row comes first, at negative positions
        if self._pending is not None:
            real &= j[None] < self._pending[:, None]
            self._pending = self._pending - real.sum(1)
        left = (pos < 0).sum(1)
        self._first += left
        self._trim_from = np.maximum(self._trim_from, self._first)
        self._garbage += N - real.sum(1) - left  # right padding: after the row's real tokens
        self._chunk_real = real
        marked = mx.array(np.where(real, pos, -1).astype(np.int32))
        B, n_kv = self.positions.shape[:2]
        self.positions[..., self._idx : self._idx + N] = mx.broadcast_to(marked[:, None], (B, n_kv, N))
        self._stored = self._idx + N

    def _materialize(self):
        """Store the positions of the fresh slots."""
        if self._stored < self._idx:
            self.positions[..., self._stored : self._idx] = self.token_positions()[..., self._stored :]
            self._stored = self._idx

    def _observe(self, N):
        """Keep, per row, the last `observe` real queries: the window (padding's queries are
        skipped: a row's real tokens are contiguous in a chunk, its left padding before them,
        its right after)."""
        B, W = len(self._first), self.observe
        queries = self.observer.take(B, N)
        if queries is None:
            return
        H, D = queries.shape[1], queries.shape[3]
        held = self._window if self._window is not None else mx.zeros((B, H, W, D), queries.dtype)
        if self._chunk_real is None:  # every new query is real: the last W of them
            window, added = mx.concatenate([held, queries[:, :, -W:]], axis=2)[:, :, -W:], N
        else:
            both = mx.concatenate([held, queries], axis=2)  # [B, H, W + N, D]
            real = self._chunk_real
            added = real.sum(1)  # the chunk's real queries are contiguous in each row
            end = W + np.where(added > 0, real.argmax(1), 0) + added  # after the row's last real query
            index = np.clip(end[:, None] - W + np.arange(W)[None], 0, W + N - 1).astype(np.int32)
            window = mx.take_along_axis(both, mx.broadcast_to(mx.array(index)[:, None, :, None], (B, H, W, D)),
                                        axis=2)
        self._window = mx.contiguous(window)
        if N > 1:
            # A copy, computed now: a lazy slice would keep the whole chunk's queries alive.
            # (Evaluating each layer's window as it comes also splits the chunk's graph by
            # layer, which frees its intermediates sooner: on the H200 at 16k tokens the
            # prefill peak was 12.4 GB this way against 16.8 GB evaluated once per chunk.)
            mx.async_eval(self._window)
        self._window_count = np.minimum(self._window_count + added, W)

    def _prompt_due(self, N):
        """Rows to prune after a prompt chunk (N > 1 tokens: while a prompt is read, rows over
        the reading limit) or after the single token that ends a prompt (those rows prune to
        their budget at once: the prompt's last queries vote now, settings.observe)."""
        s = self.settings
        real = self._idx - self._garbage - self._first
        if N > 1:
            self._reading[:], self._reading_any = True, True
            limit = s.reading_limit
            return real >= limit if limit is not None else np.zeros_like(self._reading)
        ending = self._ending = self._reading.copy()
        self._reading[:], self._reading_any = False, False
        self._prompt_end = np.where(ending, self._shift + self._idx - self._garbage, self._prompt_end)
        self._update_schedule()
        budgets = self._budgets()
        return (real >= budgets + s.divide_length) | (ending & (real > budgets))

    def _budgets(self):
        """Tokens each row keeps after a round: the budget; with prompt_mode "keep", at least
        its prompt and recent window (those are never evicted)."""
        s = self.settings
        if s.prompt_mode != "keep":
            return np.full(len(self._first), s.budget)
        return np.maximum(s.budget, self._prompt_end + s.window)

    def _update_schedule(self):
        """After rows changed: when the next row is due, and whether input may hold padding."""
        s = self.settings
        # (no rows, after a batch filtered them all: never due)
        self._due_at = int((self._first + self._garbage + self._budgets()).min(initial=2**62)) + s.divide_length
        self._padded_input = self._pending is not None or bool((self._shift + self._idx < 0).any())
        self._reading_any = bool(self._reading.any())

    def _due_views(self, due=None):
        """Rows due for pruning (`due`, else those at budget + divide_length), grouped by where
        their real tokens lie and what they keep: {(start, end, offset, budget, protected
        below, ends a prompt): (rows, keys, positions)}, keys/positions [len(rows), H_kv,
        end - start, ...].
        Rows in step (a single sequence, a batch in step) are scored in one call."""
        s = self.settings
        ends = self._idx - self._garbage
        budgets = self._budgets()
        if due is None:
            due = ends - self._first >= budgets + s.divide_length
        below = np.maximum(s.sinks, self._prompt_end if s.prompt_mode == "keep" else np.zeros_like(self._first))
        groups = {}
        for b in np.flatnonzero(due):
            start, end = int(self._first[b]), int(ends[b])
            key = (start, end, int(self._shift[b]) + end, int(budgets[b]), int(below[b]), bool(self._ending[b]))
            groups.setdefault(key, []).append(int(b))
        if not groups:
            return {}
        # kept for this round's compaction (per_head: at the group's last layer, same pass)
        positions = self._round_positions = self.token_positions()
        views = {}
        for key, rows in groups.items():
            start, end = key[:2]
            keys, held = self._scoring_keys(start, end), positions[..., start:end]
            if len(rows) < len(self._first):
                index = mx.array(rows)
                keys = tree_map(lambda x: mx.take(x, index, axis=0), keys)
                held = mx.take(held, index, axis=0)
            views[key] = (rows, keys, held)
        return views

    def _prune(self, due=None):
        views = self._due_views(due)
        if not views:
            return
        timed = self.measure_prune_time
        if timed:
            mx.eval([v[1:] for v in views.values()])  # what the forward pass owes is not scoring time
        start = time.perf_counter()
        n_kv, window = first(self.keys).shape[1], self.settings.window
        # z-normalized over the tokens that may be evicted: the protected ones (window,
        # sinks, a kept prompt) are kept whatever they score and must not skew the others
        scores = {}
        for key, (rows, keys, positions) in views.items():
            candidates = ~protected_tokens(positions, key[2], window, key[4])
            scores[key] = head_scores(self._score(keys, positions, key[2], rows, key[5]), n_kv, candidates)
            if self.settings.coverage(ending=key[5])[2] == "distinct":  # the quotas' ranking, beside it
                plain = keys.dequantize() if hasattr(keys, "dequantize") else keys
                distinct = head_scores(-mean_similarity(plain), n_kv, candidates)
                # evaluated now, [B, H_kv, N]: left lazy, every layer's float32 copies of its keys
                # could be live at once (H100, 16k: +0.4-1.0 GiB peak in 2 of 3 runs; RESULTS 0.10)
                mx.eval(distinct)
                scores[key] = mx.stack([scores[key], distinct])
        if self._eval_on_compact or timed:
            mx.eval(list(scores.values()))  # frees the scored copies before the next layer makes its own
        scored = time.perf_counter()
        if self.group is not None:
            self.group.submit(self, scores, views)  # the last layer to submit compacts them all
        else:
            self._compact(self._select(views, scores))
        if timed:
            members = self.group.members if self.group is not None else [self]
            mx.eval([(m.keys, m.values, m.positions) for m in members])
            end = time.perf_counter()
            self.prune_phases["score"] += scored - start
            self.prune_phases["select_compact"] += end - scored
            self.prune_seconds += end - start

    def _score(self, keys, positions, offset, rows, ending):
        if self.observes is None:
            return self.scorer(keys, positions, offset)
        # "prompt": the prompt's last `observe` queries vote in the round that ends it;
        # "always": the newest queries seen score every round (all rows' newest M, M >= 1)
        seen = 0 if self._window is None else int(self._window_count[rows].min())
        queries = None
        if seen >= (self.observe if self.observes == "prompt" else 1) and (ending or self.observes == "always"):
            queries = self._window if len(rows) == len(self._first) else mx.take(self._window, mx.array(rows), axis=0)
            queries = queries[:, :, self.observe - seen :]
        return self.scorer(keys, positions, offset, queries=queries)

    def _select(self, views, scores):
        """[(rows, start, keep)]: keep [len(rows), H_kv, budget] indices into the rows' slots
        from `start`."""
        s, selected = self.settings, []
        for key, (rows, _, positions) in views.items():
            segments, share, fill = s.coverage(ending=key[5])
            score, quota = scores[key] if fill == "distinct" else (scores[key], None)  # see _prune
            selected.append((rows, key[0], select_tokens(score, positions, key[2], key[3], s.window, key[4],
                                                         segments, share, quota)))
        return selected

    def _compact(self, selected, drop_garbage=False):
        """The selected rows keep their chosen tokens (and, while a right-padded prompt is
        read, the padding after them unless `drop_garbage`); the other rows keep their
        tokens (and that padding, likewise). Rows are re-aligned
        to end at the same slot, in one gather per buffer, with divide_length free slots
        after them (copies of slot 0, never read) to decode into until the next round."""
        B, n_kv = first(self.keys).shape[:2]
        room = self.settings.divide_length
        if len(selected) == 1 and len(selected[0][0]) == B and not self._garbage.any():
            _, start, keep = selected[0]  # every row pruned at once: the usual case
            L, index, lengths = keep.shape[-1], keep + start, np.full(B, keep.shape[-1])
            pad, kept_garbage = None, self._garbage
        else:
            kept_garbage = np.zeros_like(self._garbage) if drop_garbage else self._garbage
            spans = {b: mx.arange(int(self._first[b]), self._idx - int(self._garbage[b] - kept_garbage[b]),
                                  dtype=mx.int32) for b in range(B)}
            for rows, start, keep in selected:
                for i, b in enumerate(rows):
                    tail = mx.arange(self._idx - int(kept_garbage[b]), self._idx, dtype=mx.int32)
                    spans[b] = mx.concatenate([keep[i] + start, mx.broadcast_to(tail, (n_kv, tail.size))], axis=-1)
            lengths = np.array([spans[b].shape[-1] for b in range(B)])
            L = int(lengths.max())
            index = mx.stack([mx.concatenate([mx.zeros((n_kv, L - n), mx.int32),
                                              mx.broadcast_to(spans[b], (n_kv, n))], axis=-1)
                              for b, n in enumerate(lengths)])
            pad = mx.array(np.arange(L)[None] < (L - lengths)[:, None])[:, None]  # [B, 1, L]
        gathered = mx.concatenate([index, mx.zeros((B, n_kv, room), index.dtype)], axis=-1)
        self.keys, self.values = tree_map(lambda x: gather_tokens(x, gathered), self._held())
        held_positions, self._round_positions = self._round_positions, None
        positions = gather_tokens(self.token_positions() if held_positions is None else held_positions, gathered)
        if pad is not None:
            positions[..., :L] = mx.where(pad, -1, positions[..., :L])
        self.positions = positions
        pruned = [b for rows, _, _ in selected for b in rows]
        trimmable = self._idx - self._garbage - self._trim_from
        trimmable[pruned] = np.minimum(trimmable[pruned], self.settings.window)
        self._shift = self._shift + self._idx - L  # each row's next position stays where it was
        self._rounds[pruned] += 1
        self._first = L - lengths
        self._trim_from = L - kept_garbage - trimmable
        self._idx = self._stored = L
        self._update_schedule()
        if self._eval_on_compact:
            # A lazy prune step would hold every layer's old and new buffers at once (twice the KV).
            mx.eval(self.keys, self.values, self.positions)

    # -- save / load (mlx_lm.save_prompt_cache / load_prompt_cache) -------------------------
    @property
    def state(self):
        self._settle()
        held = None if self.keys is None else (*self._held(), self.token_positions())
        group = None if self.group is None else f"{self.group.id}:{len(self.group.members)}"
        return {"tokens": held, "settings": self.settings.to_list(),
                "rows": [self.offset, self.trimmable_tokens, self.prune_rounds,
                         0 if self._prompt_end is None else int(self._prompt_end[0]),
                         0 if self._reading is None else int(self._reading[0])],
                "group": group, "scorer": saved_scorer(self.scorer),
                "window": self._window, "window_count": None if self._window is None else self._window_count.tolist()}

    @state.setter
    def state(self, v):
        offset, trimmable, rounds, prompt_end, reading = (int(x) for x in v["rows"])
        settings = Settings.from_list(v["settings"])
        group = None
        if v["group"] is not None:
            # load_prompt_cache rebuilds the layers one by one: they rejoin one group
            group_id, size = v["group"].split(":")
            group = forming_group(("load", group_id), int(size))
        TriAttentionKVCache.__init__(self, settings=settings, scorer=restore_scorer(v["scorer"], settings), group=group)
        if v["tokens"] is not None:
            # load_prompt_cache gives nested lists where tuples were saved
            self.keys, self.values, self.positions = (tuple(x) if isinstance(x, list) else x for x in v["tokens"])
            n = first(self.keys).shape[2]
            self._init_rows(first(self.keys).shape[0], start=offset - n)
            self._idx = self._stored = n
            self._trim_from[:] = n - trimmable
            self._rounds[:] = rounds
            self._prompt_end[:], self._reading[:] = prompt_end, bool(reading)
            if v.get("window") is not None:  # a prompt's observation window (load_prompt_cache(model=) reattaches
                self._window = v["window"]  # the rope tap that extends it)
                self._window_count[:] = [int(x) for x in v["window_count"]]
            self._update_schedule()


class QuantizedTriAttentionKVCache(TriAttentionKVCache):
    """TriAttention eviction with keys/values stored quantized (mlx-lm's mx.quantize layout,
    as in its QuantizedKVCache). `bits` makes mlx-lm models attend through its quantized
    attention. TriAttention scoring takes the quantized keys (on a GPU the fused kernel
    dequantizes them in registers; on CPU MLX ops dequantize first); other scorers get
    dequantized keys. Selection compacts the packed storage in place."""

    _plain = False

    def __init__(self, *, settings, scorer, group=None, observer=None, measure_prune_time=False):
        super().__init__(settings=settings, scorer=scorer, group=group, observer=observer,
                         measure_prune_time=measure_prune_time)
        self.bits, self.group_size = settings.kv_bits, settings.kv_group_size

    def _storage_form(self, keys, values):
        if keys.shape[-1] % self.group_size or values.shape[-1] % self.group_size:
            raise ValueError(f"head_dim {keys.shape[-1]} is not a multiple of the kv group size {self.group_size}")
        return (tuple(mx.quantize(keys, group_size=self.group_size, bits=self.bits)),
                tuple(mx.quantize(values, group_size=self.group_size, bits=self.bits)))

    def _scoring_keys(self, start, end):
        keys = QuantizedKeys(*(x[..., start:end, :] for x in self.keys), self.bits, self.group_size)
        return keys if getattr(self.scorer, "reads_quantized", False) else keys.dequantize()

    def dense_bytes_per_token(self):
        B, n_kv = self.keys[0].shape[:2]
        dims = [x[0].shape[3] * 32 // self.bits for x in (self.keys, self.values)]
        return B * n_kv * sum(dims) * self.keys[1].dtype.size

    @TriAttentionKVCache.state.setter
    def state(self, v):
        TriAttentionKVCache.state.fset(self, v)
        self.bits, self.group_size = self.settings.kv_bits, self.settings.kv_group_size
