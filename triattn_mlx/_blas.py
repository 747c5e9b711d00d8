"""Faster CPU matmuls on Linux: route MLX's BLAS calls to the system OpenBLAS.

The mlx-cpu wheel bundles the reference BLAS (~4 GFLOP/s on 2 cores); preloading
libopenblas (Debian: libopenblas0-pthread) before mlx is imported makes its symbols win
(~70-180 GFLOP/s). Nothing happens on macOS (Accelerate), where the library is absent,
when mlx was already imported, or with TRIATTN_NO_OPENBLAS=1. This module must not
import mlx.
"""

import ctypes
import os
import sys


def preload_openblas():
    if sys.platform != "linux" or "mlx.core" in sys.modules or os.environ.get("TRIATTN_NO_OPENBLAS"):
        return False
    try:
        ctypes.CDLL("libopenblas.so.0", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False
