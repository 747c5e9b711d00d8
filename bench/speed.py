"""Time to first token and decode speed vs context length: full KV, TriAttention and the
ceiling no eviction method can beat.

    python -m bench.speed [--quick] [--lengths 16384 32768 65536 131072] [--budget 4096]
                          [--decode-tokens 64] [--repeats 3] [--turns 5]

GPU (default): a random-weight 4-bit model with Qwen3-8B's config (weights do not change
speed). --quick (CPU): the real test model (SmolLM2-135M float32) at 4k and 8k tokens,
budget 1024.

Each run reads a prompt of N random tokens as mlx-lm does (chunks of --prefill-step, then
the last token alone: its logits are the first token, so the prefill time is the time to
first token), then decodes --decode-tokens tokens pipelined as mlx-lm's generate does.
Every row is the median of --repeats runs (each on a new cache), a length's rows run in
turns (round r runs each once, the order rotated); the runs are recorded.
Rows per length:
- full KV: mlx-lm's KVCache;
- the ceiling: a KVCache holding `budget` tokens (a context of --budget tokens), decode only
  (these two, and full KV through generate_step, run on the model without TriAttention's
  query taps, as mlx-lm runs it: without_taps);
- TriAttention: the default settings (prompt_mode "whole": the prompt is held up to
  prefill_limit = max(4 x budget, 8192) tokens and selected when it ends; longer prompts are
  compressed in rounds of that size). The round that selects it runs at the next call, so
  its cost counts in the first decode step, not in the time to first token;
- TriAttention chunked: prompt_mode "chunked", compressing after every chunk read (the
  reference's behaviour and this package's 0.2 default), with a profiled run beside it
  (every prune round synchronized and timed: scoring vs selection and compaction);
- through mlx-lm's own path: full KV and TriAttention driven by mlx_lm.generate's
  generate_step (what stream_generate and the CLI run), time to the first token yielded.
Decode in turns (first, --turns rounds): batch-1 decode is launch-bound and its rate
wanders by tens of percent from one second to the next, more than any difference between
caches of one size. So the ceiling and a TriAttention cache after a prompt of every length
are prepared side by side and decoded in turns, --turn-tokens tokens each (128, the rounds'
spacing: every TriAttention turn holds one round), the order rotated every round and the
ceiling's turn between every two others. "decode / ceiling, in turns, paired" is the median
over TriAttention's turns of each turn's rate over the ceiling turns beside it; "in turns",
the ratio of the two medians.
"""

import argparse
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache

from bench.common import RESULTS, plot, write_json
from bench.kernels import qwen3_8b_4bit
from triattn_mlx import cache_report, make_prompt_cache
from triattn_mlx.model_info import attention_module, model_layers, own_rope


@contextmanager
def without_taps(model):
    """The model as mlx-lm runs it, for the rows of mlx-lm's own caches: a TriAttention cache
    puts a query tap on every attention's rope (taps.py), and the model is shared. The taps
    themselves are put back after."""
    attentions = [a for a in map(attention_module, model_layers(model)) if a is not None]
    ropes = [a.rope for a in attentions]
    for a in attentions:
        a["rope"] = own_rope(a)
    try:
        yield
    finally:
        for a, rope in zip(attentions, ropes):
            a["rope"] = rope


def prompt_tokens(N, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 1000, N, dtype=np.int32))


