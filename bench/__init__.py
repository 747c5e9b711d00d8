"""Benchmarks: each module writes JSON and PNG to results/ (python -m bench.<name>)."""

import triattn_mlx  # noqa: F401  (first: preloads OpenBLAS on Linux before mlx loads)
