"""Where the repository's data folders are once installed."""

from importlib.resources import files
from pathlib import Path


def data_dir(package, repo_folder):
    """`repo_folder` (stats/, metal/) installs as package data `package`; in a source tree
    that is not installed, it is read where it stands."""
    try:
        return Path(str(files(package)))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parent.parent / repo_folder