def time_to_first_token(model, cache, tokens, prefill_step):
    """Read `tokens` as mlx-lm's generate_step does (chunks, then the last token alone):
    (the first token [1, 1], seconds)."""
    mx.synchronize()
    start = time.perf_counter()
    N = tokens.size
    for at in range(0, N - 1, prefill_step):
        model(tokens[None, at : min(at + prefill_step, N - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    y = model(tokens[None, N - 1 :], cache=cache)[:, -1:].argmax(-1)
    mx.eval(y)
    return y, time.perf_counter() - start


def decode(model, cache, y, steps):
    """`steps` greedy steps, one step in flight (mlx-lm's pipelining): (tokens per second,
    the last token)."""
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        y = model(y, cache=cache)[:, -1:].argmax(-1)
        mx.async_eval(y)
    mx.eval(y)
    return steps / (time.perf_counter() - start), y


def decode_in_turns(model, contestants, steps, rounds, between=None, contexts=None):
    """Decode rates of caches read in turns: round r runs every contestant once, `steps`
    tokens each, in an order rotated by r, so that the machine's drift in speed (batch-1
    decode is launch-bound and its rate wanders by tens of percent from minute to minute)
    falls on all of them alike. With `between` (a label), that contestant also runs before
    and after every other one's turn (see paired_ratios). contestants: {label: (cache,
    first token, trim)}; with trim, the cache is trimmed back after each turn (the ceiling
    stays at its size); contexts: {label: a function returning the context its turns run in
    (e.g. without_taps)}. Returns the turns in the order run: [(label, tok/s)]."""
    others = [label for label in contestants if label != between]
    state = {label: contestants[label][1] for label in contestants}
    turns = []

    def turn(label):
        cache, _, trim = contestants[label]
        with (contexts or {}).get(label, nullcontext)():
            rate, state[label] = decode(model, cache, state[label], steps)
        turns.append((label, rate))
        if trim:
            for c in cache:
                c.trim(steps)

    for r in range(rounds):
        for label in others[r % len(others):] + others[: r % len(others)]:
            if between is not None:
                turn(between)
            turn(label)
        if between is not None:
            turn(between)
    return turns


def rates_by_label(turns):
    """{label: [tok/s of its turns, in order]} from decode_in_turns' turns."""
    rates = {}
    for label, rate in turns:
        rates.setdefault(label, []).append(rate)
    return rates


def paired_ratios(turns, reference):
    """{label: [each of its turns' rate over the mean rate of the `reference` turns just
    before and after it]}. The machine's speed wanders from second to second (on the H200,
    turns one apart correlate at about 0.6, turns four apart not at all), so a turn is best
    compared with its neighbours."""
    out = {}
    for i, (label, rate) in enumerate(turns):
        if label == reference:
            continue
        before = next((r for l, r in reversed(turns[:i]) if l == reference), None)
        after = next((r for l, r in turns[i + 1:] if l == reference), None)
        near = [r for r in (before, after) if r is not None]
        if near:
            out.setdefault(label, []).append(rate / float(np.mean(near)))
    return out


def one_run(model, cache, N, decode_tokens, prefill_step):
    mx.reset_peak_memory()
    y, ttft = time_to_first_token(model, cache, prompt_tokens(N), prefill_step)
    prefill_peak = mx.get_peak_memory()
    rate, _ = decode(model, cache, y, decode_tokens)
    report = cache_report(cache)
    return {"prefill_s": ttft, "decode_tok_s": rate, "prefill_peak_bytes": prefill_peak,
            "peak_bytes": mx.get_peak_memory(), "kv_bytes": report["kv_bytes"], "prune_rounds": report["prune_rounds"],
            "prune_seconds": report["prune_seconds"], "prune_phases": report["prune_phases"]}


def median_row(runs):
    """A row from its runs: the median of each figure; every run kept."""
    row = {k: float(np.median([r[k] for r in runs])) for k in runs[0] if not isinstance(runs[0][k], dict)
           and k not in ("prune_rounds", "prune_seconds")}
    return {**row, **{k: runs[0][k] for k in ("prune_rounds", "prune_seconds", "prune_phases") if k in runs[0]},
            "runs": runs}


def rows_in_turns(model, rows, N, budget, decode_tokens, prefill_step, repeats, plain=()):
    """The rows of one length, their runs taken in turns: round r runs every row still due
    once (each on a new cache), in an order rotated by r, so that the machine's drift falls
    on all of them alike (one row's three runs back to back would each meet another minute).
    rows: {label: (make, kind)}, kind "measured" (--repeats runs), "ceiling" (a context of
    `budget` tokens, --repeats runs), "once" (one run) or "mlx-lm" (--repeats runs through
    generate_step); the rows in `plain` (mlx-lm's caches) run without_taps. Returns
    {label: row}; a row whose run fails holds the error."""
    runs, failed = {label: [] for label in rows}, {}
    labels = list(rows)
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            make, kind = rows[label]
            if label in failed or (r > 0 and kind == "once"):
                continue
            try:
                with without_taps(model) if label in plain else nullcontext():
                    runs[label].append(run_row(model, make, kind, N, budget, decode_tokens, prefill_step))
            except RuntimeError as error:  # out of memory, a backend lacking a kernel
                failed[label] = {"error": str(error).splitlines()[0]}
            mx.clear_cache()
    return {label: failed.get(label) or median_row(runs[label]) for label in labels}


def run_row(model, make, kind, N, budget, decode_tokens, prefill_step):
    """One run of a row of rows_in_turns."""
    if kind == "mlx-lm":
        return through_mlx_lm(model, make, N, decode_tokens, prefill_step)
    # the ceiling: a budget-sized context, what decoding at the budget costs at best
    return one_run(model, make(), budget if kind == "ceiling" else N, decode_tokens, prefill_step)


def through_mlx_lm(model, make, N, decode_tokens, prefill_step):
    """mlx-lm's generate_step (stream_generate's engine): time to the first token it yields,
    then the rate of the rest."""
    cache = make()
    mx.synchronize()
    start = time.perf_counter()
    steps = generate_step(prompt_tokens(N), model, prompt_cache=cache, prefill_step_size=prefill_step,
                          max_tokens=decode_tokens + 1)
    next(steps)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    n = sum(1 for _ in steps)
    return {"prefill_s": ttft, "decode_tok_s": n / (time.perf_counter() - start),
            "kv_bytes": cache_report(cache)["kv_bytes"]}


def test_model():
    """The real test model (SmolLM2-135M, float32) and stats calibrated on other text."""
    import mlx_lm

    from support import code_text, smollm2_model_dir
    from triattn_mlx import calibrate

    model, tokenizer = mlx_lm.load(str(smollm2_model_dir("float32")))
    return model, calibrate(model, tokenizer.encode(code_text())[:2048], source="inspect.py")


QUICK = dict(lengths=[4096, 8064], budget=1024, decode_tokens=64, prefill_step=2048, repeats=3, turn_tokens=128)
FULL = dict(lengths=[16384, 32768, 65536, 131072], budget=4096, decode_tokens=64, prefill_step=2048, repeats=3,
            turn_tokens=128)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, the real test model at 4k and 8k tokens")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--budget", type=int)
    parser.add_argument("--decode-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--rows", nargs="+", help="row names to run (default: all; 'none': decode in turns only)")
    parser.add_argument("--turns", type=int, default=5,
                        help="rounds of decoding the ceiling and TriAttention at every length in turns (0: off)")
    parser.add_argument("--turn-tokens", type=int, help="tokens per turn (default: 128)")
    parser.add_argument("--name", help="results file name (default: speed or speed-quick)")
    parser.add_argument("--output", default=None, help="results folder (default: results/cpu with --quick, "
                                                       "else results/)")
    args = parser.parse_args()
    sizes = {**(QUICK if args.quick else FULL), **{k: v for k, v in (
        ("lengths", args.lengths), ("budget", args.budget), ("decode_tokens", args.decode_tokens),
        ("repeats", args.repeats), ("turn_tokens", args.turn_tokens)) if v}}
    budget, decode_tokens, step, repeats = (sizes[k] for k in ("budget", "decode_tokens", "prefill_step", "repeats"))
    if args.quick:
        model, stats = test_model()
        name, folder = args.name or "speed-quick", Path(args.output or RESULTS / "cpu")
    else:
        model, stats = qwen3_8b_4bit(), "stats/qwen3-8b.safetensors"
        name, folder = args.name or "speed", Path(args.output or RESULTS)
    full = lambda: [KVCache() for _ in model.layers]  # noqa: E731
    tri = lambda **kw: lambda: make_prompt_cache(model, budget, stats=stats, **kw)  # noqa: E731
    rows_wanted = {
        "full KV": (full, "measured"),
        "ceiling": (full, "ceiling"),
        "TriAttention": (tri(), "measured"),
        "TriAttention chunked": (tri(prompt_mode="chunked"), "measured"),
        "TriAttention chunked (profiled)": (tri(prompt_mode="chunked", measure_prune_time=True), "once"),
        "full KV (mlx-lm generate_step)": (full, "mlx-lm"),
        "TriAttention (mlx-lm generate_step)": (tri(), "mlx-lm"),
    }
    if args.rows:
        unknown = [r for r in args.rows if r not in rows_wanted and r != "none"]
        if unknown:
            parser.error(f"unknown rows {unknown}: choose from {list(rows_wanted)} (or 'none': decode in turns only)")
        rows_wanted = {k: v for k, v in rows_wanted.items() if k in args.rows}
    # Compile (JIT) every kernel the rows use, prune rounds included, before any timing
    chunked = any("chunked" in label for label in rows_wanted)
    for make in (full, tri()) + ((tri(prompt_mode="chunked"),) if chunked else ()):
        one_run(model, make(), 4 * budget + 512, 8, step)
    results = {"args": {**vars(args), **sizes}, "device": str(mx.default_device()),
               "model_dtype": str(model.model.norm.weight.dtype).split(".")[-1]}
    if args.turns:
        results["decode_in_turns"] = turns = decode_comparison(model, full, tri(), sizes["lengths"], budget, step,
                                                               sizes["turn_tokens"], args.turns)
        print(json.dumps({k: {m: v[m] for m in ("median", "paired_median") if m in v} for k, v in turns.items()}),
              flush=True)
        write_json(name, results, folder)
    if not rows_wanted:
        write_json(name, {**results, "ratios": ratios([], results.get("decode_in_turns"))}, folder)
        return
    rows = []
    for N in sizes["lengths"]:
        plain = [label for label, (make, _) in rows_wanted.items() if make is full]
        for label, row in rows_in_turns(model, rows_wanted, N, budget, decode_tokens, step, repeats, plain).items():
            rows.append({"N": N, "method": label, **row})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "runs"}), flush=True)
        write_json(name, {**results, "rows": rows, "ratios": ratios(rows, results.get("decode_in_turns"))}, folder)
    plot_speed(rows, folder=folder, name=name,
               title="SmolLM2-135M float32 (CPU)" if args.quick else "Qwen3-8B-shaped 4-bit model")


