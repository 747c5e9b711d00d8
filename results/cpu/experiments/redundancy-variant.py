"""Experiment: the prompt round's score minus R-KV's redundancy (z-scored, weight W), so that
keys like many others give way to distinct ones (a second needle, say). Not in the package.

    PYTHONPATH=. python results/cpu/experiments/redundancy-variant.py 1 niah --model qwen2.5-coder-0.5b \
        --contexts 4096 --depths 0.1 0.3 0.5 0.7 0.9 --budgets 0.25 0.125 --max-tokens 24 --follow-up \
        --methods full triattention-auto --output results/cpu/experiments --name red1-4k-follow-up
"""
import sys

import triattn_mlx  # first: OpenBLAS preload on Linux, before mlx
import mlx.core as mx

import bench.tasks as b
from triattn_mlx import baselines
from triattn_mlx.selection import zscore

W = float(sys.argv.pop(1))


def call(self, keys, positions, offset, queries=None):
    raw = self.scorer(keys, positions, offset)
    if queries is None:
        return raw
    if hasattr(keys, "dequantize"):
        keys = keys.dequantize()
    red = mx.repeat(baselines.redundancy(keys, 0.5), raw.shape[1] // keys.shape[1], axis=1)
    total = zscore(raw) + self.weight * zscore(baselines.observation_scores(queries, keys, positions, offset))
    return baselines.pool1d(total - W * zscore(red), self.pool, "max")


baselines.QueryAwareScorer.__call__ = call
b.METHODS["triattention-auto"] = f"TriAttention (default) minus {W:g} x z(redundancy) in the prompt's round"
b.main(sys.argv[1:])
