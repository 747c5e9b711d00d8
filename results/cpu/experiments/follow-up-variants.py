"""The 0.5B 4k follow-up run with two TriAttention variants registered as bench.tasks methods
(results/cpu/tasks-niah-qwen2.5-coder-0.5b-4k-follow-up.json, commit 564bb37):

    PYTHONPATH=. python results/cpu/experiments/follow-up-variants.py niah --model qwen2.5-coder-0.5b \
        --contexts 4096 --depths 0.1 0.3 0.5 0.7 0.9 --budgets 0.25 0.125 --max-tokens 24 --follow-up \
        --methods full triattention-auto tri-noobs triattention-coverage tri-noobs-cov snapkv rkv h2o streamingllm
"""
import sys

import bench.tasks as b

V = {
    "tri-noobs": ("TriAttention (per_head, no observation)", dict(pruning_mode="per_head", observe=0)),
    "tri-noobs-cov": ("TriAttention (per_head, no observation, 8 segments)",
                      dict(pruning_mode="per_head", observe=0, segments=8, segment_share=0.5)),
}
for k, (label, opts) in V.items():
    b.METHODS[k] = label
    b.TRIATTENTION[k] = opts
b.main(sys.argv[1:])
