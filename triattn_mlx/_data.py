"""Where data lives: the repository's folders once installed, and the user's cache."""

import os
from importlib.resources import files
from pathlib import Path


def data_dir(package, repo_folder):
    """`repo_folder` (stats/, metal/) installs as package data `package`; in a source tree
    that is not installed, it is read where it stands."""
    try:
        return Path(str(files(package)))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / repo_folder


def cache_dir():
    """Converted models and downloads: TRIATTN_CACHE, else ~/.cache/triattn-mlx."""
    path = Path(os.environ.get("TRIATTN_CACHE") or Path.home() / ".cache" / "triattn-mlx")
    path.mkdir(parents=True, exist_ok=True)
    return path
