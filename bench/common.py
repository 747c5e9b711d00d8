"""Shared plumbing for benchmarks: results folder, JSON, PNG."""

import json
import platform
from pathlib import Path

import mlx.core as mx

RESULTS = Path(__file__).resolve().parent.parent / "results"


def evaluation_texts(tokenizer, n):
    """The benchmarks' long texts, n tokens each, none of them in any calibration text:
    English prose (help topics, from token 20000) and Python source (argparse.py)."""
    import argparse

    from support import prose_text

    return {"prose": tokenizer.encode(prose_text())[20000 : 20000 + n],
            "code": tokenizer.encode(Path(argparse.__file__).read_text())[:n]}


def environment():
    return {"device": str(mx.default_device()), "mlx": mx.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}


def write_json(name, data, folder=RESULTS):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **data}, indent=2))
    print(f"wrote {path}")
    return path


def plot(name, folder=RESULTS):
    """A matplotlib figure to fill; saved as PNG on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    class _Figure:
        def __enter__(self):
            self.fig, self.ax = plt.subplots(figsize=(7, 4.5))
            return self.fig, self.ax

        def __exit__(self, *exc):
            if exc[0] is None:
                folder.mkdir(parents=True, exist_ok=True)
                self.fig.tight_layout()
                self.fig.savefig(folder / f"{name}.png", dpi=110)
                print(f"wrote {folder / f'{name}.png'}")
            plt.close(self.fig)

    return _Figure()
