"""Decode speed on Apple Silicon, projected from bytes read per token (no Mac here).

    python -m bench.mac_projection [--budget 4096] [--speed results/h100/speed.json]

Batch-1 decode is memory-bound: each step reads every weight once and every cached key
and value once, so tok/s ~= efficiency x bandwidth / (weight bytes + KV bytes held). The
model is Qwen3-8B at 4-bit (mlx-community layout: group 64, float16 scales and biases,
4.5 bits per weight; the embedding table is read one row per step, the untied lm_head in
full), with a float16 KV cache of 36 layers x 8 KV heads x head_dim 128 (147,456 bytes
per token). TriAttention holds budget + divide_length / 2 tokens on average; full KV holds
the whole context.

Check against measurement: the H100 runs of bench.speed give measured tok/s for full KV,
RotatingKVCache and TriAttention; the same byte model with the H100's measured copy
bandwidth gives each run's efficiency (measured / predicted), reported next to the
projection. The projected Mac speedup (full -> TriAttention) assumes both caches decode at
the same efficiency; the H100 rows show how far that holds there.

Memory bandwidths are Apple's published figures (sources in BANDWIDTH_SOURCES).
"""

import argparse
import json
from pathlib import Path

from bench.common import RESULTS, plot, write_json

# GB/s, as Apple announced them (the higher-binned part where two exist)
BANDWIDTH = {"M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M2": 100, "M2 Pro": 200, "M2 Max": 400,
             "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M4": 120, "M4 Pro": 273, "M4 Max": 546}
BANDWIDTH_SOURCES = [
    "M1 Pro / M1 Max 200 / 400 GB/s, M1 68 GB/s: Apple announcement of 18 Oct 2021, as reported at "
    "https://en.trend.az/world/3500298.html and https://www.liambi.com/2021/10/new-apple-silicon-m1-pro-and-m1-max.html",
    "M2 Pro 200 GB/s: https://goodcom.pages.dev/posts/apple-launches-next-generation-m2-pro-and-m2-max-chips ; "
    "M2 Max 400 GB/s: Apple announcement of 17 Jan 2023",
    "M2 / M3 100 GB/s (102.4 nominal), M3 Pro 150 (153.6), M4 120, M4 Pro 273, M4 Max 410 / 546 GB/s: "
    "https://goodnewsapodcast.com/apples-m4-m4-pro-and-m4-max-compared-to-past-generations-and-to-each-other",
    "M3 Max 400 GB/s (16-core CPU part; 300 for the 14-core): "
    "https://macmegasite.com/2024/10/30/m4-max-chip-has-16-core-cpu-40-core-gpu-and-35-increase-in-memory-bandwidth",
]
CONFIG = Path(__file__).resolve().parent.parent / "stats/configs/qwen3-8b.json"
BITS_PER_WEIGHT = 4 + 2 * 16 / 64  # 4-bit codes + float16 scale and bias per group of 64


def model_bytes(config):
    """(weight bytes read per decode step, KV bytes per cached token) for a Qwen3 config."""
    h, L = config["hidden_size"], config["num_hidden_layers"]
    hd = config.get("head_dim", h // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config["intermediate_size"]
    lm_head = config["vocab_size"] * h  # untied in Qwen3-8B; the embedding is read one row per step
    weights = (L * per_layer + lm_head) * BITS_PER_WEIGHT / 8
    return weights, L * 2 * kv * 2  # keys and values, float16


def predicted_tok_s(bandwidth, weights, kv_per_token, tokens_held):
    return bandwidth / (weights + kv_per_token * tokens_held)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--divide-length", type=int, default=128)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--speed", default=str(RESULTS / "h100/speed.json"))
    parser.add_argument("--kernels", default=str(RESULTS / "h100/kernels.json"), help="for the copy bandwidth")
    args = parser.parse_args()
    config = json.loads(CONFIG.read_text())
    weights, kv = model_bytes(config)
    tri_held = args.budget + args.divide_length / 2
    print(f"Qwen3-8B 4-bit: {weights / 1e9:.2f} GB of weights read per step, {kv} KV bytes per token")

    check = []
    speed, kernels = Path(args.speed), Path(args.kernels)
    if speed.exists() and kernels.exists():
        copy = json.loads(kernels.read_text())["copy_GBps"] * 1e9
        # The measured runs' own bytes: their KV as the caches held it, and their weights
        # (runs without model_dtype used a float32 model: float32 scales, 5 bits per weight).
        measured = json.loads(speed.read_text())
        bits = BITS_PER_WEIGHT if measured.get("model_dtype", "float32") != "float32" else 5
        run_weights = weights * bits / BITS_PER_WEIGHT
        for row in measured["rows"]:
            if "error" in row or "per-step" in row["method"]:  # failed on the backend; prune-share run
                continue
            predicted = copy / (run_weights + row["kv_bytes"])
            check.append(dict(N=row["N"], method=row["method"], measured_tok_s=row["decode_tok_s"],
                              predicted_tok_s=predicted, efficiency=row["decode_tok_s"] / predicted))
            print(f"H100 check {row['method']:28s} N={row['N']:6d}: measured {row['decode_tok_s']:6.1f} tok/s, "
                  f"bytes model {predicted:6.1f} -> efficiency {check[-1]['efficiency']:.2f}")

    rows = []
    for chip, bw in BANDWIDTH.items():
        for N in args.lengths:
            full = predicted_tok_s(bw * 1e9, weights, kv, N)
            tri = predicted_tok_s(bw * 1e9, weights, kv, min(N, tri_held))
            rows.append(dict(chip=chip, bandwidth_GBps=bw, N=N, full_tok_s=full, triattention_tok_s=tri,
                             speedup=tri / full, full_kv_GB=kv * N / 1e9,
                             triattention_kv_GB=kv * min(N, tri_held) / 1e9))
    for r in rows:
        if r["N"] == 32768:
            print(f"{r['chip']:7s} ({r['bandwidth_GBps']:5.0f} GB/s) at 32k: full {r['full_tok_s']:5.1f} tok/s, "
                  f"TriAttention {args.budget} {r['triattention_tok_s']:5.1f} tok/s ({r['speedup']:.2f}x)")
    write_json("mac_projection", {"command": "python -m bench.mac_projection", "budget": args.budget,
                                  "weight_bytes": weights, "kv_bytes_per_token": kv,
                                  "bandwidth_sources": BANDWIDTH_SOURCES, "h100_check": check,
                                  "rows": rows}, RESULTS)
    with plot("mac_projection", RESULTS) as (fig, ax):
        for chip in ("M1", "M2 Pro", "M3 Max", "M4 Max"):
            pts = [r for r in rows if r["chip"] == chip]
            line, = ax.plot([r["N"] for r in pts], [r["full_tok_s"] for r in pts], linestyle="--")
            ax.plot([r["N"] for r in pts], [r["triattention_tok_s"] for r in pts], color=line.get_color(),
                    marker="o", label=f"{chip}: TriAttention {args.budget} (dashed: full KV)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("projected decode tok/s (bandwidth bound)")
        ax.set_title("Qwen3-8B 4-bit on Apple Silicon: bytes-per-token projection")
        ax.legend(fontsize=7)


if __name__ == "__main__":
    main()
