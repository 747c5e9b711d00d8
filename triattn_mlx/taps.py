"""Taps on an attention's rope: what the model's queries look like, as it runs.

mlx-lm attentions rope queries first, then keys, in every call (`self.rope(queries,
offset=cache.offset)`), so a stand-in for the rope sees every query. Taps are installed by
swapping the attention's `rope` entry and removed by putting the rope back.
"""

import mlx.core as mx
import numpy as np

from .model_info import attention_info, attention_module, model_layers, own_rope


class RopeTap:
    """Stands in for an attention's rope: applies it, and shows each call's queries to
    `on_queries(pre_rope, rotated, offset)`: even calls are queries."""

    def __init__(self, rope):
        self.rope, self.calls = rope, 0

    def __call__(self, x, *args, **kwargs):
        out = self.rope(x, *args, **kwargs)
        if self.calls % 2 == 0:
            self.on_queries(x, out, kwargs.get("offset", args[0] if args else 0))  # int, or [B] for a batch
        self.calls += 1
        return out

    def on_queries(self, pre_rope, rotated, offset):
        raise NotImplementedError

    def __deepcopy__(self, memo):
        return self  # a tap belongs to the model: copies of a cache share it


class QueryRecorder(RopeTap):
    """Accumulates pre-RoPE query statistics: used by `calibrate` and, live, by
    self-calibrating caches."""

    def __init__(self, rope, info):
        super().__init__(rope)
        self.info = info
        self.pairs = mx.array(info.rope.pairs)
        half = info.head_dim // 2
        self.sum_re = mx.zeros((info.n_heads, half))
        self.sum_im = mx.zeros((info.n_heads, half))
        self.sum_abs = mx.zeros((info.n_heads, half))
        self.tokens = 0

    def on_queries(self, x, rotated, offset):
        if x.shape[1] != self.info.n_heads:
            raise ValueError(f"expected queries with {self.info.n_heads} heads, got {x.shape}")
        q = x.astype(mx.float32)
        re, im = q[..., self.pairs[:, 0]], q[..., self.pairs[:, 1]]  # [B, H, L, D/2]
        self.sum_re = self.sum_re + re.sum(axis=(0, 2))
        self.sum_im = self.sum_im + im.sum(axis=(0, 2))
        self.sum_abs = self.sum_abs + mx.sqrt(re * re + im * im).sum(axis=(0, 2))
        self.tokens += x.shape[0] * x.shape[2]

    def centers(self):
        """(q_mean [H, D/2] complex, q_abs_mean [H, D/2]) of the queries seen so far."""
        if self.tokens == 0:
            raise ValueError("no queries recorded yet")
        q_mean = (np.array(self.sum_re, dtype=np.float64) + 1j * np.array(self.sum_im, dtype=np.float64))
        return q_mean / self.tokens, np.array(self.sum_abs, dtype=np.float64) / self.tokens


class RecentQueries(RopeTap):
    """Keeps the rotated queries of the sequence being run: those since the last `drain`
    (H2O) and the newest `keep` (SnapKV's observation window). Chunks are tagged with their
    positions, so a drain takes only the run of chunks that ends at the cache's offset (a
    server running another sequence in between leaves no stale queries behind)."""

    keep = 256

    def __init__(self, rope):
        super().__init__(rope)
        self.pending, self.recent, self.recent_end = [], None, None

    def on_queries(self, pre_rope, rotated, offset):
        self.pending.append((offset if isinstance(offset, int) else None, rotated))

    def drain(self, offset):
        """Queries at positions [offset - M, offset) since the last drain ([B, H, M, D], the
        newest last; None if none)."""
        run, end = [], offset
        for start, q in reversed(self.pending):
            if start is None or start + q.shape[2] != end:
                break
            run.append(q)
            end = start
        self.pending = []
        new = mx.concatenate(run[::-1], axis=2) if run else None
        if new is not None:
            contiguous = self.recent is not None and self.recent_end == end
            both = mx.concatenate([self.recent, new], axis=2) if contiguous else new
            self.recent, self.recent_end = both[:, :, -self.keep :], offset
        elif self.recent_end != offset:
            self.recent, self.recent_end = None, None
        return new


class PromptQueries(RopeTap):
    """The newest `keep` post-RoPE queries of the prompt being read (calls of several tokens,
    and the single token that ends them), per row, with the position after them (`end`:
    an int, or [B] for a batch). Decoding adds nothing, so after a prompt ends this is its
    observation window until the next prompt."""

    def __init__(self, rope, keep):
        super().__init__(rope)
        self.keep, self.window, self.end, self.reading = keep, None, None, False

    def on_queries(self, pre_rope, rotated, offset):
        N = rotated.shape[2]
        if N == 1 and not self.reading:
            return
        self.reading = N > 1
        start = offset if isinstance(offset, int) else np.array(offset, np.int64)
        follows = self.window is not None and np.array_equal(self.end, start)
        both = mx.concatenate([self.window, rotated], axis=2) if follows else rotated
        # A copy, computed now: a lazy slice would keep the whole chunk's queries alive.
        self.window = mx.contiguous(both[:, :, -self.keep :])
        mx.async_eval(self.window)
        self.end = start + N

    def observed(self, offset, rows, n):
        """The last n queries before `offset` of the given batch rows ([len(rows), H, n, D]),
        or None when this tap's window does not end there (rows mid-padding, a decode round)."""
        if self.window is None or self.window.shape[2] < n:
            return None
        ends = np.broadcast_to(np.asarray(self.end), (self.window.shape[0],))
        rows = list(range(len(ends))) if rows is None else rows
        if not (ends[rows] == offset).all():
            return None
        window = self.window if len(rows) == len(ends) else self.window[mx.array(rows)]
        return window[:, :, -n:]


def install(model, make):
    """Wrap every attention's rope: make(attention, its own rope) -> tap. {layer index: tap}."""
    taps = {}
    for i, layer in enumerate(model_layers(model)):
        attn = attention_module(layer)
        if attn is not None:
            attn["rope"] = taps[i] = make(attn, own_rope(attn))  # a Module is a dict: swap the entry
    return taps


def install_query_recorders(model):
    """Wrap every attention's rope in a fresh QueryRecorder: {layer index: recorder}."""
    return install(model, lambda attn, rope: QueryRecorder(rope, attention_info(attn)))


def install_prompt_queries(model, keep):
    """A PromptQueries tap on every attention's rope: {layer index: tap}."""
    return install(model, lambda attn, rope: attn.rope if isinstance(attn.rope, PromptQueries)
                   and attn.rope.keep >= keep else PromptQueries(rope, keep))


def install_recent_queries(model):
    """A RecentQueries tap on every attention's rope: {layer index: tap}. Taps already there
    stay (caches made earlier, e.g. kept in a server's prompt cache, read through them)."""
    return install(model, lambda attn, rope: attn.rope if isinstance(attn.rope, RecentQueries) else RecentQueries(rope))


def remove_taps(model, kind=RopeTap):
    """Put back the ropes that taps of `kind` wrapped (every tap by default)."""
    for layer in model_layers(model):
        attn = attention_module(layer)
        if attn is not None and isinstance(attn.rope, kind):
            attn["rope"] = own_rope(attn)


def remove_query_recorders(model):
    remove_taps(model, QueryRecorder)