def decode_comparison(model, full, tri, lengths, budget, prefill_step, steps, rounds):
    """The ceiling (a KVCache holding `budget` tokens) and TriAttention after a prompt of
    each length, decoded in turns on one machine in one process, the ceiling's turns between
    every two others: {label: {"median": tok/s, "rates": [...]}} (labels "ceiling",
    "TriAttention N"), each TriAttention label with "paired": its turns' paired_ratios and
    "paired_median"."""
    contestants = {}  # (the ceiling is read and decoded without_taps: as mlx-lm runs)
    for label, make, N, trim in [("ceiling", full, budget, True)] + [(f"TriAttention {N}", tri, N, False)
                                                                      for N in lengths]:
        cache = make()
        with without_taps(model) if make is full else nullcontext():
            y, _ = time_to_first_token(model, cache, prompt_tokens(N), prefill_step)
        contestants[label] = (cache, y, trim)
        mx.clear_cache()
    turns = decode_in_turns(model, contestants, steps, rounds, between="ceiling",
                            contexts={"ceiling": lambda: without_taps(model)})
    paired = paired_ratios(turns, "ceiling")
    out = {label: {"median": float(np.median(r)), "rates": r} for label, r in rates_by_label(turns).items()}
    for label, r in paired.items():
        out[label].update(paired=r, paired_median=float(np.median(r)))
    return out


