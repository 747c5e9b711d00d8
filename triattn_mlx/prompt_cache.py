"""A model's compressed prompt cache: make it, make every mlx-lm path use it, save and load
it, and measure it."""

import contextlib
import functools

import mlx_lm.models.cache as mlx_cache
from mlx_lm.models.cache import KVCache

from .batch import BatchTriAttentionKVCache
from .cache import QuantizedTriAttentionKVCache, TriAttentionKVCache
from .groups import SharedSelection
from .methods import layer_scorers
from .model_info import attention_info, attention_module, model_layers, model_shard
from .settings import settings_of
from .stats import Stats, load_stats, validate_stats
from .taps import QuerySwitch, install_latest_queries


def model_caches(model):
    """The caches the model itself makes (its class's make_cache, else KVCache per layer),
    never the compressed ones `compress` attached."""
    make = getattr(type(model), "make_cache", None)
    return make(model) if make is not None else [KVCache() for _ in model_layers(model)]


def make_prompt_cache(model, settings=None, *, stats=None, scorer_factory=None, measure_prune_time=False,
                      **fields):
    """One cache per layer: compressed caches for full-attention layers, the model's own
    caches (sliding-window, recurrent) elsewhere.

    settings: a triattn_mlx.Settings; keyword fields (budget=, window=, method=, ...) make
    or override one. stats (method "triattention"): a Stats object, a stats file (checked
    against the model), "auto" (shipped stats matching the model) or "self" (query centers
    estimated from the model's own queries as it runs; this taps the model's ropes until
    triattn_mlx.remove_taps(model)). The attention baselines (h2o, snapkv, rkv) tap the
    ropes too. scorer_factory(layer, attention_info) -> scorer replaces the method's
    scoring (ablations). measure_prune_time: time each prune round (prune_seconds; two
    synchronizations per layer and round).
    """
    settings = settings_of(settings, **fields)
    layers = model_layers(model)
    base = model_caches(model)
    infos = {i: attention_info(attention_module(layer)) for i, layer in enumerate(layers)
             if attention_module(layer) is not None}  # read before any rope is tapped
    # Only plain KV caches are replaced: sliding-window and recurrent caches are bounded already.
    infos = {i: info for i, info in infos.items() if type(base[i]) is KVCache}
    if not infos:
        raise ValueError(f"{type(model).__name__} has no full-attention layer with a plain KV cache: "
                         "there is nothing to compress in this model")
    if scorer_factory is not None:
        scorers = {i: scorer_factory(i, info) for i, info in infos.items()}
    else:
        scorers = layer_scorers(model, settings, resolve(stats, model, settings.method), infos, model_shard(model))
    taps, switch = observers(model, scorers.values())
    group = SharedSelection() if settings.selection == "per_head" else None
    kind = TriAttentionKVCache if settings.kv_bits is None else QuantizedTriAttentionKVCache
    caches = list(base)
    for i, scorer in scorers.items():
        caches[i] = kind(settings=settings, scorer=scorer, group=group, observer=taps.get(i),
                         measure_prune_time=measure_prune_time)
        caches[i].switch = switch
    return caches


def observers(model, scorers):
    """The rope taps that hand each call's queries to caches whose scorers observe them
    ({layer: LatestQueries}), and the QuerySwitch that takes the taps out of the decode path
    (None where a scorer observes every round, or none observes)."""
    watching = {getattr(s, "observes", None) for s in scorers} - {None}
    if not watching:
        return {}, None
    taps = install_latest_queries(model)
    return taps, None if "always" in watching else QuerySwitch(taps.values())


def resolve(stats, model, method):
    """The stats a method needs, checked against the model (None for the baselines)."""
    if method != "triattention":
        return None
    if stats is None:
        raise ValueError("TriAttention needs calibration stats for this model: pass stats=<file or Stats>, "
                         "stats='auto' for shipped stats, or stats='self' to estimate them from the prompt "
                         "(reusable stats: python -m triattn_mlx.calibrate)")
    if isinstance(stats, str) and stats == "self":
        return stats
    if isinstance(stats, str) and stats == "auto":
        from .loading import shipped_stats

        found = shipped_stats(model)
        if found is None:
            raise ValueError("no shipped calibration stats match this model: pass stats=<file>, or "
                             "stats='self' (make reusable stats with python -m triattn_mlx.calibrate)")
        return found
    if not isinstance(stats, Stats):
        stats = load_stats(stats)
    validate_stats(stats, model)
    return stats


