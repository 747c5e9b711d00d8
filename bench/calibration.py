"""Are query centers a property of the model? Cross-corpus stability and self-calibration.

    python -m bench.calibration [--tokens 4096] [--budget 512] [--calib-tokens 2048]

On the real test model: centers calibrated on English prose and on Python source are
compared head by head (cosine similarity), then teacher-forced perplexity at a fixed
budget is measured on a prose text and a code text with (a) stats from the same kind of
text, (b) stats from the other kind, (c) self-calibration on the evaluated text itself
(what `--stats auto` does when no stats ship for a model). Calibration and evaluation
texts never overlap.
"""

import argparse

import mlx_lm
import numpy as np

from bench.common import evaluation_texts, plot, write_json
from support import code_text, prose_text, smollm2_model_dir
from support.evaluate import perplexity, reference_logprobs, reference_nll, teacher_forced
from triattn_mlx import calibrate, make_prompt_cache


def center_cosines(a, b):
    # q_mean: [L, H, D/2] complex -> cosine of the real 2-vectors per (layer, head)
    dot = (a.q_mean * np.conj(b.q_mean)).real.sum(-1)
    return dot / (np.linalg.norm(a.q_mean, axis=-1) * np.linalg.norm(b.q_mean, axis=-1))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--calib-tokens", type=int, default=2048)
    args = parser.parse_args()

    model, tokenizer = mlx_lm.load(str(smollm2_model_dir("float32")))
    prose = tokenizer.encode(prose_text())
    calib = {
        "prose": calibrate(model, prose[: args.calib_tokens], source="help topics, first tokens"),
        "code": calibrate(model, tokenizer.encode(code_text())[: args.calib_tokens], source="inspect.py"),
    }
    cos = center_cosines(calib["prose"], calib["code"])
    stability = {"median": float(np.median(cos)), "p10": float(np.percentile(cos, 10)),
                 "min": float(cos.min())}
    print(f"center cosine similarity prose vs code, per head: median {stability['median']:.3f}, "
          f"p10 {stability['p10']:.3f}, min {stability['min']:.3f}")

    texts = evaluation_texts(tokenizer, args.tokens)  # prose far from the calibration tokens
    results = {}
    for kind, tokens in texts.items():
        other = "code" if kind == "prose" else "prose"
        ref = reference_logprobs(model, tokens)
        row = {"full attention": {"ppl": perplexity(reference_nll(ref, tokens), args.budget), "kl": 0.0}}
        variants = {
            f"same corpus ({kind})": calib[kind],
            f"cross corpus ({other})": calib[other],
            "self-calibration (the text itself)": calibrate(model, tokens, source="self"),
        }
        for name, stats in variants.items():
            nll, kl = teacher_forced(model, tokens, make_prompt_cache(model, args.budget, stats=stats,
                                                                      prompt_mode="chunked"), ref)
            row[name] = {"ppl": perplexity(nll, args.budget), "kl": float(kl[args.budget:].mean())}
        results[kind] = row
        print(f"\n{kind} text, {len(tokens)} tokens, budget {args.budget}:")
        for name, r in row.items():
            print(f"  {name:38s} ppl {r['ppl']:7.3f}  KL {r['kl']:.4f}")

    write_json("calibration", {"args": vars(args), "center_cosine": stability, "quality": results})
    with plot("calibration") as (fig, ax):
        ax.hist(cos.ravel(), bins=40)
        ax.set_xlabel("cosine(center from prose, center from code), per head")
        ax.set_ylabel("heads")
        ax.set_title("SmolLM2-135M: query centers across corpora")


if __name__ == "__main__":
    main()
