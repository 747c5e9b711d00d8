"""Loading models and stats from what a user types: a folder, a hub repo id, a .gguf file."""

import os
from pathlib import Path

import mlx_lm

from ._data import data_dir
from .gguf import gguf_model_dir
from .stats import StatsError, load_stats

STATS_DIR = data_dir("triattn_mlx.shipped_stats", "stats")  # shipped stats (stats/README.md)


def stats_dirs():
    """Where `--stats auto` looks: TRIATTN_STATS_DIR (os.pathsep-separated folders of the
    user's own stats files) first, then the shipped stats."""
    extra = [Path(p) for p in os.environ.get("TRIATTN_STATS_DIR", "").split(os.pathsep) if p]
    return [*extra, STATS_DIR]


def _looks_local(spec):
    return spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors")) or Path(spec).exists()


def model_location(spec):
    """What mlx-lm can open for what a user typed: a folder or a repo id as they are, a
    .gguf file (llama, qwen2, qwen3, gemma3) as its converted folder (made once, cached).
    A local-looking path that does not exist is a clear error."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if _looks_local(spec) and not path.exists():
        raise FileNotFoundError(f"model not found: {spec} (expected an mlx-lm model folder, "
                                "a Hugging Face repo id, or a .gguf file)")
    if path.suffix == ".gguf":
        return str(gguf_model_dir(path))
    return str(path) if path.exists() else spec


def load(path_or_repo, **kwargs):
    """mlx_lm.load, plus .gguf files (converted once into a cache)."""
    return mlx_lm.load(model_location(path_or_repo), **kwargs)


def shipped_stats(model, folders=None):
    """Shipped (or TRIATTN_STATS_DIR) stats matching the model's attention geometry, or None."""
    for folder in stats_dirs() if folders is None else folders:
        for path in sorted(Path(folder).glob("*.safetensors")):
            try:
                return load_stats(path, model)
            except StatsError:
                continue
    return None


def resolve_stats(spec, model):
    """Stats from a file, a Hugging Face repo id ('org/name' or 'org/name/file'), or
    'auto' (shipped stats matching the model; None when there are none)."""
    if spec == "auto":
        return shipped_stats(model)
    path = Path(spec).expanduser()
    if _looks_local(spec):
        return load_stats(path, model)
    from huggingface_hub import snapshot_download

    parts = spec.split("/")
    repo, pattern = "/".join(parts[:2]), ("/".join(parts[2:]) or "*.safetensors")
    try:
        folder = Path(snapshot_download(repo, allow_patterns=[pattern]))
    except Exception as e:
        raise StatsError(f"cannot fetch stats from the Hugging Face repo '{repo}': {e}") from None
    errors = []
    for candidate in sorted(folder.glob(pattern if parts[2:] else "**/*.safetensors")):
        try:
            return load_stats(candidate, model)
        except StatsError as e:
            errors.append(str(e))
    raise StatsError(f"no stats in '{spec}' match this model" + (f": {errors[0]}" if errors else ""))
