"""Experiment: where a follow-up's needle ranks in the round that ends the first question.

For each follow-up item, the prompt is read by a TriAttention cache (observe_redundancy 1)
at a 12.5% budget and the prompt's round is run; the scorer's parts are recorded per layer
(the method's score, the question's observation, the keys' mean similarity). Offline, other
ways of combining them select `budget` tokens per KV head as the cache would (per_head:
head scores averaged over the layers), and the share of each needle's answer tokens kept
is printed, for the needle the first question asks about and for the one asked next.

    PYTHONPATH=. python results/cpu/experiments/follow-up-ranks.py qwen2.5-coder-0.5b 4096 0.1 0.3 0.5 0.7 0.9
"""
import json
import sys

import bench.tasks as b
import triattn_mlx
import mlx.core as mx
from triattn_mlx import baselines
from triattn_mlx.baselines import observation_scores, mean_similarity, pool1d
from triattn_mlx.selection import zscore, head_scores, select_tokens

model_name, context, depths = sys.argv[1], int(sys.argv[2]), [float(d) for d in sys.argv[3:]]
share = 0.125
model, tokenizer = triattn_mlx.load(str(b.resolve_model(model_name)))
stats = b.resolve_stats("auto", model)
items = b.niah_items(tokenizer, dict(contexts=[context], depths=depths, needles=1, follow_up=True))

RECORD = []
original = baselines.QueryAwareScorer.__call__


def recording(self, keys, positions, offset, queries=None):
    if queries is not None:
        k = keys.dequantize() if hasattr(keys, "dequantize") else keys
        RECORD.append(dict(raw=self.scorer(keys, positions, offset), obs=observation_scores(queries, k, positions, offset),
                           sim=mean_similarity(k), knorm=mx.linalg.norm(k.astype(mx.float32), axis=-1),
                           positions=positions, offset=mx.array(offset)))
    return original(self, keys, positions, offset, queries)


baselines.QueryAwareScorer.__call__ = recording


def answer_span(prompt, text, answer):
    pieces = [tokenizer.decode([t]) for t in prompt]
    joined, starts = "", []
    for p in pieces:
        starts.append(len(joined))
        joined += p
    at = joined.index(text) + text.index(answer)
    end = at + len(answer)
    return [i for i, s in enumerate(starts) if s < end and s + len(pieces[i]) > at]


def combos(parts, n_kv):
    z = {k: [zscore(p[k].astype(mx.float32)) for p in parts] for k in ("raw", "obs", "sim")}
    rep = lambda s, h: mx.repeat(s, h // s.shape[1], axis=1)
    out = {}
    for name, f in {
        "method": lambda i: z["raw"][i],
        "obs": lambda i: z["obs"][i],
        "-sim": lambda i: -z["sim"][i],
        "m+2o (0.8 default)": lambda i: z["raw"][i] + 2 * z["obs"][i],
        "m+2o-1s (chat)": lambda i: z["raw"][i] + 2 * z["obs"][i] - rep(z["sim"][i], z["raw"][i].shape[1]),
        "m+2o-3s": lambda i: z["raw"][i] + 2 * z["obs"][i] - 3 * rep(z["sim"][i], z["raw"][i].shape[1]),
        "m+1o-1s": lambda i: z["raw"][i] + 1 * z["obs"][i] - rep(z["sim"][i], z["raw"][i].shape[1]),
        "m-1s": lambda i: z["raw"][i] - rep(z["sim"][i], z["raw"][i].shape[1]),
    }.items():
        out[name] = [pool1d(f(i), 11, "max") for i in range(len(parts))]
    return out


rows = []
for item in items:
    budget = b.budget_tokens(share, item)
    caches = b.method_caches(model, "triattention-redundancy", budget, stats)
    prefill, _ = b.shared_prefill(model, item["prompt"][:-b.TAIL], 2048)
    b.load_prefill(caches, prefill)
    RECORD.clear()
    b.generate(model, tokenizer, item["prompt"][-b.TAIL:], caches, 2, 2048)
    b.cleanup(model)
    parts = RECORD[: len(model.layers)]
    mx.savez(f"/tmp/parts-{model_name}-{item['id'].replace('/', '_')}.npz",
             **{f"{k}{i}": v for i, p in enumerate(parts) for k, v in p.items()})
    settings = caches[0].settings
    n_kv = parts[0]["positions"].shape[1]
    positions, offset = parts[0]["positions"], parts[0]["offset"]
    second = answer_span(item["prompt"], item["needle"], item["answer"])
    first = answer_span(item["prompt"], item["_first"].sentence, item["first_answer"])
    json.dump(dict(second=second, first=first, budget=budget, window=caches[0].settings.window,
                   sinks=caches[0].settings.sinks, layers=len(parts)),
              open(f"/tmp/parts-{model_name}-{item['id'].replace('/', '_')}.json", "w"))
    print(f"\n{item['id']} budget {budget}: second needle tokens {second}, first {first}")
    candidates = ~((positions >= offset - settings.window) | (positions < settings.sinks))
    for name, per_layer in combos(parts, n_kv).items():
        mean = sum(head_scores(s, n_kv, candidates) for s in per_layer) / len(per_layer)
        keep = select_tokens(mean, positions, offset, budget, settings.window, settings.sinks)
        kept = [set(positions[0, h][keep[0, h]].tolist()) for h in range(n_kv)]
        rank = [mx.argsort(mx.argsort(-mean[0, h]))[mx.array(second)].tolist() for h in range(n_kv)]
        f2 = [sum(t in k for t in second) / len(second) for k in kept]
        f1 = [sum(t in k for t in first) / len(first) for k in kept]
        print(f"  {name:20s} second kept {f2}  first kept {f1}  second ranks {rank}")
        rows.append(dict(item=item["id"], combo=name, second=f2, first=f1, ranks=rank))
json.dump(rows, open(f"results/cpu/experiments/follow-up-ranks-{model_name}-{context}.json", "w"), indent=1)
