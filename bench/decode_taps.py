"""What TriAttention's query taps cost a decode step (GPU): python -m bench.decode_taps

A TriAttention cache puts a tap on every attention's rope (taps.LatestQueries) to see the
prompt's last queries. The model is shared, so the tap stays in the decode path. Four
ceilings (mlx-lm KVCaches holding --budget tokens of the Qwen3-8B-shaped 4-bit model),
decoded in turns (bench.speed.decode_in_turns; the bare one between every two others):
- bare: the model as mlx-lm runs it;
- wrapper: a tap that only calls the rope (the Python call in the path);
- stores: LatestQueries, whose copy of each step's queries nothing takes (what a
  TriAttention cache's decode steps did before they dropped it);
- stores, dropped: LatestQueries, the copy dropped by the cache in the same layer (what
  TriAttention's decode fast path does now).
Each turn's rate over the bare turns beside it (bench.speed.paired_ratios), the median.
Writes decode-taps.json.
"""

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from bench.common import RESULTS
from bench.kernels import qwen3_8b_4bit
from bench.speed import decode_in_turns, paired_ratios, prompt_tokens, rates_by_label, time_to_first_token
from triattn_mlx.model_info import attention_module, model_layers, own_rope
from triattn_mlx.taps import LatestQueries, RopeTap


class Wrapper(RopeTap):
    def on_queries(self, pre_rope, rotated, offset):
        pass


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--turn-tokens", type=int, default=128)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    model = qwen3_8b_4bit()
    attentions = [a for a in map(attention_module, model_layers(model)) if a is not None]
    bare = [own_rope(a) for a in attentions]
    chains = {"bare": bare, "wrapper": [Wrapper(r) for r in bare], "stores": [LatestQueries(r) for r in bare],
              "stores, dropped": [LatestQueries(r) for r in bare]}
    contestants, contexts = {}, {}
    for label, chain in chains.items():
        if label == "stores, dropped":
            cache = [DroppingKVCache() for _ in model.layers]
            for c, tap in zip(cache, chain):
                c.tap = tap
        else:
            cache = [KVCache() for _ in model.layers]
        contexts[label] = lambda chain=chain: ropes(attentions, chain)
        with contexts[label]():
            y, _ = time_to_first_token(model, cache, prompt_tokens(args.budget), 2048)
        contestants[label] = (cache, y, True)
    turns = decode_in_turns(model, contestants, 16, 1, between="bare", contexts=contexts)  # warm up every path
    turns = decode_in_turns(model, contestants, args.turn_tokens, args.turns, between="bare", contexts=contexts)
    paired = paired_ratios(turns, "bare")
    out = {"args": vars(args), "device": str(mx.default_device()),
           "rates": rates_by_label(turns), "paired": paired,
           "paired_median": {k: float(np.median(v)) for k, v in paired.items()},
           "median": {k: float(np.median(v)) for k, v in rates_by_label(turns).items()}}
    print(json.dumps({k: out[k] for k in ("paired_median", "median")}), flush=True)
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "decode-taps.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
