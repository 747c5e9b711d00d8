"""Convert a GGUF file (llama.cpp, LM Studio, Ollama) into an ordinary mlx-lm model folder.

The folder (config.json, model-NNNNN.safetensors, tokenizer.json, tokenizer_config.json)
opens with `mlx_lm.load` exactly like a model from the hub. Per tensor (gguf_format.py):
block types that are affine over 32 elements (Q4_0, Q4_1, Q8_0 as `mx.load` reads them, and
Q5_0, Q5_1, Q4_K, Q5_K) are repacked into MLX's quantized layout without changing a value;
other block types (Q6_K, Q2_K, Q3_K, IQ*) are dequantized by the `gguf` package and
re-quantized to 8-bit affine; with `dtype`, everything is dequantized to that float type.
Per architecture: tensor names, the config, and llama.cpp's conversion quirks undone
(llama stores attn_q/attn_k rows permuted for interleaved RoPE; gemma3 stores norms as
1 + w). Tokenizer: transformers' GGUF tokenizer builders, with the BOS/EOS the file asks
for, and the chat template from the metadata.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from .gguf_format import (
    GROUP_SIZE,
    GGUFTensor,
    affine_codes,
    check_tensor_kinds,
    dequantize,
    pack,
    read_gguf,
    requantize,
)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
CONVERTER_VERSION = 2  # bump when the output for the same file changes (invalidates caches)
_DTYPES = ("float32", "float16", "bfloat16")
_SHARD_BYTES = 2 << 30  # model-NNNNN.safetensors files of about this size (bounds peak memory)


# ---------------------------------------------------------------------------- architectures

# GGUF block tensor -> mlx-lm module, per architecture (llama.cpp's tensor names, gguf-py
# constants.py; mlx-lm's models/<type>.py)
_PROJECTIONS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
}
_LAYER_NAMES = {
    "llama": {**_PROJECTIONS, "ffn_norm": "post_attention_layernorm"},
    "qwen2": {**_PROJECTIONS, "ffn_norm": "post_attention_layernorm"},
    "qwen3": {**_PROJECTIONS, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {**_PROJECTIONS, "post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"},
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SKIPPED = {"rope_freqs"}  # folded into config.json's rope_scaling


def mlx_name(arch, gguf_name):
    """mlx-lm's parameter name for a GGUF tensor name."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES[arch]:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[arch][parts[2]]}.{suffix}"
    raise ValueError(f"GGUF tensor '{gguf_name}' is not part of a {arch} model this converter "
                     f"knows (expected blk.N.{{{','.join(_LAYER_NAMES[arch])}}} and "
                     f"{', '.join(_TOP_NAMES)})")


def unpermute_rows(x, n_heads):
    """Undo llama.cpp's llama Q/K row order (each head's rotary pairs interleaved) so that
    mlx-lm's half-split RoPE applies. x: [rows, ...] (raw blocks, codes or floats alike)."""
    # llama.cpp's permute is reshape(n_heads, 2, half, ...).swapaxes(1, 2); this is its inverse
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _get(meta, key, default=None, *, required=False):
    if key in meta:
        return meta[key]
    if required:
        raise ValueError(f"GGUF metadata lacks '{key}'")
    return default


