"""Quality of every KV strategy at equal budget, on the real test model (SmolLM2-135M).

    python -m bench.quality [--quick] [--tokens 6144] [--budgets 128 256 512 1024 2048]
                            [--parts perplexity retrieval fidelity] [--methods NAME ...]

Stats for TriAttention are calibrated on Python source (inspect.py) that no evaluation
text contains. Three measurements, all against full attention (mlx-lm KVCache):
- perplexity: teacher-forced over long texts of two kinds (English prose from the
  language reference's help topics, Python source of argparse.py), fed in 64-token chunks
  so eviction happens as it would while reading; perplexity and mean KL(full || method)
  over the positions after the cache first fills (budget + 128).
- retrieval (copy recall): a sequence of random vocabulary tokens is placed at a depth of
  a prose context; at the end its first 4 tokens are repeated and the score is the share
  of the following tokens the model predicts (teacher-forced argmax). Full attention's
  score is the ceiling: a classic passkey prompt does not work on this 135M model.
- fidelity: greedy continuation of long prose prompts; the share of the first N generated
  tokens equal to full attention's, position by position, and the common prefix length,
  averaged over the prompts.
mlx-lm's QuantizedKVCache (keeps every token, 4 or 8 bits) is compared at equal memory:
its rows carry the KV bytes measured at the end, as every row does.
Results: results/cpu/quality[-quick].json and .png (written after every row).
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np

from bench.common import RESULTS, evaluation_texts, plot, write_json
from bench.methods import TRIATTENTION, cleanup, equal_memory_methods, full_cache, methods
from support import code_text, prose_text, smollm2_model_dir
from support.evaluate import chunk_logprobs, perplexity, reference_nll, teacher_forced
from triattn_mlx import cache_report, calibrate

QUICK = dict(tokens=1024, budgets=[128, 256], recall_context=512, recall_depths=[0.25, 0.75], recall_seeds=[0],
             fidelity_prompt=512, fidelity_prompts=2, fidelity_tokens=16)
FULL = dict(tokens=6144, budgets=[128, 256, 512, 1024, 2048], recall_context=2048,
            recall_depths=[0.1, 0.3, 0.5, 0.7, 0.9], recall_seeds=[0, 1], fidelity_prompt=2048, fidelity_prompts=4,
            fidelity_tokens=64)


def kv_bytes(cache):
    return cache_report(cache)["kv_bytes"]


def feed(model, cache, tokens, chunk=128):
    """Run tokens through the cache (as a prompt is read); returns the last logits."""
    x = mx.array(tokens)
    for start in range(0, len(tokens), chunk):
        logits = model(x[None, start : start + chunk], cache=cache)
        mx.eval(logits)
    return logits[0, -1]


def copy_recall(model, make, filler, vocab, context, depth, seed, length=24, cue=4):
    """Share of a planted random sequence's tokens (after its first `cue`) predicted."""
    rng = np.random.default_rng(seed)
    sequence = rng.choice(vocab, length, replace=False).tolist()
    ctx = filler[seed * 3000 : seed * 3000 + context]
    at = int(depth * context)
    tokens = ctx[:at] + sequence + ctx[at:] + sequence
    prompt_end = len(tokens) - (length - cue)
    cache = make()
    feed(model, cache, tokens[: prompt_end - 1])
    logits = model(mx.array(tokens[prompt_end - 1 : -1])[None], cache=cache)[0]
    predicted = np.array(logits.argmax(-1))
    return float((predicted == np.array(tokens[prompt_end:])).mean()), kv_bytes(cache)


