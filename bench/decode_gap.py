"""Where TriAttention's decode loses to the ceiling (GPU): python -m bench.decode_gap

Six contestants on the Qwen3-8B-shaped 4-bit model, budget --budget, decoded in turns
(bench.speed.decode_in_turns: --turns rounds of --turn-tokens tokens, the bare ceiling
between every two others; each turn's rate over the bare turns beside it, the median):
- ceiling: an mlx-lm KVCache holding `budget` tokens, on the model as mlx-lm runs it
  (trimmed back after each turn, so it stays at its size);
- ceiling, tapped: the same with a LatestQueries tap on every rope whose copy of the
  queries is dropped in the same layer (what every TriAttention decode step ran through
  before the caches unplugged their taps: taps.QuerySwitch);
- TriAttention, no rounds / taps in: a TriAttention cache holding `budget` tokens whose
  budget is larger (no round is ever due; trimmed back after each turn): the cache's own
  decode path, with its taps unplugged as shipped, and with them kept in;
- TriAttention N / taps in: after a prompt of --length tokens, compressing to `budget` in a
  round every divide_length steps: what users get, taps unplugged, and kept in.
So: tapped / bare is what the taps cost, "no rounds" / bare what the cache's own step
costs, N / "no rounds" what the rounds cost. Writes decode-gap.json.
"""

import argparse
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from bench.common import RESULTS
from bench.kernels import qwen3_8b_4bit
from bench.speed import decode_in_turns, paired_ratios, prompt_tokens, rates_by_label, time_to_first_token, without_taps
from triattn_mlx import make_prompt_cache
from triattn_mlx.model_info import attention_module, model_layers, own_rope
from triattn_mlx.taps import LatestQueries, plug_all


class DroppingKVCache(KVCache):
    """A KVCache that drops its layer's tap's copy of the queries, as TriAttention's decode does."""

    tap = None

    def update_and_fetch(self, keys, values):
        self.tap.latest = None
        return super().update_and_fetch(keys, values)


@contextmanager
def ropes(attentions, chain):
    """The attentions' ropes replaced by `chain` (one per attention) for the block."""
    saved = [a.rope for a in attentions]
    for a, rope in zip(attentions, chain):
        a["rope"] = rope
    try:
        yield
    finally:
        for a, rope in zip(attentions, saved):
            a["rope"] = rope


@contextmanager
def taps_in():
    """TriAttention's taps plugged for the block (its caches' switch is off: they stay in)."""
    plug_all()
    yield


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--turn-tokens", type=int, default=128)
    parser.add_argument("--stats", default="stats/qwen3-8b.safetensors")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    model = qwen3_8b_4bit()
    attentions = [a for a in map(attention_module, model_layers(model)) if a is not None]
    tapped = [LatestQueries(own_rope(a)) for a in attentions]
    dropping = [DroppingKVCache() for _ in model.layers]
    for c, tap in zip(dropping, tapped):
        c.tap = tap
    tri = lambda budget: make_prompt_cache(model, budget=budget, stats=args.stats)  # noqa: E731
    B, N = args.budget, args.length
    # label: (cache, prompt length, trimmed after each turn, the context its prefill and turns run in)
    plan = {"ceiling": ([KVCache() for _ in model.layers], B, True, lambda: without_taps(model)),
            "ceiling, tapped": (dropping, B, True, lambda: ropes(attentions, tapped)),
            "TriAttention, no rounds": (tri(B + 2048), B, True, nullcontext),
            "TriAttention, no rounds, taps in": (tri(B + 2048), B, True, taps_in),
            f"TriAttention {N}": (tri(B), N, False, nullcontext),
            f"TriAttention {N}, taps in": (tri(B), N, False, taps_in)}
    for label in ("TriAttention, no rounds, taps in", f"TriAttention {N}, taps in"):
        for c in plan[label][0]:
            c.switch = None  # its taps are never taken out
    contestants, contexts = {}, {}
    for label, (cache, length, trim, context) in plan.items():
        with context():
            y, _ = time_to_first_token(model, cache, prompt_tokens(length), 2048)
        contestants[label], contexts[label] = (cache, y, trim), context
        mx.clear_cache()
    decode_in_turns(model, contestants, 16, 1, between="ceiling", contexts=contexts)  # warm up every path
    turns = decode_in_turns(model, contestants, args.turn_tokens, args.turns, between="ceiling", contexts=contexts)
    paired = paired_ratios(turns, "ceiling")
    out = {"args": vars(args), "device": str(mx.default_device()), "turns": turns,
           "held_tokens": {label: c[0][0].size() for label, c in contestants.items()},
           "rates": rates_by_label(turns), "paired": paired,
           "paired_median": {k: float(np.median(v)) for k, v in paired.items()},
           "median": {k: float(np.median(v)) for k, v in rates_by_label(turns).items()}}
    print(json.dumps({k: out[k] for k in ("paired_median", "median", "held_tokens")}, indent=1), flush=True)
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "decode-gap.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
