"""Experiment: coverage whose quotas are filled by distinctness, not by the round's score.

In the round that ends a prompt, each of `segments` stretches of the document keeps its
most distinct tokens (lowest mean cosine similarity to the other keys: -z(mean_similarity),
per KV head, averaged over the layers as per_head selection averages scores) up to its
quota; the rest of the budget goes by the usual score (the method's plus the question's
observation). follow-up-ranks.py's offline proxy: with 8 segments and half the free budget,
this kept the follow-up needle of 5 of 8 items at 12.5% in at least one KV head, against 3
for the server's default with coverage. This script patches the package and runs
bench.tasks with the settings given as JSON (the triattention-redundancy key, relabelled).
It ran the 0.5B and 1.5B 4k items at e82c23f; the package has since taken it in as
segment_fill "distinct" (bench.tasks key triattention-distinct), which computes the same
quotas in the cache itself:

    PYTHONPATH=. python results/cpu/experiments/distinct-quotas.py '{"segments": 8, "segment_rounds": "prompt"}' \
        niah --model qwen2.5-coder-0.5b --contexts 4096 --depths 0.1 0.3 0.5 0.7 0.9 --budgets 0.125 \
        --max-tokens 24 --follow-up --methods triattention-redundancy --output results/cpu/experiments \
        --name distinct-quotas-0.5b-4k-follow-up
"""
import json
import sys

import bench.tasks as b
import mlx.core as mx
from triattn_mlx import baselines, cache, selection

STASH = []  # per layer, this round's distinctness head scores
SETTINGS = json.loads(sys.argv.pop(1))
original_call, original_select = baselines.QueryAwareScorer.__call__, selection.select_tokens


def call(self, keys, positions, offset, queries=None):
    if queries is not None:
        k = keys.dequantize() if hasattr(keys, "dequantize") else keys
        window = STASH_WINDOW[0]
        candidates = ~selection.protected_tokens(positions, offset, window, 0)
        STASH.append(selection.head_scores(-baselines.mean_similarity(k), k.shape[1], candidates))
    return original_call(self, keys, positions, offset, queries)


def select(scores, positions, offset, budget, window, sinks, segments=0, segment_share=0.0, quota_scores=None):
    if not STASH or not segments:
        STASH.clear()
        return original_select(scores, positions, offset, budget, window, sinks, segments, segment_share)
    distinct = sum(STASH) / len(STASH)
    STASH.clear()
    protected = selection.protected_tokens(positions, offset, window, sinks)
    quota = int(segment_share * (budget - window - sinks) / segments)
    candidates = ~protected & (positions >= 0)
    chosen = selection.segment_quotas(distinct, positions, candidates, offset - window - sinks, sinks, segments, quota)
    ranked = mx.where(protected, mx.inf, mx.where(chosen, selection.QUOTA_RANK, scores))
    keep = mx.argpartition(-ranked, kth=budget - 1, axis=-1)[..., :budget]
    return mx.sort(keep, axis=-1)


STASH_WINDOW = [128]
original_caches = b.method_caches


def method_caches(model, method, budget, stats):
    caches = original_caches(model, method, budget, stats)
    if hasattr(caches[0], "settings"):
        STASH_WINDOW[0] = caches[0].settings.window
    return caches


baselines.QueryAwareScorer.__call__ = call
cache.select_tokens = select
b.method_caches = method_caches
b.TRIATTENTION["triattention-redundancy"] = dict(pruning_mode="auto", **SETTINGS)
b.METHODS["triattention-redundancy"] = ("TriAttention (auto, quotas by distinctness, "
                                        + ", ".join(f"{k} {v}" for k, v in SETTINGS.items()) + ")")
b.main(sys.argv[1:])
