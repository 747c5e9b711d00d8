"""Eviction times quantization: quality and measured KV bytes on the real test model.

    python -m bench.quantized [--quick] [--tokens 3072] [--budgets 256 512 1024]

Teacher-forced over a prose and a code text (SmolLM2-135M float32, stats calibrated on
other text), every method against full attention: TriAttention with unquantized, 8-bit
and 4-bit storage at each budget, and mlx-lm's QuantizedKVCache alone (8 and 4 bits, no
eviction, quantized from the first token as `--quantized-kv-start 0`). Perplexity and mean
KL are taken over the positions after the smallest budget's cache first fills; KV bytes
are the bytes the caches hold at the end, measured. Compare methods at equal memory on
the plot (KL against bytes).
"""

import argparse
import time
from pathlib import Path

import mlx_lm
from mlx_lm.models.cache import QuantizedKVCache
from mlx_lm.models.cache import make_prompt_cache as full_cache

from bench.common import RESULTS, evaluation_texts, plot, write_json
from support import code_text, smollm2_model_dir
from support.evaluate import chunk_logprobs, perplexity, reference_nll, teacher_forced
from triattn_mlx import cache_report, calibrate, make_prompt_cache


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one text, 1536 tokens, budgets 256 512")
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024])
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.budgets = 1536, [256, 512]
    folder = RESULTS / "cpu"

    model, tokenizer = mlx_lm.load(str(smollm2_model_dir("float32")))
    calib_ids = tokenizer.encode(code_text())
    texts = evaluation_texts(tokenizer, args.tokens)
    stats = calibrate(model, calib_ids[:2048], source="inspect.py")  # other text than both
    if args.quick:
        texts = {"prose": texts["prose"]}
    start = min(args.budgets) + 128  # scored after the smallest cache first fills

    methods = [("mlx-lm QuantizedKVCache 8-bit", None, 8), ("mlx-lm QuantizedKVCache 4-bit", None, 4)]
    methods += [(f"TriAttention {b} {'fp' if bits is None else f'{bits}-bit'}", b, bits)
                for b in args.budgets for bits in (None, 8, 4)]
    rows = []
    for kind, tokens in texts.items():
        full = full_cache(model)
        ref = list(chunk_logprobs(model, tokens, full))
        full_ppl = perplexity(reference_nll(ref, tokens), start)
        rows.append(dict(text=kind, method="full attention", budget=None, bits=None, ppl=full_ppl, kl=0.0,
                         kv_bytes=cache_report(full)["kv_bytes"]))
        for name, budget, bits in methods:
            if budget is None:
                cache = [QuantizedKVCache(group_size=64, bits=bits) for _ in model.layers]
            else:
                cache = make_prompt_cache(model, budget, stats=stats, kv_bits=bits, prompt_mode="chunked")
            t0 = time.perf_counter()
            nll, kl = teacher_forced(model, tokens, cache, ref)
            row = dict(text=kind, method=name, budget=budget, bits=bits, ppl=perplexity(nll, start),
                       kl=float(kl[start:].mean()), kv_bytes=cache_report(cache)["kv_bytes"],
                       seconds=round(time.perf_counter() - t0, 1))
            rows.append(row)
            print(f"{kind:5s} {name:32s} ppl {row['ppl']:7.3f} (full {full_ppl:.3f})  KL {row['kl']:.4f}  "
                  f"KV {row['kv_bytes'] / 2**20:6.1f} MiB", flush=True)

    name = "quantized-quick" if args.quick else "quantized"
    write_json(name, {"command": f"python -m bench.{Path(__file__).stem}" + (" --quick" if args.quick else ""),
                      "tokens": args.tokens, "scored_from": start, "rows": rows}, folder)
    with plot(name, folder) as (fig, ax):
        for kind, marker in (("prose", "o"), ("code", "s")):
            full = [r for r in rows if r["text"] == kind and r["method"] == "full attention"]
            ax.axvline(full[0]["kv_bytes"] / 2**20, color="black", linestyle=":", linewidth=0.8)
            for family, color in (("QuantizedKVCache", "tab:gray"), ("fp", "tab:blue"), ("8-bit", "tab:green"),
                                  ("4-bit", "tab:red")):
                pts = [r for r in rows if r["text"] == kind and r["kv_bytes"] and family in r["method"]
                       and (family == "QuantizedKVCache") == ("QuantizedKVCache" in r["method"])]
                if pts:
                    ax.plot([r["kv_bytes"] / 2**20 for r in pts], [r["kl"] for r in pts], marker=marker,
                            color=color, linestyle="-" if family != "QuantizedKVCache" else "none",
                            label=f"{kind}: {'TriAttention ' if family != 'QuantizedKVCache' else 'mlx-lm '}{family}")
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes held at the end (MiB, measured)")
        ax.set_ylabel("mean KL(full || method)")
        ax.set_title(f"Eviction x quantization, SmolLM2-135M, {args.tokens} tokens")
        ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
