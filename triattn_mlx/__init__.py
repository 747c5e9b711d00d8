"""TriAttention KV-cache compression for mlx-lm."""

from ._blas import preload_openblas

preload_openblas()  # before mlx is first imported (Linux CPU only; see _blas.py)

# ruff: noqa: E402

from .batch import BatchTriAttentionKVCache
from .cache import QuantizedTriAttentionKVCache, TriAttentionKVCache
from .loading import load
from .prompt_cache import cache_report, compress, load_prompt_cache, make_prompt_cache, uncompress
from .scoring import TriAttentionScorer
from .settings import METHODS, PRUNING_MODES, Settings
from .stats import Stats, StatsError, calibrate, describe_model, load_stats, validate_stats
from .taps import install_query_recorders, remove_query_recorders, remove_taps

__version__ = "0.2.0"

__all__ = [
    "Settings", "METHODS", "PRUNING_MODES", "make_prompt_cache", "compress", "uncompress", "load_prompt_cache",
    "cache_report", "load", "TriAttentionKVCache", "QuantizedTriAttentionKVCache", "BatchTriAttentionKVCache",
    "TriAttentionScorer", "Stats", "StatsError", "calibrate", "describe_model", "load_stats", "validate_stats",
    "install_query_recorders", "remove_query_recorders", "remove_taps",
]
