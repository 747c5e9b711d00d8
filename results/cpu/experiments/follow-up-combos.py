"""Offline half of follow-up-ranks.py: reads the parts it saved (/tmp/parts-*.npz) and
selects with other combinations of them, printing the share of each needle's answer
tokens every KV head keeps (second: the follow-up's needle; first: the first question's).

    python results/cpu/experiments/follow-up-combos.py /tmp/parts-qwen2.5-coder-0.5b-4096_*.npz
"""
import json
import sys

import triattn_mlx  # noqa: F401  (before mlx: the BLAS preload)
import mlx.core as mx
from triattn_mlx.baselines import pool1d
from triattn_mlx.selection import zscore, head_scores, select_tokens


def load(path):
    arrays, meta = mx.load(path), json.load(open(path.replace(".npz", ".json")))
    layers = [{k: arrays[f"{k}{i}"] for k in ("raw", "obs", "sim", "knorm", "positions", "offset")}
              for i in range(meta["layers"])]
    return layers, meta


def rep(s, h):
    return mx.repeat(s, h // s.shape[1], axis=1)


def parts_z(layer):
    H = layer["raw"].shape[1]
    return dict(m=zscore(layer["raw"].astype(mx.float32)), o=zscore(layer["obs"]),
                s=rep(zscore(layer["sim"]), H), n=rep(zscore(layer["knorm"]), H))


COMBOS = {
    "m+2o": lambda z: z["m"] + 2 * z["o"],
    "m+2o-s (chat)": lambda z: z["m"] + 2 * z["o"] - z["s"],
    "m+2o-2s": lambda z: z["m"] + 2 * z["o"] - 2 * z["s"],
    "m+2o-3s": lambda z: z["m"] + 2 * z["o"] - 3 * z["s"],
    "2o-s": lambda z: 2 * z["o"] - z["s"],
    "0.5m+2o-s": lambda z: 0.5 * z["m"] + 2 * z["o"] - z["s"],
    "max(m,2o,-s)": lambda z: mx.maximum(mx.maximum(z["m"], 2 * z["o"]), -z["s"]),
    "max(m+2o,-s)": lambda z: mx.maximum(z["m"] + 2 * z["o"], -z["s"]),
    "max(m+2o,-2s)": lambda z: mx.maximum(z["m"] + 2 * z["o"], -2 * z["s"]),
    "max(m+2o-s,-2s)": lambda z: mx.maximum(z["m"] + 2 * z["o"] - z["s"], -2 * z["s"]),
    "max(2o,-s)": lambda z: mx.maximum(2 * z["o"], -z["s"]),
}


def select(layers, meta, combo, pool=11, reduce="mean", segments=0, share=0.0):
    positions, offset = layers[0]["positions"], layers[0]["offset"].item()
    n_kv = positions.shape[1]
    candidates = ~((positions >= offset - meta["window"]) | (positions < meta["sinks"]))
    scores = [head_scores(pool1d(COMBOS[combo](parts_z(l)), pool, "max"), n_kv, candidates) for l in layers]
    total = sum(scores) / len(scores) if reduce == "mean" else mx.stack(scores).max(axis=0)
    keep = select_tokens(total, positions, offset, meta["budget"], meta["window"], meta["sinks"], segments, share)
    kept = [set(positions[0, h][keep[0, h]].tolist()) for h in range(n_kv)]
    share = lambda span: [round(sum(t in k for t in span) / len(span), 2) for k in kept]
    return share(meta["second"]), share(meta["first"])


if __name__ == "__main__":
    data = [(p, *load(p)) for p in sys.argv[1:]]
    runs = [(c, "mean", 0, 0.0) for c in COMBOS] + [(c, "mean", s, f) for c in ("m+2o", "m+2o-s (chat)", "m+2o-2s")
                                                   for s in (8, 16, 32) for f in (0.5, 0.75, 1.0)]
    for combo, reduce, segments, share in runs:
        line = []
        for path, layers, meta in data:
            second, first = select(layers, meta, combo, reduce=reduce, segments=segments, share=share)
            line.append(f"{second[0]:.1f},{second[1]:.1f}/{min(first):.1f}")
        print(f"{combo:18s} {segments:2d} {share:.2f} " + "  ".join(line))


def select_split(layers, meta, main, quota, segments, share, pool=11):
    """Coverage whose quotas are filled by another combination (`quota`) than the rest (`main`)."""
    from triattn_mlx.selection import segment_quotas, protected_tokens, QUOTA_RANK
    positions, offset = layers[0]["positions"], layers[0]["offset"].item()
    n_kv = positions.shape[1]
    protected = protected_tokens(positions, offset, meta["window"], meta["sinks"])
    candidates = ~protected
    avg = lambda combo: sum(head_scores(pool1d(COMBOS[combo](parts_z(l)), pool, "max"), n_kv, candidates)
                            for l in layers) / len(layers)
    a, q = avg(main), avg(quota)
    budget, window, sinks = meta["budget"], meta["window"], meta["sinks"]
    k = int(share * (budget - window - sinks) / max(segments, 1))
    chosen = segment_quotas(q, positions, candidates, offset - window - sinks, sinks, segments, k) if segments else \
        (mx.argsort(mx.argsort(-mx.where(candidates, q, -mx.inf), axis=-1), axis=-1) < int(share * (budget - window - sinks)))
    ranked = mx.where(protected, mx.inf, mx.where(chosen, QUOTA_RANK, a))
    keep = mx.sort(mx.argpartition(-ranked, kth=budget - 1, axis=-1)[..., :budget], axis=-1)
    kept = [set(positions[0, h][keep[0, h]].tolist()) for h in range(n_kv)]
    share_of = lambda span: [round(sum(t in k for t in span) / len(span), 2) for k in kept]
    return share_of(meta["second"]), share_of(meta["first"])


COMBOS["-s"] = lambda z: -z["s"]
COMBOS["m-s"] = lambda z: z["m"] - z["s"]
COMBOS["-s+n"] = lambda z: -z["s"] + z["n"]


def split_main(paths):
    data = [(p, *load(p)) for p in paths]
    for quota in ("-s", "m-s", "-s+n", "m+2o-s (chat)"):
        for segments in (0, 8, 16):
            for share in (0.25, 0.5):
                line = []
                for path, layers, meta in data:
                    second, first = select_split(layers, meta, "m+2o-s (chat)", quota, segments, share)
                    line.append(f"{second[0]:.1f},{second[1]:.1f}/{min(first):.1f}")
                print(f"split {quota:14s} {segments:2d} {share:.2f} " + "  ".join(line))
