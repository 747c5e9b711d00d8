"""Peak memory and KV size over a long generation: TriAttention vs mlx-lm's full cache.

    python -m bench.long_generation [--tokens 3000] [--budget 256]

Greedy decoding with end-of-sequence tokens suppressed (so every run reaches --tokens),
on the real test model. Peak memory is MLX's measured peak, reset after loading.
"""

import argparse
import time

import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache as full_cache

from bench.common import plot, write_json
from support import code_text, smollm2_model_dir
from triattn_mlx import cache_report, calibrate, make_prompt_cache


def run(model, tokenizer, prompt, cache, tokens, checkpoint):
    eos = list(tokenizer.eos_token_ids)
    ban = lambda _, logits: logits.at[..., eos].add(-1e9)  # noqa: E731
    trace = []
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    for i, _ in enumerate(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=tokens,
                                                 prompt_cache=cache, logits_processors=[ban]), 1):
        if i % checkpoint == 0 or i == tokens:
            report = cache_report(cache)
            trace.append({"generated": i, "peak_memory_mb": mx.get_peak_memory() / 2**20,
                          "kv_mb": report["kv_bytes"] / 2**20, "tokens_kept": report["tokens_kept"]})
    elapsed = time.perf_counter() - start
    return {"trace": trace, "seconds": elapsed, "report": cache_report(cache)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--checkpoint", type=int, default=250)
    args = parser.parse_args()

    model, tokenizer = mlx_lm.load(str(smollm2_model_dir("float32")))
    stats = calibrate(model, tokenizer.encode(code_text())[:1024])
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a long story about a lighthouse keeper."}], add_generation_prompt=True)
    results = {}
    for name, cache in (("triattention", make_prompt_cache(model, args.budget, stats=stats)),
                        ("full", full_cache(model))):
        results[name] = run(model, tokenizer, prompt, cache, args.tokens, args.checkpoint)
        last = results[name]["trace"][-1]
        print(f"{name:12s} peak {last['peak_memory_mb']:.1f} MB, KV {last['kv_mb']:.1f} MB, "
              f"{results[name]['report']['tokens_seen']} tokens seen, kept {last['tokens_kept']}, "
              f"{args.tokens / results[name]['seconds']:.1f} tok/s")
    write_json("long_generation", {"args": vars(args), "results": results})
    with plot("long_generation") as (fig, ax):
        for name, r in results.items():
            ax.plot([t["generated"] for t in r["trace"]], [t["peak_memory_mb"] for t in r["trace"]],
                    marker="o", label=f"{name}: peak memory")
            ax.plot([t["generated"] for t in r["trace"]], [t["kv_mb"] for t in r["trace"]],
                    linestyle="--", label=f"{name}: KV cache")
        ax.set_xlabel("generated tokens")
        ax.set_ylabel("MB")
        ax.set_title(f"SmolLM2-135M float32, budget {args.budget}")
        ax.legend()


if __name__ == "__main__":
    main()
