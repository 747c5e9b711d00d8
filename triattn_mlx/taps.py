"""Taps on an attention's rope: what the model's queries look like, as it runs.

mlx-lm attentions rope queries first, then keys, in every call (`self.rope(queries,
offset=cache.offset)`), so a stand-in for the rope sees every query. Taps are installed by
swapping the attention's `rope` entry and removed by putting the rope back.
"""

import weakref

import mlx.core as mx
import numpy as np

from .model_info import attention_info, attention_module, model_layers, own_rope


class RopeTap:
    """Stands in for an attention's rope: applies it, and shows each call's queries to
    `on_queries(pre_rope, rotated, offset)`: even calls are queries."""

    owner = None  # the attention whose rope entry it stands in (set by install)

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


class LatestQueries(RopeTap):
    """Hands the post-RoPE queries of each call to the layer's cache: the attention ropes
    its queries, then its keys, then updates the cache, so the cache's update_and_fetch
    `take`s the queries of its own call (the cache keeps what it needs: an observation
    window per row, settings.observe)."""

    def __init__(self, rope):
        super().__init__(rope)
        self.latest = None

    def on_queries(self, pre_rope, rotated, offset):
        self.latest = rotated

    def take(self, batch, length):
        """This call's queries [batch, H, length, D], or None when the latest are not theirs."""
        queries, self.latest = self.latest, None
        if queries is None or queries.shape[0] != batch or queries.shape[2] != length:
            return None
        return queries


class QuerySwitch:
    """Takes a cache set's LatestQueries taps out of the decode path, and puts them back.

    A TriAttention cache needs its layer's queries only while a prompt is read (the
    observation window), but batch-1 decode is launch-bound: two Python calls per layer and
    step in the path cost ~1% of a step on this CPU and more on the GPU machine's host. So the
    caches unplug their taps when a forward decodes one token, and plug every unplugged tap
    back when a forward reads a prompt (TriAttentionKVCache.make_mask, which mlx-lm models
    call before their first rope) and before anything installs or looks for taps. A model
    whose forward never calls the cache's make_mask keeps its taps plugged. Only a tap that
    is alone on its rope is unplugged (chains with other kinds of taps stay as they are)."""

    def __init__(self, taps):
        self.taps, self.epoch = list(taps), None

    def unplug(self):
        if self.epoch == _plugs[0]:
            return  # unplugged already (or nothing could be), and nothing plugged since
        for tap in self.taps:
            attn = tap.owner
            if attn is not None and attn.get("rope") is tap and not isinstance(tap.rope, RopeTap):
                attn["rope"] = tap.rope
                _unplugged.add(tap)
        self.epoch = _plugs[0]

    def __deepcopy__(self, memo):
        return self  # shared by the caches of a set and by their copies, as the taps are


_unplugged = weakref.WeakSet()  # taps a QuerySwitch took out of their attention's rope entry
_plugs = [0]  # plug_all calls that plugged something: a QuerySwitch unplugs again after one


def plug_all():
    """Put every unplugged tap back on its rope (a forward is about to read a prompt, or
    taps are being installed or looked for)."""
    if not _unplugged:
        return
    for tap in list(_unplugged):
        if tap.owner.get("rope") is tap.rope:
            tap.owner["rope"] = tap
    _unplugged.clear()
    _plugs[0] += 1


def install(model, kind, make, reuse=False):
    """Put a tap of `kind` on every attention's rope: make(attention, rope) -> tap, wrapping
    whatever taps of other kinds are there already (each sees every call). A tap of `kind`
    already there is replaced, or with `reuse` kept. {layer index: tap}."""
    plug_all()
    taps = {}
    for i, layer in enumerate(model_layers(model)):
        attn = attention_module(layer)
        if attn is None:
            continue
        found = next((t for t in _chain(attn) if isinstance(t, kind)), None)
        if found is not None and reuse:
            taps[i] = found
            continue
        if found is not None:
            _splice_out(attn, kind)
        attn["rope"] = taps[i] = make(attn, attn.rope)  # a Module is a dict: swap the entry
        taps[i].owner = attn
    return taps


def taps_of(model, kind):
    """{layer index: the tap of `kind` on its rope} (layers without one left out)."""
    plug_all()
    found = {}
    for i, layer in enumerate(model_layers(model)):
        attn = attention_module(layer)
        tap = None if attn is None else next((t for t in _chain(attn) if isinstance(t, kind)), None)
        if tap is not None:
            found[i] = tap
    return found


def _chain(attn):
    """The taps standing in for an attention's rope, outermost first."""
    tap, chain = attn.rope, []
    while isinstance(tap, RopeTap):
        chain.append(tap)
        tap = tap.rope
    return chain


def _splice_out(attn, kind):
    """Take the taps of `kind` out of the attention's chain, keeping the others."""
    kept = [t for t in _chain(attn) if not isinstance(t, kind)]
    inner = own_rope(attn)
    for tap in reversed(kept):
        tap.rope, inner = inner, tap
    attn["rope"] = inner


def install_query_recorders(model):
    """A fresh QueryRecorder on every attention's rope: {layer index: recorder}."""
    return install(model, QueryRecorder, lambda attn, rope: QueryRecorder(rope, attention_info(attn)))


def install_latest_queries(model):
    """A LatestQueries tap on every attention's rope (those already there stay): {layer: tap}."""
    return install(model, LatestQueries, lambda attn, rope: LatestQueries(rope), reuse=True)


def install_recent_queries(model):
    """A RecentQueries tap on every attention's rope: {layer index: tap}. Taps already there
    stay (caches made earlier, e.g. kept in a server's prompt cache, read through them)."""
    return install(model, RecentQueries, lambda attn, rope: RecentQueries(rope), reuse=True)


def remove_taps(model, kind=RopeTap):
    """Take the taps of `kind` (every tap by default) off the model's ropes."""
    plug_all()
    for layer in model_layers(model):
        attn = attention_module(layer)
        if attn is not None:
            _splice_out(attn, kind)


def remove_query_recorders(model):
    remove_taps(model, QueryRecorder)
