"""Summary of follow-up-ranks.py's saved parts: for each item, the median rank (per KV head,
1 = kept first) of the follow-up needle's answer tokens among the candidates for eviction,
under each part of the prompt round's score and under the sums the cache uses, and the
slots the round fills by score (budget - window). Each part is z-scored per query head,
max-pooled over 11 tokens, z-scored over the candidates, maxed over the GQA group and
averaged over the layers, as the cache's per_head selection does.

    PYTHONPATH=. python results/cpu/experiments/follow-up-ranks-summary.py /tmp/parts-*.npz
"""
import sys

paths = sys.argv[1:]
sys.argv = ["x"]
exec(open("results/cpu/experiments/follow-up-combos.py").read().replace('if __name__ == "__main__":', "if False:"))

PARTS = {
    "method": lambda z: z["m"],
    "observation": lambda z: z["o"],
    "-mean similarity": lambda z: -z["s"],
    "-key norm": lambda z: -z["n"],
    "m+2o (default)": lambda z: z["m"] + 2 * z["o"],
    "m+2o-s (chat)": lambda z: z["m"] + 2 * z["o"] - z["s"],
}
print("item".ljust(34), "slots", *(p.rjust(17) for p in PARTS))
for path in paths:
    layers, meta = load(path)
    positions, offset = layers[0]["positions"], layers[0]["offset"].item()
    n_kv = positions.shape[1]
    cand = ~((positions >= offset - meta["window"]) | (positions < meta["sinks"]))
    cells = []
    for f in PARTS.values():
        total = sum(head_scores(pool1d(f(parts_z(l)), 11, "max"), n_kv, cand) for l in layers) / len(layers)
        total = mx.where(cand, total, -mx.inf)
        rank = mx.argsort(mx.argsort(-total, axis=-1), axis=-1) + 1
        med = [sorted(rank[0, h][mx.array(meta["second"])].tolist())[len(meta["second"]) // 2] for h in range(n_kv)]
        cells.append("/".join(str(r) for r in med))
    print(path.split("parts-")[1][:-4].ljust(34), str(meta["budget"] - meta["window"]).rjust(5),
          *(c.rjust(17) for c in cells), f"of {int(cand[0, 0].sum().item())}")
