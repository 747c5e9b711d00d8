"""Each method's scorer for a model's layers, and a saved cache's scorer back."""

from .baselines import (
    H2OScorer,
    QueryAwareScorer,
    RKVScorer,
    SnapKVScorer,
    key_norm_scores,
    random_scores,
    recency_scores,
)
from .scoring import SelfCalibratedScorer, TriAttentionScorer
from .taps import install_query_recorders, install_recent_queries

STATELESS = {"streamingllm": recency_scores, "key_norm": key_norm_scores, "random": random_scores}
# These score with the newest queries, which their cache keeps (its observation window):
# they save and batch like TriAttention.
OBSERVING = {"snapkv": SnapKVScorer, "rkv": RKVScorer}
# These read the model's live queries (RecentQueries taps on its ropes): their caches can
# be neither saved (the queries are not in the file) nor batched (a tap sees the whole batch).
ATTENTION = {"h2o": lambda tap, info: H2OScorer(tap, info.n_heads)}


class Unsaveable:
    """Stands in a cache's state where it cannot be saved: mlx-lm's save_prompt_cache
    reports it as 'Model state is not serializable: <the reason>'."""

    def __init__(self, reason):
        self.reason = reason

    def __repr__(self):
        return self.reason


def layer_scorers(model, settings, stats, infos, shard):
    """{layer index: scorer} for the layers in `infos` ({index: AttentionInfo}, read before
    any tap is installed). stats: a Stats object or "self" (triattention only), for the
    whole model: `shard` says which of its layers and heads this process holds. With
    settings.observe, TriAttention's scorers also hear the prompt's last queries."""
    scorers = method_scorers(model, settings.method, stats, infos, shard)
    if not prompt_votes(settings):
        return scorers
    return {i: query_aware(scorer, settings) for i, scorer in scorers.items()}


def query_aware(scorer, settings):
    """The scorer with the prompt's last queries voting beside it, as `settings` say."""
    return QueryAwareScorer(scorer, settings.observe_weight, settings.observe_pool, settings.observe_rounds,
                            settings.observe_redundancy)


def prompt_votes(settings):
    """Whether the prompt's last queries vote beside the method's score (TriAttention only:
    SnapKV and R-KV are observation methods themselves)."""
    return settings.method == "triattention" and settings.observe > 0


def method_scorers(model, method, stats, infos, shard):
    if method in STATELESS:
        return {i: STATELESS[method] for i in infos}
    if method in OBSERVING:
        return {i: OBSERVING[method]() for i in infos}
    if method in ATTENTION:
        taps = install_recent_queries(model)
        return {i: ATTENTION[method](taps[i], info) for i, info in infos.items()}
    if isinstance(stats, str) and stats == "self":
        recorders = install_query_recorders(model)
        return {i: SelfCalibratedScorer(recorders[i], info.rope, info.n_kv_heads) for i, info in infos.items()}
    def rows(i, info):  # this process's layer i and heads, in the whole model's stats
        return shard.layer_offset + i, shard.head_rows(info.n_heads)

    return {i: TriAttentionScorer(stats.q_mean[rows(i, info)], stats.q_abs_mean[rows(i, info)], info.rope,
                                  info.n_kv_heads) for i, info in infos.items()}


def method_name(scorer):
    if isinstance(scorer, QueryAwareScorer):
        scorer = scorer.scorer
    if isinstance(scorer, TriAttentionScorer):
        return "triattention"
    for name, fn in STATELESS.items():
        if scorer is fn:
            return name
    for name, cls in (("h2o", H2OScorer), ("rkv", RKVScorer), ("snapkv", SnapKVScorer)):  # RKV before its base
        if isinstance(scorer, cls):
            return name
    return None


def saved_scorer(scorer):
    """What a cache's state holds of its scorer."""
    name = method_name(scorer)
    if name == "triattention":
        return {"method": name, **getattr(scorer, "scorer", scorer).state}
    if name in STATELESS:
        return {"method": name}
    if name in OBSERVING and type(scorer) is OBSERVING[name]:
        return {"method": name, **scorer.state}
    what = f"the {name} method reads the model's live queries" if name else f"its scorer {scorer!r} is custom"
    return Unsaveable(f"this compressed cache cannot be saved: {what} (method triattention caches can)")


def restore_scorer(saved, settings):
    state = dict(saved)
    method = state.pop("method")
    if method == "triattention":
        scorer = TriAttentionScorer.from_state(state)
        return query_aware(scorer, settings) if prompt_votes(settings) else scorer
    if method in STATELESS:
        return STATELESS[method]
    if method in OBSERVING:
        return OBSERVING[method].from_state(state)
    raise ValueError(f"a saved cache names an unknown method {method!r}")


def check_batchable(scorer):
    """Refuse, clearly, a scorer whose caches cannot share a batch."""
    if isinstance(getattr(scorer, "scorer", scorer), SelfCalibratedScorer):
        raise ValueError("caches with self-calibrated stats ('self') cannot be batched: each sequence "
                         "would need its own query centers; calibrate once (python -m "
                         "triattn_mlx.calibrate) and pass the stats file")
    name = method_name(scorer)
    if name in ATTENTION:
        raise ValueError(f"{name} caches cannot be batched: their scorer reads the model's live queries, "
                         "which a batch mixes; serve them one at a time")


def batchable(method, stats):
    return method not in ATTENTION and not (isinstance(stats, str) and stats == "self")
