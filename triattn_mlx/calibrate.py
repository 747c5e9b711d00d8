"""`python -m triattn_mlx.calibrate`: query centers for a model, written as a stats file.

    python -m triattn_mlx.calibrate --model <model> --output stats/<name>.safetensors \\
        [--text FILE ...] [--num-tokens 4096] [--plot R.png]

Without --text, a built-in corpus (English prose and Python source that ship with Python)
is used: no network needed. Prints how concentrated each head's queries are (the
method's premise): the distribution of per-head mean resultant length R.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from .corpus import default_calibration_text
from .loading import load
from .stats import calibrate


def concentration_report(stats):
    """How tightly each head's pre-RoPE queries sit around their center (R = |E q| / E|q|)."""
    lines = []
    for weighting, label in (("dominant", "R of each head's dominant frequency pair"),
                             ("energy", "R over all pairs, magnitude-weighted")):
        r = stats.head_concentration(weighting)
        r = r[np.isfinite(r)]
        q = np.percentile(r, [0, 10, 50, 90, 100])
        lines += [f"{label} ({r.size} heads):",
                  f"  min {q[0]:.3f}  p10 {q[1]:.3f}  median {q[2]:.3f}  p90 {q[3]:.3f}  max {q[4]:.3f}"
                  f"   R > 0.9: {np.mean(r > 0.9):.1%}   R > 0.95: {np.mean(r > 0.95):.1%}"]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_concentration(stats, path):
    plt = _pyplot()
    r = stats.head_concentration()
    fig, ax = plt.subplots(figsize=(max(5, r.shape[1] * 0.25 + 2), max(4, r.shape[0] * 0.2 + 1)))
    image = ax.imshow(r, aspect="auto", cmap="viridis", vmin=min(0.8, float(np.nanmin(r))), vmax=1)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(f"{Path(str(stats.metadata.get('model_name', ''))).name}\nR of each head's dominant pair",
                 fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_texts(paths):
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"text file not found: {p}")
        texts.append(path.read_text(errors="replace"))
    return "\n\n".join(texts)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Calibrate TriAttention query centers for a model")
    parser.add_argument("--model", required=True, help="mlx-lm model folder, Hugging Face repo id, or .gguf")
    parser.add_argument("--output", required=True, help="stats file to write (.safetensors)")
    parser.add_argument("--text", nargs="+", default=None,
                        help="text files to calibrate on (default: built-in prose + Python source)")
    parser.add_argument("--num-tokens", type=int, default=4096, help="tokens to run (default: 4096)")
    parser.add_argument("--chunk-size", type=int, default=512, help="tokens per forward pass (default: 512)")
    parser.add_argument("--plot", default=None, help="write a layer x head heatmap of R to this PNG")
    args = parser.parse_args(argv)
    try:
        if args.num_tokens < 2 or args.chunk_size < 1:
            raise ValueError("--num-tokens must be >= 2 and --chunk-size >= 1")
        if not args.output.endswith(".safetensors"):
            raise ValueError(f"--output must end in .safetensors, got {args.output}")
        if args.plot:
            _pyplot()  # fail before the long run, not after it
        text = read_texts(args.text) if args.text else default_calibration_text()
        source = ", ".join(args.text) if args.text else "built-in corpus (Python help topics + inspect.py)"
        model, tokenizer = load(args.model)
        tokens = tokenizer.encode(text)[: args.num_tokens]
        if len(tokens) < args.num_tokens:
            print(f"[triattn] the text has only {len(tokens)} tokens (asked for {args.num_tokens})",
                  file=sys.stderr)
        from tqdm import tqdm

        with tqdm(total=len(tokens), unit="tok", desc="calibrating", file=sys.stderr) as bar:
            stats = calibrate(model, tokens, chunk_size=args.chunk_size, source=source,
                              progress=lambda done, total: bar.update(done - bar.n))
        stats.metadata["model_name"] = Path(args.model).name if Path(args.model).exists() else args.model
        stats.save(args.output)
        print(f"wrote {args.output} ({len(tokens)} tokens)")
        print(concentration_report(stats))
        if args.plot:
            plot_concentration(stats, args.plot)
            print(f"wrote {args.plot}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
