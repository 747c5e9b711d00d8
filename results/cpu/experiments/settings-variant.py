"""Experiment: TriAttention (auto) with other settings, through bench.tasks' triattention-redundancy
key (its label says which). The first argument is the settings, as JSON.

    PYTHONPATH=. python results/cpu/experiments/settings-variant.py '{"observe_redundancy": 2}' niah \
        --model qwen2.5-coder-0.5b --contexts 4096 --depths 0.1 0.3 0.5 0.7 0.9 --budgets 0.125 --max-tokens 24 \
        --follow-up --methods triattention-redundancy --output results/cpu/experiments \
        --name redundancy-w2-0.5b-4k-follow-up
    ... '{"observe_redundancy": 1, "segments": 8, "segment_rounds": "prompt"}' ... --name redundancy-coverage-0.5b-4k-follow-up
"""
import json
import sys

import bench.tasks as b

SETTINGS = json.loads(sys.argv.pop(1))
b.TRIATTENTION["triattention-redundancy"] = dict(pruning_mode="auto", **SETTINGS)
b.METHODS["triattention-redundancy"] = "TriAttention (auto, " + ", ".join(f"{k} {v}" for k, v in SETTINGS.items()) + ")"
b.main(sys.argv[1:])