class CacheFactory:
    """What `compress` attaches as model.make_cache: mlx-lm makes every prompt cache of a
    model through it (generate, stream_generate, batch_generate, the server), so each is
    compressed. Remembers the last caches it made, for reports."""

    def __init__(self, make):
        self.make, self.last = make, None

    def __call__(self):
        self.last = self.make()
        return self.last


def compress(model, settings=None, *, stats="auto", measure_prune_time=False, **fields):
    """Make every prompt cache mlx-lm makes for `model` a compressed one (until
    `uncompress(model)`). Stats are resolved once, here; returns the settings used."""
    settings = settings_of(settings, **fields)
    stats = resolve(stats, model, settings.method)
    make = functools.partial(make_prompt_cache, model, settings, stats=stats, measure_prune_time=measure_prune_time)
    make()  # bad settings or stats fail here, not in the middle of a request
    model.make_cache = CacheFactory(make)
    return settings


def uncompress(model):
    if isinstance(getattr(model, "make_cache", None), CacheFactory):
        del model.make_cache


@contextlib.contextmanager
def cache_classes_registered():
    """mlx-lm's load_prompt_cache finds cache classes by name in its own module."""
    names = [cls.__name__ for cls in (TriAttentionKVCache, QuantizedTriAttentionKVCache)]
    before = {n: getattr(mlx_cache, n, None) for n in names}
    mlx_cache.TriAttentionKVCache = TriAttentionKVCache
    mlx_cache.QuantizedTriAttentionKVCache = QuantizedTriAttentionKVCache
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                delattr(mlx_cache, name)
            else:
                setattr(mlx_cache, name, value)


def load_prompt_cache(file_name, return_metadata=False, model=None):
    """mlx_lm's load_prompt_cache for files holding compressed caches too. With `model`,
    caches whose settings observe the prompt's last queries get their layer's rope tap
    back (without it they keep the window they were saved with, but cannot extend it)."""
    with cache_classes_registered():
        result = mlx_cache.load_prompt_cache(file_name, return_metadata=return_metadata)
    if model is not None:
        attach(result[0] if return_metadata else result, model)
    return result


def attach(caches, model):
    """Give loaded caches that observe queries their layer's rope tap on `model`."""
    watching = {i: c for i, c in enumerate(caches) if isinstance(c, TriAttentionKVCache) and c.observes}
    if watching:
        taps, switch = observers(model, [c.scorer for c in watching.values()])
        for i, cache in watching.items():
            cache.observer, cache.switch = taps.get(i), switch


def cache_report(caches):
    """Measured state of a prompt cache: tokens kept vs seen, bytes held vs what a full
    cache of the same tokens would hold, prune rounds and their time."""
    ours = [c for c in caches if isinstance(c, TriAttentionKVCache) and not isinstance(c, BatchTriAttentionKVCache)]
    held = sum(c.nbytes for c in caches if not c.empty())
    full = held - sum(c.nbytes for c in ours if not c.empty())
    for c in ours:
        if not c.empty():  # what mlx-lm's KVCache allocates for every token seen (256-token steps)
            allocated = -(-c.offset // KVCache.step) * KVCache.step
            full += allocated * c.dense_bytes_per_token()
    return {
        "tokens_seen": max((c.offset for c in caches if not isinstance(c, BatchTriAttentionKVCache)), default=0),
        "tokens_kept": max((c.size() for c in ours), default=None),
        "budget": ours[0].settings.budget if ours else None,
        "divide_length": ours[0].settings.divide_length if ours else None,
        "method": ours[0].settings.method if ours else None,
        "kv_bytes": held,
        "full_kv_bytes": full,
        "prune_rounds": max((c.prune_rounds for c in ours), default=0),
        "prune_seconds": sum(c.prune_seconds for c in ours),
        "prune_phases": {k: sum(c.prune_phases[k] for c in ours) for k in ("score", "select_compact")},
    }