def _llama3_rope_scaling(rope_freqs, head_dim, theta):
    # Llama 3.1+ GGUFs carry the per-frequency wavelength multipliers (llama.cpp's rope_freqs
    # tensor) instead of the parameters: rebuild them from Meta's usual parameters and check.
    factor, low, high, context = float(rope_freqs.max()), 1.0, 4.0, 8192
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (context / wavelen - low) / (high - low)
    expected = np.where(wavelen < context / high, 1.0,
                        np.where(wavelen > context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(expected, rope_freqs, rtol=1e-3):
        raise ValueError("the GGUF's rope_freqs tensor is not Llama 3's RoPE scaling with the "
                         "usual parameters (low 1, high 4, original context 8192): not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": context}


def build_config(meta, tensors):
    """config.json for mlx-lm from the GGUF metadata (and the tensors present)."""
    arch = _get(meta, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture '{arch}' is not supported (supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    names = {t.name for t in tensors}

    def key(name, default=None, required=False):
        return _get(meta, f"{arch}.{name}", default, required=required)

    n_heads = key("attention.head_count", required=True)
    if not isinstance(n_heads, int):
        raise ValueError(f"per-layer head counts ({arch}.attention.head_count is an array) are not supported")
    hidden = key("embedding_length", required=True)
    head_dim = key("attention.key_length", hidden // n_heads)
    theta = float(key("rope.freq_base", 10000.0))
    context = key("context_length", 4096)
    config = {
        "model_type": _MODEL_TYPES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": key("block_count", required=True),
        "intermediate_size": key("feed_forward_length", required=True),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", required=True)),
        "rope_theta": theta,
        "max_position_embeddings": context,
        "vocab_size": key("vocab_size", len(_get(meta, "tokenizer.ggml.tokens", required=True))),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if head_dim != hidden // n_heads and arch == "qwen2":
        raise ValueError(f"qwen2 with head_dim {head_dim} != hidden / heads is not supported by mlx-lm's qwen2")
    scaling_type = key("rope.scaling.type")
    if scaling_type in ("linear", "yarn"):
        config["rope_scaling"] = {"rope_type": scaling_type, "factor": float(key("rope.scaling.factor", 1.0))}
        if scaling_type == "yarn":
            config["rope_scaling"]["original_max_position_embeddings"] = key(
                "rope.scaling.original_context_length", context)
    elif scaling_type not in (None, "none"):
        raise ValueError(f"GGUF rope scaling '{scaling_type}' is not supported (linear, yarn, llama3)")
    if "rope_freqs.weight" in names:
        freqs = dequantize(next(t for t in tensors if t.name == "rope_freqs.weight")).ravel()
        config["rope_scaling"] = _llama3_rope_scaling(freqs, head_dim, theta)
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    if arch == "gemma3":
        # llama.cpp's gemma3 defaults where the file says nothing: every 6th layer global, local
        # layers at RoPE base 10000, and queries scaled by head_dim^-1/2 except in the 27B (62
        # layers), which uses (hidden / heads)^-1/2 (ref: llama-model.cpp, gemma_pytorch config).
        config["sliding_window"] = key("attention.sliding_window", 512)
        config["sliding_window_pattern"] = key("attention.sliding_window_pattern", 6)
        config["rope_local_base_freq"] = float(key("rope.freq_base_swa", 10000.0))
        big = config["num_hidden_layers"] == 62
        config["query_pre_attn_scalar"] = hidden // n_heads if big else head_dim
        if key("final_logit_softcapping") is not None:
            raise ValueError("gemma3 with final_logit_softcapping is not supported by mlx-lm's gemma3_text")
    eos = [_get(meta, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    config["eos_token_id"] = sorted({e for e in eos if e is not None})
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = meta["tokenizer.ggml.bos_token_id"]
    return arch, config


def _transform(arch, config, tensor, values):
    """llama.cpp's per-tensor changes at conversion, undone. values: raw blocks or floats."""
    if arch == "llama" and tensor.name.startswith("blk.") and ".attn_q." in tensor.name:
        return unpermute_rows(values, config["num_attention_heads"])
    if arch == "llama" and tensor.name.startswith("blk.") and ".attn_k." in tensor.name:
        return unpermute_rows(values, config["num_key_value_heads"])
    if arch == "gemma3" and tensor.name.endswith("norm.weight"):
        return values - 1.0  # stored as 1 + w; mlx-lm's gemma norm applies 1 + w
    return values


# ---------------------------------------------------------------------------- tokenizer

# llama.cpp pre-tokenizers (llama-vocab.cpp) that transformers' table lacks
_EXTRA_SPLITS = {
    # starcoder, smollm, ...: digits one by one, then GPT-2's pattern
    "smollm": [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
    "starcoder": [r"\p{N}", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"],
}


def _respelled(token):
    # transformers' gemma builder spells runs of spaces as U+2581 runs (as its vocabulary does)
    return "\u2581" * len(token) if " " in token and not token.strip() else token


def build_tokenizer(meta):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the GGUF's tokenizer metadata."""
    from tokenizers import AddedToken, Regex, pre_tokenizers, processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    arch = meta["general.architecture"]
    model = _get(meta, "tokenizer.ggml.model", required=True)
    pre = _get(meta, "tokenizer.ggml.pre", "default")
    if model == "gpt2" and pre not in GGUF_PRE_TOKENIZER_SPLITS and pre not in _EXTRA_SPLITS and pre != "default":
        raise ValueError(f"GGUF pre-tokenizer '{pre}' is not supported (supported: default, "
                         f"{', '.join(sorted([*GGUF_PRE_TOKENIZER_SPLITS, *_EXTRA_SPLITS]))})")
    fields = {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
              if f"tokenizer.{key}" in meta}
    fields = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in fields.items()}
    try:
        tokenizer, _ = convert_gguf_tokenizer(arch, fields)
    except ValueError as e:
        raise ValueError(f"GGUF tokenizer: {e}") from None
    tokens, types = fields["tokens"], fields.get("token_type") or []

    if pre in _EXTRA_SPLITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _EXTRA_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if model == "llama":
        # User-defined pieces (type 4) are matched whole, as llama.cpp and sentencepiece do;
        # transformers skips those it respelled (gemma's runs of spaces).
        vocab = tokenizer.get_vocab()
        missing = [_respelled(t) for t, k in zip(tokens, types)
                   if k == 4 and _respelled(t) != t and _respelled(t) in vocab]
        tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in missing])

    def token(kind):
        index = _get(meta, f"tokenizer.ggml.{kind}_token_id")
        return tokens[index] if index is not None and index < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(_get(meta, "tokenizer.ggml.add_bos_token", model == "llama")) and bos is not None
    add_eos = bool(_get(meta, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = {t: tokenizer.token_to_id(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=list(specials.items()))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "unk_token": token("unknown"), "pad_token": token("padding"),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _get(meta, f"{arch}.context_length", 4096),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return tokenizer, {k: v for k, v in config.items() if v is not None}


# ---------------------------------------------------------------------------- conversion

class _ShardWriter:
    """Saves weights as model-NNNNN.safetensors of about _SHARD_BYTES each."""

    def __init__(self, folder):
        self.folder, self.weights, self.size, self.count = folder, {}, 0, 0

    def add(self, name, array):
        self.weights[name] = array
        self.size += array.nbytes
        if self.size >= _SHARD_BYTES:
            self.flush()

    def flush(self):
        if self.weights:
            self.count += 1
            path = self.folder / f"model-{self.count:05d}.safetensors"
            mx.save_safetensors(str(path), self.weights, metadata={"format": "mlx"})
            self.weights, self.size = {}, 0


_FLOAT_TYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16}


def convert_tensor(arch, config, tensor, dtype=None):
    """One GGUF tensor as mlx-lm arrays by suffix ("weight", or "weight", "scales", "biases"),
    and how: ("kept" | "dequantized" | "repacked" | "requantized", bits, max abs error)."""
    if dtype is not None or tensor.kind.name in _FLOAT_TYPES or len(tensor.shape) != 2:
        values = mx.array(_transform(arch, config, tensor, dequantize(tensor)))
        target = getattr(mx, dtype) if dtype else _FLOAT_TYPES.get(tensor.kind.name, mx.float32)
        return {"weight": values.astype(target)}, ("dequantized" if dtype else "kept", None, 0.0)
    # rows are reordered as whole blocks; no other transform touches a quantized matrix
    tensor = GGUFTensor(tensor.name, tensor.kind, tensor.shape, _transform(arch, config, tensor, tensor.data))
    codes = affine_codes(tensor)
    if codes is None:
        w, scales, biases, error = requantize(dequantize(tensor))
        return {"weight": w, "scales": scales, "biases": biases}, ("requantized", 8, error)
    q, scales, biases, bits = codes
    arrays = {"weight": mx.array(pack(q, bits)), "scales": mx.array(scales.astype(np.float16)),
              "biases": mx.array(biases.astype(np.float16))}
    return arrays, ("repacked", bits, 0.0)


def _notice(path, counts, errors, dtype):
    """One line: what was done to each GGUF tensor type."""
    parts = []
    for (kind, how, bits), n in sorted(counts.items(), key=lambda item: -item[1]):
        if how == "dequantized":
            parts.append(f"{n} {kind} as {dtype}")
        elif how == "kept":
            parts.append(f"{n} {kind} kept as {kind.lower()}")
        elif how == "repacked":
            parts.append(f"{n} {kind} as {bits}-bit affine")
        else:
            parts.append(f"{n} {kind} re-quantized to {bits}-bit affine (max abs error {errors[kind]:.2g})")
    return f"[triattn] {Path(path).name}: " + ", ".join(parts)


def convert_gguf(gguf_path, output_dir, dtype=None, quiet=False):
    """Write an mlx-lm model folder for `gguf_path` into `output_dir` and return its path.

    dtype=None keeps the file's quantization (repacked, or re-quantized to 8-bit affine where
    the block type is not affine over 32 elements; one notice line on stderr says which);
    "float32" / "float16" / "bfloat16" dequantizes every tensor (faster on CPU backends whose
    quantized matmul is slow).
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if dtype not in (None, *_DTYPES):
        raise ValueError(f"dtype must be None or one of {', '.join(_DTYPES)}, got {dtype!r}")
    meta, tensors = read_gguf(gguf_path)
    arch, config = build_config(meta, tensors)
    check_tensor_kinds(tensors)
    tensors = [t for t in tensors if t.name.split(".")[0] not in _SKIPPED]
    names = [mlx_name(arch, t.name) for t in tensors]  # every name checked before any work
    tokenizer, tokenizer_config = build_tokenizer(meta)

    output_dir.mkdir(parents=True, exist_ok=True)
    for old in output_dir.glob("model*.safetensors"):
        old.unlink()
    writer, quantization, counts, errors = _ShardWriter(output_dir), {}, {}, {}
    for tensor, name in zip(tensors, names):
        module = name.rsplit(".", 1)[0]
        arrays, (how, bits, error) = convert_tensor(arch, config, tensor, dtype)
        for suffix, array in arrays.items():
            writer.add(name if suffix == "weight" else f"{module}.{suffix}", array)
        if bits is not None:
            quantization[module] = {"group_size": GROUP_SIZE, "bits": bits}
        key = (tensor.kind.name, how, bits)
        counts[key] = counts.get(key, 0) + 1
        errors[tensor.kind.name] = max(errors.get(tensor.kind.name, 0.0), error)
    writer.flush()
    if quantization:
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": 4, **quantization}
        config["quantization_config"] = config["quantization"]
    tokenizer.save(str(output_dir / "tokenizer.json"))
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (output_dir / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the folder complete
    if not quiet:
        print(_notice(gguf_path, counts, errors, dtype), file=sys.stderr)
    return output_dir


def gguf_model_dir(path, dtype=None):
    """The converted mlx-lm folder for a .gguf file, converted once into triattn's cache
    (keyed by the file's path, size and modification time, the dtype and the converter)."""
    from ._data import cache_dir

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if dtype not in (None, *_DTYPES):
        raise ValueError(f"dtype must be None or one of {', '.join(_DTYPES)}, got {dtype!r}")
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}:{CONVERTER_VERSION}"
    folder = cache_dir() / f"gguf-{path.stem}-{dtype or 'quantized'}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.{os.getpid()}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert_gguf(path, tmp, dtype=dtype)
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a concurrent conversion that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
