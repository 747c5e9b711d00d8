"""Experiment (offline, follow-up-ranks.py's saved parts): coverage whose quotas are filled by
another score than the rest of the budget (select_split in follow-up-combos.py). Prints, per
item, the share of the follow-up needle's answer tokens each KV head keeps / of the first
question's (min over heads). The row "m+2o -s 8 0.50" (quotas by -mean similarity, 8
segments, half the free budget) led to segment_fill "distinct".

    PYTHONPATH=. python results/cpu/experiments/follow-up-split.py /tmp/parts-*.npz
"""
import sys, glob
paths = sys.argv[1:]
sys.argv=['x']
exec(open('results/cpu/experiments/follow-up-combos.py').read().replace('if __name__ == "__main__":','if False:'))
COMBOS["-n"] = lambda z: -z["n"]
COMBOS["-s-n"] = lambda z: -z["s"] - z["n"]
COMBOS["m+2o"] = lambda z: z["m"] + 2 * z["o"]
data = [(p, *load(p)) for p in paths]
for main in ("m+2o", "m+2o-s (chat)"):
  for quota in ("-n", "-s-n", "-s"):
    for segments in (0, 8):
        for share in (0.25, 0.5):
            line = []
            for path, layers, meta in data:
                second, first = select_split(layers, meta, main, quota, segments, share)
                line.append(f"{second[0]:.1f},{second[1]:.1f}/{min(first):.1f}")
            print(f"{main:14s} {quota:5s} {segments:2d} {share:.2f} " + "  ".join(line))
