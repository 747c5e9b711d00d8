"""Helpers for the GGUF tests: small GGUF files written the way llama.cpp's
convert_hf_to_gguf.py writes them, from random-weight mlx-lm models (each architecture's
conversion is tested without downloads), and the slow references they are checked against."""

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter, RopeScalingType, TokenType
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes
from transformers.convert_slow_tokenizer import bytes_to_unicode

from triattn_mlx.gguf import _LAYER_NAMES, _TOP_NAMES

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096)
CONFIGS = {
    "llama": dict(BASE, model_type="llama", head_dim=16, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(BASE, model_type="qwen2", rope_theta=1e6, tie_word_embeddings=True),
    "qwen3": dict(BASE, model_type="qwen3", head_dim=32, rope_theta=1e6, tie_word_embeddings=True),
    # llama.cpp's gemma3: every 6th layer global, local RoPE base 10000, queries / sqrt(head_dim)
    "gemma3": dict(BASE, model_type="gemma3_text", num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32,
                   sliding_window=8, sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=10000.0,
                   tie_word_embeddings=True),
}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# byte offsets of the float16 fields (d, dmin) in one block (ggml-common.h), so that random
# blocks hold sane scales
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82],
              T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0]}


def random_blocks(kind, rows, cols, seed=0):
    """Random raw blocks of a GGUF type: every code pattern, scales of about 1e-3..1e-2.
    -> uint8 [rows, bytes per row]"""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[kind]:
        d = rng.uniform(1e-3, 1e-2, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def byte_level_vocab():
    """A GPT-2-style vocabulary: the 256 byte symbols, a few merges, chat specials."""
    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n", "Ġ a", "e r", "o n"]
    tokens = symbols + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [TokenType.NORMAL] * (len(tokens) - 3) + [TokenType.CONTROL] * 3
    return tokens, types, merges


def sentencepiece_vocab():
    """A gemma-style vocabulary: specials, byte fallback, pieces with scores, runs of spaces."""
    pieces = ["▁", "e", "t", "a", "o", "n", "h", "r", "s", "i", "l", "d", "▁t", "he", "▁the", "in", "an",
              "▁a", "er", "on", "c", "p", "▁c", "at", "ap", "ca", "it", "al", "▁ca", "pit", "▁capit", "▁capital"]
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [TokenType.CONTROL] * 3 + [TokenType.UNKNOWN] + [TokenType.CONTROL] * 2
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += ["  ", "   "]  # llama.cpp spells gemma's whitespace runs with real spaces
    types += [TokenType.USER_DEFINED] * 2
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def random_model(arch, vocab_size, seed=0):
    mx.random.seed(seed)
    config = dict(CONFIGS[arch], vocab_size=vocab_size)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if arch == "gemma3":
        model.tie_word_embeddings = True  # what its sanitize sets when lm_head is absent
        model.pop("lm_head")
    # norms away from their init (ones / zeros) so that a missed transform shows
    params = dict(tree_flatten(model.parameters()))
    for name, p in params.items():
        if "norm" in name:
            params[name] = p + 0.1 * mx.random.normal(p.shape)
    model.load_weights(list(params.items()))
    mx.eval(model.parameters())
    return model, config


def llama_cpp_permute(x, n_heads):
    """convert_hf_to_gguf.py's LlamaModel.permute (Q/K rows interleaved for its RoPE)."""
    return x.reshape(n_heads, 2, x.shape[0] // n_heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def gguf_tensor_name(arch, name):
    gguf_part = {v: k for k, v in _LAYER_NAMES[arch].items()}
    top = {v: k for k, v in _TOP_NAMES.items()}
    module, suffix = name.rsplit(".", 1)
    if module in top:
        return f"{top[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{gguf_part[rest]}.{suffix}"


def write_model_gguf(path, arch, kind=T.F32, seed=0, tokenizer=None):
    """A random mlx-lm `arch` model written to `path` as llama.cpp would; matrices stored as
    `kind` (any type gguf can quantize). Returns the model, its config."""
    tokenizer = tokenizer or ("llama" if arch == "gemma3" else "gpt2")
    if tokenizer == "gpt2":
        tokens, types, merges = byte_level_vocab()
    else:
        tokens, types, scores = sentencepiece_vocab()
    model, config = random_model(arch, len(tokens), seed)

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    if "head_dim" in config:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
    if "rope_scaling" in config:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config["rope_scaling"]["factor"])
    writer.add_tokenizer_model(tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if tokenizer == "gpt2":
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_bool("tokenizer.ggml.add_space_prefix", False)

    for name, p in tree_flatten(model.parameters()):
        x = np.array(p.astype(mx.float32))
        gguf_name = gguf_tensor_name(arch, name)
        if arch == "llama" and ".attn_q." in gguf_name:
            x = llama_cpp_permute(x, config["num_attention_heads"])
        if arch == "llama" and ".attn_k." in gguf_name:
            x = llama_cpp_permute(x, config["num_key_value_heads"])
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            x = x + 1.0  # Gemma3RMSNorm's 1 + w, stored
        if x.ndim == 2 and kind != T.F32:
            writer.add_tensor(gguf_name, quantize(x, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, config


def mlx_dequantized(codes_scales_biases, bits):
    """The stored values, computed in float32 (as a float32 model's matmul sees them)."""
    w, scales, biases = codes_scales_biases
    return np.array(mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=32, bits=bits))


def sentencepiece_reference(meta):
    """The same vocabulary as a sentencepiece BPE model (what gemma's tokenizer.model is):
    merges chosen by score, user-defined pieces matched whole, bytes as fallback."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.vocab_size = len(meta["tokenizer.ggml.tokens"])
    for field, key in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        setattr(proto.trainer_spec, field, int(meta.get(f"tokenizer.ggml.{key}_token_id", -1)))
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"],
                                  meta["tokenizer.ggml.token_type"]):
        piece = proto.pieces.add()
        piece.piece = "\u2581" * len(token) if " " in token and not token.strip() else token
        piece.score, piece.type = float(score), int(kind)  # GGUF token types are sentencepiece's
    return SentencePieceProcessor(model_proto=proto.SerializeToString())
