"""One process of a distributed run under `mlx.launch` (or, with --single, the one-process
reference): load the model folder as mlx-lm's distributed runs do (sharded_load: tensor
parallelism, or pipeline with --pipeline), compress, generate greedily through mlx-lm's
generate_step, and write what this rank saw to OUT.<rank>.json."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, installed or not

import mlx.core as mx  # noqa: E402
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import load, sharded_load  # noqa: E402

import triattn_mlx  # noqa: F401, E402  (first: OpenBLAS preload)
from triattn_mlx import cache_report, load_stats, make_prompt_cache  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("out")
parser.add_argument("--stats", required=True)
parser.add_argument("--pipeline", action="store_true")
parser.add_argument("--single", action="store_true")
parser.add_argument("--pruning-mode", default="per_head")
parser.add_argument("--prompt-mode", default="whole")
parser.add_argument("--tokens", type=int, default=24)
args = parser.parse_args()

group = mx.distributed.init()
if args.single:
    model, tokenizer = load(args.model)
elif args.pipeline:
    model, tokenizer = sharded_load(args.model, pipeline_group=group)
else:
    model, tokenizer = sharded_load(args.model, tensor_group=group)
cache = make_prompt_cache(model, 96, stats=load_stats(args.stats), window=16, divide_length=16,
                          pruning_mode=args.pruning_mode, prompt_mode=args.prompt_mode, prefill_limit=128)
prompt = mx.array([(7 * i + 3) % 500 for i in range(300)])
tokens = [int(t) for t, _ in generate_step(prompt, model, prompt_cache=cache, max_tokens=args.tokens,
                                           prefill_step_size=64)]
report = cache_report(cache)
with open(f"{args.out}.{0 if args.single else group.rank()}.json", "w") as f:
    json.dump(dict(tokens=tokens, kv_bytes=report["kv_bytes"], prune_rounds=report["prune_rounds"],
                   layers=len(cache), kv_heads=cache[0].keys.shape[1], rank=group.rank(), size=group.size()), f)
