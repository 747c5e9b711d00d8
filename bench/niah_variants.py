"""Variants of the prompt-end selection on bench.tasks' NIAH items, for choosing defaults.

    python -m bench.niah_variants [--context 4096] [--variants default w2 max obs64 snapkv]
                                  [--depths 0.1 0.5 0.9] [--shares 0.25 0.125]

Qwen2.5-Coder-0.5B-Instruct (float32), depths 10 / 50 / 90%, budgets 25% and 12.5% (by
default). One
full-attention prefill per item (all but the last bench.tasks.TAIL tokens) is saved under
~/.cache/triattn-mlx/niah-prefill and reused, so each variant costs only the question
and the answer. Variants: default settings; observe_weight 2 (w2) or 1 (w1);
max(z(method), z(observation)) instead of their sum (max); observe 64 (obs64); observe_weight
4 or 8 (w4, w8); coverage, 8 segments' quotas (segments); the observation's 16 or 32 best tokens
of each query head kept first (quota16, quota32); a recent window of 64 or 32 (win64,
win32); the method's score max-pooled like the observation (pooled) or the sum pooled
(pooled-sum); SnapKV.
The log of the run that chose observe_weight 2: results/cpu/experiments/.
"""

import argparse
import json
from pathlib import Path

import mlx.core as mx

import triattn_mlx
from bench import tasks as bench
from support.models import model_dir
from triattn_mlx import baselines, make_prompt_cache, remove_taps
from triattn_mlx.loading import resolve_stats
from triattn_mlx.selection import zscore

SUM = baselines.QueryAwareScorer.__call__


def combine_max(self, keys, positions, offset, queries=None):
    raw = self.scorer(keys, positions, offset)
    if queries is None:
        return raw
    return mx.maximum(zscore(raw), self.weight * zscore(baselines.observation_scores(queries, keys, positions, offset)))


def combine_quota(quota):
    """The observation's `quota` best tokens of each query head are kept first (a boost no
    other score reaches), the rest ranked by the usual sum."""
    def combine(self, keys, positions, offset, queries=None):
        raw = self.scorer(keys, positions, offset)
        if queries is None:
            return raw
        observed = zscore(baselines.observation_scores(queries, keys, positions, offset))
        threshold = mx.topk(observed, quota, axis=-1).min(axis=-1, keepdims=True)
        return zscore(raw) + self.weight * observed + 1e3 * (observed >= threshold)
    return combine


def combine_pooled(whole, kernel=7):
    """The method's score max-pooled along the sequence as SnapKV pools the observation
    (kernel 7), so that a token's neighbours share its score; `whole`: the sum pooled."""
    def combine(self, keys, positions, offset, queries=None):
        raw = self.scorer(keys, positions, offset)
        if queries is None:
            return raw
        observed = zscore(baselines.observation_scores(queries, keys, positions, offset))
        if whole:
            return baselines.pool1d(zscore(raw) + self.weight * observed, kernel, "max")
        return zscore(baselines.pool1d(raw, kernel, "max")) + self.weight * observed
    return combine


VARIANTS = {
    "default": (dict(), SUM),
    "w1": (dict(observe_weight=1.0), SUM),
    "w2": (dict(observe_weight=2.0), SUM),
    "max": (dict(observe_weight=1.0), combine_max),
    "obs64": (dict(observe=64), SUM),
    "w4": (dict(observe_weight=4.0), SUM),
    "w8": (dict(observe_weight=8.0), SUM),
    "segments": (dict(segments=8), SUM),
    "win64": (dict(window=64), SUM),
    "win32": (dict(window=32), SUM),
    "quota16": (dict(), combine_quota(16)),
    "quota32": (dict(), combine_quota(32)),
    "pooled": (dict(), combine_pooled(False)),
    "pooled-sum": (dict(), combine_pooled(True)),
    "pooled-sum5": (dict(), combine_pooled(True, 5)),
    "pooled-sum11": (dict(), combine_pooled(True, 11)),
    "pooled-sum-w4": (dict(observe_weight=4.0), combine_pooled(True)),
    "snapkv": (dict(method="snapkv"), SUM),
}


def saved_prefill(model, item, folder):
    path = folder / f"{item['id'].replace('/', '_')}.safetensors"
    if path.exists():
        flat = mx.load(str(path))
    else:
        prefill, seconds = bench.shared_prefill(model, item["prompt"][: -bench.TAIL], 2048)
        flat = {**{f"k{i}": k for i, (k, _) in enumerate(prefill)}, **{f"v{i}": v for i, (_, v) in enumerate(prefill)}}
        folder.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(path), flat)
        print(f"prefill {item['id']}: {seconds:.0f} s", flush=True)
    return [(flat[f"k{i}"], flat[f"v{i}"]) for i in range(len(model.layers))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.125], help="budgets, shares of the context")
    args = parser.parse_args()
    model, tokenizer = triattn_mlx.load(str(model_dir("qwen2.5-coder-0.5b")))
    stats = resolve_stats("auto", model)
    items = bench.niah_items(tokenizer, dict(contexts=[args.context], depths=args.depths, needles=1))
    folder = Path.home() / ".cache" / "triattn-mlx" / "niah-prefill"
    for item in items:
        prefill, results = saved_prefill(model, item, folder), {}
        for budget in (int(args.context * share) for share in args.shares):
            for name in args.variants:
                options, combine = VARIANTS[name]
                baselines.QueryAwareScorer.__call__ = combine
                try:
                    caches = make_prompt_cache(model, budget=budget, stats=stats, **options)
                    bench.load_prefill(caches, prefill)
                    out = bench.generate(model, tokenizer, item["prompt"][-bench.TAIL :], caches, 24, 2048,
                                         stop=lambda text: bench.niah_found(item, text))
                finally:
                    baselines.QueryAwareScorer.__call__ = SUM
                    remove_taps(model)
                results[f"{name}@{budget}"] = ok = bench.score_niah(item, out["output"])["correct"]
                print(f"  {item['id']} {name}@{budget} {'ok' if ok else 'no'} {out['output'][:40]!r}", flush=True)
        print(item["id"], json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
