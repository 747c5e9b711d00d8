"""Compressed caches past one process: 2 ranks under mlx.launch (ring backend, 127.0.0.1,
CPU) against one process, tokens per second and KV bytes per rank.

    python -m bench.distributed [--prompt 2048] [--decode-tokens 64] [--budget 512]

A random-weight qwen2 model (mlx-lm's qwen2 has both shard() and pipeline(); hidden 1024,
8 layers, 16 query / 8 KV heads, head_dim 64; weights do not change speed), split by
mlx-lm's sharded_load: tensor parallelism (each rank holds half the heads of every layer)
and pipeline parallelism (each rank holds half the layers). Each run reads a --prompt-token
prompt through mlx-lm's generate_step and decodes --decode-tokens tokens with TriAttention
caches at --budget. On this machine both ranks share the same 2 cores, so the split buys
no compute: what this measures is the cost of the collectives per step, and the memory
each rank holds.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from bench.common import RESULTS, plot, write_json

CONFIG = dict(model_type="qwen2", hidden_size=1024, num_hidden_layers=8, intermediate_size=2816,
              num_attention_heads=16, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e6,
              max_position_embeddings=32768, tie_word_embeddings=True)


def make_model_folder(folder):
    """The random model as an mlx-lm folder (tokenizer: the test model's), with stats."""
    import json as _json

    from mlx_lm.models import qwen2
    from mlx_lm.utils import save_config, save_model

    from support import smollm2_model_dir
    from triattn_mlx import calibrate

    tokenizer_dir = smollm2_model_dir("float32")
    config = dict(CONFIG, vocab_size=_json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"])
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    calibrate(model, [(5 * i + 1) % 1000 for i in range(512)]).save(folder / "stats.safetensors")


def worker(args):
    """One process (or one rank): prefill, then decode, timed; writes OUT.<rank>.json."""
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load, sharded_load

    from triattn_mlx import cache_report, load_stats, make_prompt_cache
    from triattn_mlx.model_info import wait_for_ranks

    group = mx.distributed.init()
    if args.split == "single":
        model, _ = load(args.folder)
    else:
        model, _ = sharded_load(args.folder, **{f"{args.split}_group": group})
    cache = make_prompt_cache(model, args.budget, stats=load_stats(Path(args.folder) / "stats.safetensors"),
                              pruning_mode="per_layer_per_head")
    prompt = mx.array([(7 * i + 3) % 1000 for i in range(args.prompt)])
    start = time.perf_counter()
    steps = generate_step(prompt, model, prompt_cache=cache, max_tokens=args.decode_tokens + 1, prefill_step_size=512)
    next(steps)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    n = sum(1 for _ in steps)
    decode = n / (time.perf_counter() - start)
    wait_for_ranks(group)
    report = cache_report(cache)
    rank = group.rank() if args.split != "single" else 0
    Path(f"{args.out}.{rank}.json").write_text(json.dumps(dict(
        split=args.split, rank=rank, ranks=group.size(), prefill_s=ttft, decode_tok_s=decode,
        kv_bytes=report["kv_bytes"], prune_rounds=report["prune_rounds"], layers=len(cache))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--output", default=str(RESULTS / "cpu"))
    parser.add_argument("--worker", nargs=3, metavar=("SPLIT", "FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.split, args.folder, args.out = args.worker
        return worker(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        make_model_folder(folder)
        for split, ranks in (("single", 1), ("tensor", 2), ("pipeline", 2)):
            out = Path(tmp) / split
            command = [sys.executable, "-m", "bench.distributed", "--prompt", str(args.prompt), "--decode-tokens",
                       str(args.decode_tokens), "--budget", str(args.budget), "--worker", split, str(folder), str(out)]
            if ranks > 1:
                command = ["mlx.launch", "--backend", "ring", "-n", str(ranks), "--", *command]
            result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if result.returncode != 0 or "exited with code" in result.stdout + result.stderr:
                errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]
                rows.append(dict(split=split, ranks=ranks, error=(errors or ["failed"])[-1]))
                print(f"{split} failed: {rows[-1]['error']}", file=sys.stderr, flush=True)
                continue
            for rank in range(ranks):
                rows.append(json.loads(Path(f"{out}.{rank}.json").read_text()))
                print(json.dumps(rows[-1]), flush=True)
    write_json("distributed", {"command": "python -m bench.distributed", "args": vars(args), "config": CONFIG,
                               "rows": rows}, Path(args.output))
    with plot("distributed", Path(args.output)) as (fig, ax):
        rows = [r for r in rows if "error" not in r]
        labels = [f"{r['split']} rank {r['rank']}" for r in rows]
        ax.barh(labels, [r["decode_tok_s"] for r in rows], color="gray")
        for i, r in enumerate(rows):
            ax.text(r["decode_tok_s"], i, f" {r['decode_tok_s']:.1f} tok/s, KV {r['kv_bytes'] / 2**20:.1f} MiB",
                    va="center", fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("decode tok/s (2 CPU cores shared by the ranks)")
        ax.set_title(f"random qwen2 (8 layers, 16/8 heads), prompt {args.prompt}, budget {args.budget}", fontsize=9)


if __name__ == "__main__":
    main()