def greedy(model, cache, prompt, n):
    logits, out = feed(model, cache, prompt), []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one text, small sizes: under 10 minutes on 2 cores")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--budgets", type=int, nargs="+")
    parser.add_argument("--parts", nargs="+", default=["perplexity", "retrieval", "fidelity"])
    parser.add_argument("--recall-depths", type=float, nargs="+")
    parser.add_argument("--recall-seeds", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", help="names to run (default: all)")
    parser.add_argument("--texts", nargs="+", choices=["prose", "code"], help="perplexity texts (default: both; "
                                                                            "--quick: prose)")
    parser.add_argument("--name", help="results file name (default: quality or quality-quick)")
    parser.add_argument("--output", default=str(RESULTS / "cpu"))
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({k: v for k, v in (("tokens", args.tokens), ("budgets", args.budgets),
                                    ("recall_depths", args.recall_depths), ("recall_seeds", args.recall_seeds)) if v})
    name = args.name or ("quality-quick" if args.quick else "quality")
    folder = Path(args.output)

    model, tokenizer = mlx_lm.load(str(smollm2_model_dir("float32")))
    stats = calibrate(model, tokenizer.encode(code_text())[:2048], source="inspect.py")
    table = {**methods(stats), **equal_memory_methods()}
    if args.methods:
        unknown = set(args.methods) - set(table)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; known: {sorted(table)}")
        table = {k: v for k, v in table.items() if k in args.methods}
    rows = []

    def record(row):
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        write_json(name, {"command": "python -m bench.quality" + (" --quick" if args.quick else ""),
                          "sizes": sizes, "rows": rows}, folder)

    def run(label, make, budget, fn):
        start = time.perf_counter()
        try:
            return fn(lambda: make(model, budget))
        finally:
            cleanup(model)
            print(f"  ({label}, budget {budget}: {time.perf_counter() - start:.0f} s)", flush=True)

    equal_memory = set(equal_memory_methods())

    def budgets_for(label, budgets):
        # QuantizedKVCache keeps every token: one run stands for every budget
        return [None] if label in equal_memory else budgets

    texts = args.texts or (["prose"] if args.quick else ["prose", "code"])
    if "perplexity" in args.parts:
        for kind, tokens in evaluation_texts(tokenizer, sizes["tokens"]).items():
            if kind not in texts:
                continue
            full = full_cache(model)
            ref = list(chunk_logprobs(model, tokens, full))
            full_nll = reference_nll(ref, tokens)
            for budget in sizes["budgets"]:
                record(dict(part="perplexity", text=kind, budget=budget, method="full attention",
                            ppl=perplexity(full_nll, budget + 128), kl=0.0, kv_bytes=kv_bytes(full)))
            for label, make in table.items():
                for run_budget in budgets_for(label, sizes["budgets"]):
                    def measure(new):
                        cache = new()
                        nll, kl = teacher_forced(model, tokens, cache, ref)
                        return nll, kl, kv_bytes(cache)

                    nll, kl, nbytes = run(label, make, run_budget, measure)
                    for budget in sizes["budgets"] if run_budget is None else [run_budget]:
                        start = budget + 128  # scored after the cache first fills
                        record(dict(part="perplexity", text=kind, budget=budget, method=label,
                                    ppl=perplexity(nll, start), kl=float(kl[start:].mean()),
                                    kl_median=float(np.median(kl[start:])), kv_bytes=nbytes))

    if "retrieval" in args.parts:
        filler = tokenizer.encode(prose_text())[40000:80000]
        vocab = np.array(sorted(set(filler)))
        context = sizes["recall_context"]
        trials = [(d, s) for d in sizes["recall_depths"] for s in sizes["recall_seeds"]]
        budgets = [b for b in sizes["budgets"] if b <= context // 4]
        full_scores = [copy_recall(model, lambda: full_cache(model), filler, vocab, context, d, s)[0]
                       for d, s in trials]
        record(dict(part="retrieval", context=context, budget=None, method="full attention",
                    recall=float(np.mean(full_scores)), by_depth=full_scores))
        for label, make in table.items():
            for budget in budgets_for(label, budgets):
                scores = []
                for d, s in trials:
                    score, nbytes = run(label, make, budget,
                                        lambda new: copy_recall(model, new, filler, vocab, context, d, s))
                    scores.append(score)
                record(dict(part="retrieval", context=context, budget=budget, method=label,
                            recall=float(np.mean(scores)), by_depth=scores, kv_bytes=nbytes))

    if "fidelity" in args.parts:
        prose_ids, n, length = tokenizer.encode(prose_text()), sizes["fidelity_tokens"], sizes["fidelity_prompt"]
        prompts = [prose_ids[60000 + i * length : 60000 + (i + 1) * length] for i in range(sizes["fidelity_prompts"])]
        references = [greedy(model, full_cache(model), prompt, n) for prompt in prompts]
        for label, make in table.items():
            for budget in budgets_for(label, [b for b in sizes["budgets"] if b <= length // 4]):
                same, prefixes = [], []
                for prompt, reference in zip(prompts, references):
                    out = run(label, make, budget, lambda new: greedy(model, new(), prompt, n))
                    match = [a == b for a, b in zip(out, reference)]
                    same.append(float(np.mean(match)))
                    prefixes.append(match.index(False) if False in match else n)
                record(dict(part="fidelity", prompt=length, prompts=len(prompts), budget=budget, method=label,
                            agreement=float(np.mean(same)), common_prefix=float(np.mean(prefixes))))

    draw(name, rows, folder)


def draw(name, rows, folder):
    parts = [p for p in ("perplexity", "retrieval", "fidelity") if any(r["part"] == p for r in rows)]
    metric = {"perplexity": ("kl", "mean KL(full || method)"), "retrieval": ("recall", "copy recall"),
              "fidelity": ("agreement", "greedy agreement with full")}
    with plot(name, folder) as (fig, _):
        import matplotlib.pyplot as plt

        fig.clf()
        fig.set_size_inches(6 * len(parts), 5)
        for i, part in enumerate(parts):
            ax = fig.add_subplot(1, len(parts), i + 1)
            key, label = metric[part]
            sub = [r for r in rows if r["part"] == part and r["method"] != "full attention"
                   and r.get("text", "prose") == "prose" and r["budget"] is not None
                   and "QuantizedKVCache" not in r["method"]]
            names = list(dict.fromkeys(r["method"] for r in sub))
            colors = {m: plt.cm.tab20(j % 20) for j, m in enumerate(names)}
            if len({r["budget"] for r in sub}) == 1:  # one budget: bars per method
                ax.barh(names, [next(r[key] for r in sub if r["method"] == m) for m in names],
                        color=[colors[m] for m in names])
                ax.invert_yaxis()
                ax.tick_params(axis="y", labelsize=6)
                ax.set_xlabel(f"{label}, budget {sub[0]['budget']}")
                ax.set_title(part)
                continue
            for method in names:
                pts = sorted((r["budget"], r[key]) for r in sub if r["method"] == method)
                style = dict(linewidth=2.5, color="black") if method == TRIATTENTION else dict(
                    linewidth=1, color=colors[method])
                ax.plot(*zip(*pts), marker="o", label=method, **style)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("budget (tokens per head)")
            ax.set_ylabel(label)
            if key == "kl":
                ax.set_yscale("log")
            ax.set_title(f"{part} (prose)" if part == "perplexity" else part)
            ax.legend(fontsize=6)


if __name__ == "__main__":
    main()