def ratios(rows, turns=None):
    """Per length: TriAttention's time to first token over full KV's, and its decode rate
    over the ceiling's (each row's own median; and, where decoded in turns, the medians of
    the turns: the figure drift does not move)."""
    out = {}
    turned = {int(label.split()[-1]) for label in turns or {} if label.startswith("TriAttention ")}
    for N in sorted({r["N"] for r in rows} | turned):
        by = {r["method"]: r for r in rows if r["N"] == N and "error" not in r}
        entry = {}
        for label in ("TriAttention", "TriAttention chunked", "TriAttention (mlx-lm generate_step)"):
            base = "full KV (mlx-lm generate_step)" if "mlx-lm" in label else "full KV"
            if label in by and base in by:
                entry[f"{label}: prefill / full"] = by[label]["prefill_s"] / by[base]["prefill_s"]
            if label in by and "ceiling" in by:
                entry[f"{label}: decode / ceiling"] = by[label]["decode_tok_s"] / by["ceiling"]["decode_tok_s"]
        if turns and f"TriAttention {N}" in turns:
            rates, ceiling = turns[f"TriAttention {N}"], turns["ceiling"]
            entry["TriAttention: decode / ceiling, in turns"] = rates["median"] / ceiling["median"]
            # each round's own ratio (the two decoded seconds apart), then their median
            if "paired_median" in rates:  # each turn over the ceiling's turns beside it, the median
                entry["TriAttention: decode / ceiling, in turns, paired"] = rates["paired_median"]
        out[str(N)] = entry
    return out


def plot_speed(rows, name="speed", title="Qwen3-8B-shaped 4-bit model", **kwargs):
    """Time to first token and decode tok/s vs context, per row (failed rows left out)."""
    with plot(name, **kwargs) as (fig, _):
        fig.clf()
        fig.set_size_inches(11, 4.5)
        ttft, decode = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for label in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["N"], r["prefill_s"], r["decode_tok_s"]) for r in rows
                   if r["method"] == label and "error" not in r]
            if not pts or "profiled" in label:
                continue
            Ns, prefill, rate = zip(*pts)
            if label != "ceiling":
                ttft.plot(Ns, prefill, marker="o", label=label)
            decode.plot(Ns, rate, marker="o", label=label, linestyle="--" if label == "ceiling" else "-")
        for ax, ylabel in ((ttft, "time to first token (s)"), (decode, "decode tok/s (batch 1)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
