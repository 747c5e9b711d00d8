"""Follow-up needle probe: TriAttention variants registered as bench.tasks methods."""
import sys
import bench.tasks as b
V = {
    "tri-noobs": ("TriAttention (per_head, no observation)", dict(pruning_mode="per_head", observe=0)),
    "tri-noobs-cov": ("TriAttention (per_head, no observation, 8 segments)", dict(pruning_mode="per_head", observe=0, segments=8, segment_share=0.5)),
}
for k, (label, opts) in V.items():
    b.METHODS[k] = label
    b.TRIATTENTION[k] = opts
b.main(sys.argv[1:])
