"""Convert the TriAttention reference code's stats (torch pickles) to this project's format.

    python -m triattn_mlx.convert upstream.pt --config config.json --output stats/name.safetensors

The reference files hold {"metadata": {...}, "stats": {"layerLL_headHH": {"q_mean_real",
"q_mean_imag", "q_abs_mean"}}} as torch tensors. They are read here without torch: an
unpickler that admits only tensor rebuilding and plain containers (what
torch.load(weights_only=True) admits) and reads storages straight from the zip.
The model's config.json (Hugging Face layout) supplies the fields the pickles lack.
"""

import argparse
import collections
import json
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np

from .stats import Stats, StatsError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage, offset, size, stride, *_):
    dtype, data = storage
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(data[offset:], shape=tuple(size),
                                           strides=tuple(s * item for s in stride))
    array = np.array(view)
    if dtype == "BFloat16Storage":  # widen bfloat16 bits to float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


class _StatsUnpickler(pickle.Unpickler):
    def __init__(self, zf, prefix, data):
        super().__init__(__import__("io").BytesIO(data))
        self.zf, self.prefix = zf, prefix

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a stats file")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid
        raw = self.zf.read(f"{self.prefix}/data/{key}")
        return storage_type, np.frombuffer(raw, dtype=_STORAGE_DTYPES[storage_type])


def read_torch_stats(path):
    """The reference file's dict, with tensors as numpy arrays."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            return _StatsUnpickler(zf, pkl[: -len("/data.pkl")], zf.read(pkl)).load()
    except (zipfile.BadZipFile, StopIteration, KeyError, pickle.UnpicklingError, EOFError) as e:
        raise StatsError(f"{path} is not a readable reference stats file: {e}") from None


def config_fields(config):
    """Stats metadata from a Hugging Face config.json dict."""
    text = config.get("text_config", config)
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return {
        "model_name": config.get("_name_or_path") or text.get("model_type", ""),
        "num_layers": text["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_kv_heads": text.get("num_key_value_heads", heads),
        "head_dim": head_dim,
        "rope_style": "traditional" if text.get("rope_traditional") else "half",
        "rope_theta": text.get("rope_theta", 10000.0),
        "rope_scaling": text.get("rope_scaling"),
    }


def convert(path, config, source=""):
    """Stats from a reference file and the model's config dict."""
    raw = read_torch_stats(path)
    meta, per_head = raw.get("metadata", {}), raw.get("stats")
    if not isinstance(per_head, dict):
        raise StatsError(f"{path}: no 'stats' dict in the reference file")
    fields = config_fields(config)
    if meta.get("head_dim") not in (None, fields["head_dim"]):
        raise StatsError(f"{path}: head_dim is {meta['head_dim']} in the file but "
                         f"{fields['head_dim']} in the config")
    if meta.get("rope_style") not in (None, "half"):
        raise StatsError(f"{path}: rope_style {meta['rope_style']!r} is not supported")
    n, h, half = fields["num_layers"], fields["num_attention_heads"], fields["head_dim"] // 2
    q_mean = np.full((n, h, half), np.nan, dtype=np.complex128)
    q_abs = np.full((n, h, half), np.nan)
    for key, s in per_head.items():
        layer, head = (int(x) for x in key.replace("layer", "").split("_head"))
        if layer >= n or head >= h:
            raise StatsError(f"{path}: {key} is outside the config's {n} layers x {h} heads")
        q_mean[layer, head] = s["q_mean_real"] + 1j * s["q_mean_imag"]
        q_abs[layer, head] = s["q_abs_mean"]
    missing = int(np.isnan(q_abs[..., 0]).sum())
    if missing:
        raise StatsError(f"{path}: {missing} of {n * h} (layer, head) pairs have no stats")
    fields.update(tokens_used=meta.get("num_tokens") or meta.get("tokens_used"),
                  source=source or f"converted from TriAttention reference stats {Path(path).name}")
    return Stats(q_mean, q_abs, fields)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert TriAttention reference stats (.pt) to triattn-mlx format")
    parser.add_argument("input", help="reference stats file (.pt)")
    parser.add_argument("--config", required=True, help="the model's config.json")
    parser.add_argument("--output", required=True, help="output .safetensors")
    parser.add_argument("--source", default="", help="provenance note stored in the file")
    args = parser.parse_args(argv)
    try:
        config = json.loads(Path(args.config).read_text())
        stats = convert(args.input, config, args.source)
        stats.save(args.output)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.output}: {stats.metadata['num_layers']} layers x "
          f"{stats.metadata['num_attention_heads']} heads, head_dim {stats.metadata['head_dim']}")


if __name__ == "__main__":
    main()
