"""TriAttention KV-cache compression for mlx-lm."""

from ._blas import preload_openblas

preload_openblas()  # before mlx is first imported (Linux CPU only; see _blas.py)

# ruff: noqa: E402

from .cache import SharedSelection, TriAttentionKVCache, make_prompt_cache
from .loading import load
from .scoring import TriAttentionScorer
from .stats import (
    Stats,
    StatsError,
    calibrate,
    describe_model,
    install_query_recorders,
    load_stats,
    remove_query_recorders,
    validate_stats,
)

__version__ = "0.1.0"

__all__ = [
    "TriAttentionKVCache", "TriAttentionScorer", "SharedSelection", "make_prompt_cache", "load",
    "Stats", "StatsError", "calibrate", "describe_model", "load_stats", "validate_stats",
    "install_query_recorders", "remove_query_recorders",
]
