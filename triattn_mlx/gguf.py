"""Convert a llama-architecture GGUF file into an ordinary mlx-lm model folder.

MLX reads GGUF tensors directly (`mx.load`), already in its own quantized layout for
Q4_0/Q4_1/Q8_0 (weight uint32 + scales + biases, group size 32). What is left is naming,
the config, the tokenizer, and one quirk: llama.cpp stores attn_q / attn_k rows permuted
for interleaved RoPE, which mlx-lm's llama (half-style RoPE) must undo.
"""

import json
from pathlib import Path

import mlx.core as mx

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GROUP_SIZE = 32  # every MLX-readable GGUF quantization uses blocks of 32


def _scalar(meta, key, default=None):
    if key not in meta:
        if default is None:
            raise ValueError(f"GGUF metadata lacks '{key}': not a llama-architecture file?")
        return default
    value = meta[key]
    return value.item() if isinstance(value, mx.array) else value


def _mlx_name(gguf_name):
    if gguf_name.startswith("token_embd."):
        return "model.embed_tokens." + gguf_name.split(".", 1)[1]
    if gguf_name.startswith("output_norm."):
        return "model.norm." + gguf_name.split(".", 1)[1]
    if gguf_name.startswith("output."):
        return "lm_head." + gguf_name.split(".", 1)[1]
    _, layer, part, suffix = gguf_name.split(".", 3)
    if part not in _LAYER_NAMES:
        raise ValueError(f"Unsupported GGUF tensor '{gguf_name}' (llama architecture only)")
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"


def _unpermute_rows(x, n_heads):
    # llama.cpp interleaves each head's rows (pairs 2f, 2f+1); mlx-lm's RoPE wants halves.
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _tokenizer_json(meta):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if _scalar(meta, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("Only byte-level BPE (gpt2-style) GGUF tokenizers are supported")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    token_types = meta["tokenizer.ggml.token_type"].tolist()
    control = [t for t, kind in zip(tokens, token_types) if kind == 3]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer


def convert_gguf(gguf_path, output_dir, dtype=None):
    """Write an mlx-lm model folder for `gguf_path` into `output_dir` and return its path.

    dtype=None keeps the GGUF quantization; "float32"/"float16"/"bfloat16" dequantizes
    every layer (faster on CPU backends whose quantized matmul is slow).
    """
    gguf_path, output_dir = Path(gguf_path), Path(output_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    weights, meta = mx.load(str(gguf_path), return_metadata=True)
    arch = _scalar(meta, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture '{arch}' is not supported (llama only)")

    n_heads = _scalar(meta, "llama.attention.head_count")
    n_kv_heads = _scalar(meta, "llama.attention.head_count_kv", n_heads)
    hidden = _scalar(meta, "llama.embedding_length")
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": _scalar(meta, "llama.block_count"),
        "intermediate_size": _scalar(meta, "llama.feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": _scalar(meta, "llama.rope.dimension_count", hidden // n_heads),
        "rms_norm_eps": _scalar(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _scalar(meta, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": _scalar(meta, "llama.context_length"),
        "vocab_size": _scalar(meta, "llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": "output.weight" not in weights,
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
    }

    out, quantization = {}, {"group_size": _GROUP_SIZE, "bits": 4}
    for name, x in weights.items():
        new = _mlx_name(name)
        if ".attn_q." in name:
            x = _unpermute_rows(x, n_heads)
        elif ".attn_k." in name:
            x = _unpermute_rows(x, n_kv_heads)
        out[new] = x
    for name in [n for n in out if n.endswith(".scales")]:
        prefix = name[: -len(".scales")]
        w, scales, biases = out[prefix + ".weight"], out[name], out[prefix + ".biases"]
        in_features = scales.shape[-1] * _GROUP_SIZE
        bits = w.shape[-1] * 32 // in_features
        if dtype is not None:
            out[prefix + ".weight"] = mx.dequantize(w, scales, biases, _GROUP_SIZE, bits).astype(
                getattr(mx, dtype)
            )
            del out[name], out[prefix + ".biases"]
        else:
            quantization[prefix] = {"group_size": _GROUP_SIZE, "bits": bits}
    if dtype is not None:
        out = {k: v.astype(getattr(mx, dtype)) for k, v in out.items()}
    else:
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    output_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(output_dir / "model.safetensors"), out, metadata={"format": "mlx"})
    (output_dir / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer_json(meta).save(str(output_dir / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "unk_token": tokens[_scalar(meta, "tokenizer.ggml.unknown_token_id", 0)],
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    (output_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return output_dir
