"""KL(full || compressed) over a document's continuation, the document read whole and selected
at its end (the prompt's round: the only round observe_redundancy acts in; bench.quality reads
its texts in chunks, never ending a prompt, so it cannot see the term). SmolLM2-135M float32,
stats calibrated on inspect.py as bench.quality's; two 3072-token stretches each of prose
(the language reference's help topics) and code (argparse.py), then 512 tokens teacher-forced
in 64-token chunks; budgets 256 / 512 / 1024, observe_redundancy 0 and 1.

    PYTHONPATH=. python results/cpu/experiments/redundancy-kl-whole.py results/cpu/experiments/redundancy-kl-whole.json
"""
import triattn_mlx
import mlx.core as mx, numpy as np, mlx_lm, json, sys
from mlx_lm.models.cache import make_prompt_cache as full_cache
from support import code_text, prose_text, smollm2_model_dir
from triattn_mlx import calibrate, remove_taps

P, C = 3072, 512
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
    for start in (0, len(ids) // 2):
        tokens = ids[start:start + P + C]
        ref = continuation_logprobs(full_cache(model), tokens)
        for budget in (256, 512, 1024):
            kls = []
            for w in (0.0, 1.0):
                cache = triattn_mlx.make_prompt_cache(model, budget, stats=stats, observe_redundancy=w)
                lp = continuation_logprobs(cache, tokens)
                remove_taps(model)
                kls.append(float((mx.exp(ref) * (ref - lp)).sum(-1).mean()))
            rows.append(dict(text=name, start=start, budget=budget, kl_default=kls[0], kl_redundancy=kls[1]))
            print(rows[-1], flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
