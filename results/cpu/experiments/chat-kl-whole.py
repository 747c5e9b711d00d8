"""KL(full || compressed) over a document's continuation, the document read whole and selected
at its end (the prompt's round: the only round the chat settings act in; bench.quality reads
its texts in chunks, never ending a prompt, so it cannot see them). SmolLM2-135M float32,
stats calibrated on inspect.py as bench.quality's; two 3072-token stretches each of prose
(the language reference's help topics) and code (argparse.py), then 512 tokens teacher-forced
in 64-token chunks; budgets 256 / 512 / 1024; the library's defaults, observe_redundancy 1 (the
0.9 chat default) and the distinct keys' quotas (segments 8 in the prompt's round,
segment_fill "distinct").

    PYTHONPATH=. python results/cpu/experiments/chat-kl-whole.py results/cpu/experiments/chat-kl-whole.json [--short]
"""
import triattn_mlx
import mlx.core as mx, numpy as np, mlx_lm, json, sys
from mlx_lm.models.cache import make_prompt_cache as full_cache
from support import code_text, prose_text, smollm2_model_dir
from triattn_mlx import calibrate, remove_taps

P, C = 3072, 512
# --short: the first stretch of each text at budgets 512 and 1024 only (the session's CPU was
# shared with a benchmark; the first run's rows are in chat-kl-whole-first.log)
SHORT = "--short" in sys.argv
STARTS = (lambda ids: (0,)) if SHORT else (lambda ids: (0, len(ids) // 2))
BUDGETS = (512, 1024) if SHORT else (256, 512, 1024)
SETTINGS = {"default": {}, "redundancy": dict(observe_redundancy=1.0),
            "distinct": dict(segments=8, segment_rounds="prompt", segment_fill="distinct")}
model, tok = mlx_lm.load(str(smollm2_model_dir("float32")))
stats = calibrate(model, tok.encode(code_text())[:2048], source="inspect.py")

def continuation_logprobs(cache, tokens):
    x = mx.array(tokens)
    for s in range(0, P - 1, 2048):
        mx.eval(model(x[None, s:min(s + 2048, P - 1)], cache=cache))
    out = [model(x[None, P - 1:P], cache=cache)[0]]  # the prompt's last token alone: its round
    for s in range(P, P + C - 1, 64):
        out.append(model(x[None, s:min(s + 64, P + C - 1)], cache=cache)[0])
    lp = mx.concatenate(out, axis=0)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    mx.eval(lp)
    return lp

rows = []
for name, text in (("prose", prose_text()), ("code", code_text())):
    ids = tok.encode(text)
    for start in STARTS(ids):
        tokens = ids[start:start + P + C]
        ref = continuation_logprobs(full_cache(model), tokens)
        for budget in BUDGETS:
            row = dict(text=name, start=start, budget=budget)
            for label, fields in SETTINGS.items():
                cache = triattn_mlx.make_prompt_cache(model, budget, stats=stats, **fields)
                lp = continuation_logprobs(cache, tokens)
                remove_taps(model)
                row["kl_" + label] = float((mx.exp(ref) * (ref - lp)).sum(-1).mean())
            rows.append(row)
            print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
