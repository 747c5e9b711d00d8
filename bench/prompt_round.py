"""What the round that selects a prompt costs, with the library's settings and the server's:

    python -m bench.prompt_round [--quick] [--lengths 8192 16384 32768] [--repeats 3] [--output DIR]

GPU: the Qwen3-8B-shaped 4-bit model (bench.kernels; its KV cache bfloat16, 36 layers x 8
KV heads x 128); --quick (CPU): the real test model, SmolLM2-135M float32 with calibrated
stats, at 4096 and 8064 tokens. TriAttention's defaults at budget N / 4, so that an N-token
prompt is held whole (prefill_limit 4 x budget) and selected once, when it ends. That round
runs at the call after the prompt's last token (deferred off the path to the first token),
so it is timed as the first decode step less a plain decode step after it; the time to
first token and the peak memory (from the prompt's start to that step) are recorded too.
Rows: "library", TriAttention's defaults, and "server", with settings.CHAT_DEFAULTS (from
0.10 coverage's quotas filled by each stretch's most distinct keys: each held key's mean
similarity to the others, O(N D) a KV head, and one more top-k per stretch; 0.9's run
compared observe_redundancy 0 and 1). Medians of --repeats runs, the two settings in turns.
Writes prompt-round.json and .png (GPU: results/h100/; --quick: results/cpu/).
"""

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench.common import RESULTS, plot, write_json
from bench.kernels import qwen3_8b_4bit
from bench.speed import prompt_tokens, test_model, time_to_first_token
from triattn_mlx import make_prompt_cache
from triattn_mlx.settings import CHAT_DEFAULTS

SETTINGS = {"library": {}, "server": CHAT_DEFAULTS}


def synced_step(model, cache, y):
    """One decode step, synchronized: (the next token, seconds)."""
    mx.synchronize()
    start = time.perf_counter()
    y = model(y, cache=cache)[:, -1:].argmax(-1)
    mx.eval(y)
    return y, time.perf_counter() - start


def one_run(model, stats, N, settings, prefill_step):
    cache = make_prompt_cache(model, N // 4, stats=stats, **SETTINGS[settings])
    mx.reset_peak_memory()
    y, ttft = time_to_first_token(model, cache, prompt_tokens(N), prefill_step)
    y, first = synced_step(model, cache, y)  # the prompt's round runs here
    peak = mx.get_peak_memory() / 2**30
    assert cache[0].prune_rounds == 1 and cache[0].size() == N // 4 + 1, "the prompt was not selected once"
    _, plain = synced_step(model, cache, y)
    return dict(ttft_s=ttft, first_step_s=first, plain_step_s=plain, round_s=first - plain, peak_gib=peak)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, the real test model at 4k and 8k tokens")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-step", type=int, default=2048)
    parser.add_argument("--output")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        (model, stats), name = test_model(), "SmolLM2-135M, float32"
        lengths, output = args.lengths or [4096, 8064], args.output or RESULTS / "cpu"
    else:
        model, stats, name = qwen3_8b_4bit(), "stats/qwen3-8b.safetensors", "Qwen3-8B-shaped, 4-bit, random weights"
        lengths, output = args.lengths or [8192, 16384, 32768], args.output or RESULTS / "h100"
    one_run(model, stats, 2048, "server", args.prefill_step)  # warm-up: kernels compiled
    rows = []
    for N in lengths:
        runs = {settings: [] for settings in SETTINGS}
        for r in range(args.repeats):
            for settings in (list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]):
                runs[settings].append(one_run(model, stats, N, settings, args.prefill_step))
        for settings, done in runs.items():
            row = dict(prompt=N, budget=N // 4, settings=settings, fields=SETTINGS[settings],
                       **{k: float(np.median([d[k] for d in done])) for k in done[0]}, runs=done)
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "runs"}, flush=True)
    write_json("prompt-round", dict(device=str(mx.default_device()), model=name,
                                    command="python -m bench.prompt_round " + " ".join(argv), rows=rows), Path(output))
    draw(rows, name, Path(output))


def draw(rows, name, folder):
    lengths = sorted({r["prompt"] for r in rows})
    with plot("prompt-round", folder) as (fig, ax):
        for i, settings in enumerate(SETTINGS):
            ms = [1000 * next(r["round_s"] for r in rows if r["prompt"] == N and r["settings"] == settings)
                  for N in lengths]
            ax.bar([j + 0.4 * i for j in range(len(lengths))], ms, width=0.4, label=f"{settings} settings")
        ax.set_xticks([j + 0.2 for j in range(len(lengths))], [f"{N} tokens, budget {N // 4}" for N in lengths])
        ax.set_ylabel("the prompt's round, ms (first decode step less a plain one)")
        ax.set_title(f"The round that selects a prompt: {name}", fontsize=9)
        ax.legend()


if __name__ == "__main__":
    main()
