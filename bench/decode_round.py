"""Where a decode prune round's time goes (GPU): python -m bench.decode_round [--output DIR]

The Qwen3-8B-shaped 4-bit model (bench.kernels), budget 4096, after a 16k prompt:
- the ceiling and TriAttention decoded in turns (bench.speed.decode_in_turns), 9 x 128 tokens;
- decode steps synchronized one by one: a plain step, and the step that runs a prune round
  with the host's graph-building time of that step (MLX builds lazily: that is the Python
  and dispatch cost the round adds before the GPU can start on it);
- the round's pieces on one layer's keys, each synchronized: the scorer, scorer + z-score
  and GQA reduction, selection (argpartition + sort), the three gathers of compaction.
Writes decode-round-profile.json (the H200 run: results/h200/).

--host (any machine, no model compute): the host's time per decode step in the caches alone,
mlx-lm's KVCache against TriAttention, 36 layers of Qwen3-8B's KV shape (8 heads x 128)
holding 4096 tokens, update_and_fetch called as the attention layers call it (best of 5
runs of 100 steps, no round in them). Writes decode-host-step.json.
"""

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from bench.common import RESULTS
from bench.kernels import qwen3_8b_4bit, qwen3_8b_bfloat16
from bench.speed import decode_in_turns, prompt_tokens, rates_by_label, time_to_first_token
from triattn_mlx import make_prompt_cache
from triattn_mlx.selection import gather_tokens, head_scores, protected_tokens, select_tokens

BUDGET, PROMPT = 4096, 16384


def synced_seconds(fn, repeats=30):
    """Median seconds of fn() evaluated alone."""
    times = []
    for _ in range(repeats):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def round_steps(model, cache, y, rounds):
    """Plain decode steps (each synchronized) and the steps that run a round: (plain step
    seconds, [round step seconds], [host seconds building the round step's graph])."""
    plain, steps, builds = [], [], []
    for _ in range(rounds):
        while cache[0]._idx < cache[0]._due_at - 1:
            mx.synchronize()
            start = time.perf_counter()
            y = model(y, cache=cache)[:, -1:].argmax(-1)
            mx.eval(y)
            plain.append(time.perf_counter() - start)
        before = cache[0].prune_rounds
        mx.synchronize()
        start = time.perf_counter()
        logits = model(y, cache=cache)
        built = time.perf_counter()
        y = logits[:, -1:].argmax(-1)
        mx.eval(y)
        steps.append(time.perf_counter() - start)
        builds.append(built - start)
        assert cache[0].prune_rounds == before + 1, "the step did not run a round"
    return float(np.median(plain)), steps, builds


def round_pieces(cache):
    """Each piece of one layer's round on its own (synchronized), seconds."""
    keys, positions, offset = cache.keys[..., : cache._idx, :], cache.token_positions(), cache.offset
    n_kv, window = keys.shape[1], cache.settings.window
    mx.eval(keys, positions)

    def scored():
        return head_scores(cache.scorer(keys, positions, offset), n_kv,
                           ~protected_tokens(positions, offset, window, 0))

    scores = scored()
    keep = select_tokens(scores, positions, offset, BUDGET, window, 0)
    mx.eval(scores, keep)
    return {
        "scorer": synced_seconds(lambda: cache.scorer(keys, positions, offset)),
        "scorer + head_scores": synced_seconds(scored),
        "select (argpartition + sort)": synced_seconds(
            lambda: select_tokens(scores, positions, offset, BUDGET, window, 0)),
        "gather keys, values, positions": synced_seconds(
            lambda: [gather_tokens(keys, keep), gather_tokens(cache.values[..., : cache._idx, :], keep),
                     gather_tokens(positions, keep)]),
    }


def host_step_ms(steps=100, runs=5):
    """Milliseconds of host time per decode step in the caches alone: {label: best run}."""
    model = qwen3_8b_bfloat16(hidden_size=256, intermediate_size=256, vocab_size=1000)  # only the caches run
    token = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
    prompt = mx.random.normal((1, 8, BUDGET, 128)).astype(mx.bfloat16)
    out = {}
    for label, cache in (("KVCache", [KVCache() for _ in model.layers]),
                         ("TriAttention", make_prompt_cache(model, 2 * BUDGET, stats="stats/qwen3-8b.safetensors"))):
        for keys in (prompt, token):  # a prompt, then the token that ends it
            for c in cache:
                c.update_and_fetch(keys, keys)
        mx.eval([c.state for c in cache])
        best = []
        for _ in range(runs):
            seconds = 0.0
            for step in range(steps):
                start = time.perf_counter()
                for c in cache:
                    c.update_and_fetch(token, token)
                seconds += time.perf_counter() - start
                if step % 10 == 9:
                    mx.eval([c.state for c in cache])
            mx.eval([c.state for c in cache])
            best.append(seconds / steps * 1e3)
        out[label] = min(best)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--host", action="store_true", help="only the host time per decode step (runs on a CPU)")
    args = parser.parse_args()
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    if args.host:
        out = {"ms_per_step_36_layers": host_step_ms(), "device": str(mx.default_device())}
        print(json.dumps(out))
        (folder / "decode-host-step.json").write_text(json.dumps(out, indent=1))
        return
    model = qwen3_8b_4bit()

    def full():
        return [KVCache() for _ in model.layers]

    def tri():
        return make_prompt_cache(model, BUDGET, stats="stats/qwen3-8b.safetensors")

    for make in (full, tri):  # compile every kernel first, a round included
        cache = make()
        y, _ = time_to_first_token(model, cache, prompt_tokens(2 * BUDGET + 808), 2048)
        for _ in range(300):
            y = model(y, cache=cache)[:, -1:].argmax(-1)
            mx.async_eval(y)
        mx.eval(y)
    ceiling, compressed = full(), tri()
    y_ceiling, _ = time_to_first_token(model, ceiling, prompt_tokens(BUDGET), 2048)
    y, _ = time_to_first_token(model, compressed, prompt_tokens(PROMPT), 2048)
    rates = rates_by_label(decode_in_turns(model, {"ceiling": (ceiling, y_ceiling, True),
                                                   "tri": (compressed, y, False)}, 128, 9))
    out = {"turns": {k: float(np.median(v)) for k, v in rates.items()}}
    out["turns_ratio"] = out["turns"]["tri"] / out["turns"]["ceiling"]
    plain, steps, builds = round_steps(model, compressed, y, 6)
    out.update(step_s_median=plain, round_step_s=steps, round_build_s=builds)
    out["piece_s"] = round_pieces(compressed[0])
    print(json.dumps(out), flush=True)
    (folder / "decode-round-profile.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
