"""GGUF files -> mlx-lm folders (triattn_mlx.gguf), without downloads: the header reader
against the gguf package's GGUFReader, every block type against the gguf package's
dequantization, each architecture from a synthetic file written as llama.cpp writes it (the
converted folder gives the original model's logits), tokenizers, and the error lines."""

import json
import os
import subprocess
import sys

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf_helpers import mlx_dequantized, random_blocks, sentencepiece_reference, sentencepiece_vocab, write_model_gguf
from mlx.utils import tree_flatten

from triattn_mlx.gguf import SUPPORTED_ARCHITECTURES, convert_gguf, gguf_model_dir
from triattn_mlx.gguf_format import GGUFTensor, affine_codes, dequantize, pack, read_gguf, requantize

AFFINE_BITS = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.Q4_K: 4, T.Q5_K: 5}
NOT_AFFINE = [T.Q6_K, T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS]


def random_tensor(kind, rows=16, cols=512, seed=0):
    return GGUFTensor("w", kind, (rows, cols), random_blocks(kind, rows, cols, seed))


# ---------------------------------------------------------------------------- the file format

def write_every_kind_of_value(path):
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -5)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -300)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -70000)
    writer.add_uint64("t.u64", 2**40)
    writer.add_int64("t.i64", -(2**40))
    writer.add_float32("t.f32", 0.25)
    writer.add_float64("t.f64", 1e-300)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_array("t.strings", ["a", "", "日本語", "  "])
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, -1.5])
    writer.add_tensor("f32", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("f16", np.arange(64, dtype=np.float16).reshape(2, 32))
    writer.add_tensor("vector", np.ones(7, np.float32))
    for kind in (T.Q8_0, T.Q4_K, T.Q6_K):
        writer.add_tensor(kind.name, random_blocks(kind, 4, 256), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_read_gguf_matches_gguf_reader(tmp_path):
    path = tmp_path / "values.gguf"
    write_every_kind_of_value(path)
    meta, tensors = read_gguf(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert set(meta) == set(fields)
    for key, field in fields.items():
        expected = field.contents()
        if isinstance(meta[key], np.ndarray):
            np.testing.assert_array_equal(meta[key], expected, err_msg=key)
        else:
            assert meta[key] == expected, key
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(tensors, reader.tensors):
        assert ours.kind == theirs.tensor_type
        assert ours.shape == tuple(int(d) for d in reversed(theirs.shape))
        raw = np.asarray(theirs.data).view(np.uint8).ravel()
        np.testing.assert_array_equal(np.asarray(ours.data).ravel(), raw)


def reference_pack(q, bits):
    """MLX's packing, one bit at a time: code i holds bits [i * bits, (i + 1) * bits)."""
    stream = np.unpackbits(q[..., None], axis=-1, bitorder="little")[..., :bits]
    return np.packbits(stream.reshape(q.shape[0], -1), axis=-1, bitorder="little").view(np.uint32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_layout(bits):
    q = np.random.default_rng(bits).integers(0, 2**bits, (5, 128), dtype=np.uint8)
    packed = pack(q, bits)
    np.testing.assert_array_equal(packed, reference_pack(q, bits))
    ones, zeros = mx.ones((5, 4), mx.float32), mx.zeros((5, 4), mx.float32)
    np.testing.assert_array_equal(mlx_dequantized((mx.array(packed), ones, zeros), bits), q)


@pytest.mark.parametrize("kind", AFFINE_BITS)
def test_affine_block_types_are_repacked_without_changing_a_value(kind):
    tensor = random_tensor(kind)
    exact = dequantize(tensor)  # the gguf package's (llama.cpp's) dequantization
    q, scales, biases, bits = affine_codes(tensor)
    assert bits == AFFINE_BITS[kind] and q.max() < 2**bits
    np.testing.assert_array_equal(np.repeat(scales, 32, 1) * q + np.repeat(biases, 32, 1), exact)
    # as converted: MLX's layout with float16 scales and biases. The GGUF's own d and m are
    # float16, so only the K-quants' products d * sc and dmin * m round (2^-11 relative).
    got = mlx_dequantized((mx.array(pack(q, bits)), mx.array(scales.astype(np.float16)),
                           mx.array(biases.astype(np.float16))), bits)
    error = np.abs(got - exact).max()
    print(f"{kind.name}: max abs error {error:.3g} (max |w| {np.abs(exact).max():.3g})")
    if kind in (T.Q4_K, T.Q5_K):
        assert error <= 2**-11 * (np.abs(scales).max() * (2**bits - 1) + np.abs(biases).max())
    else:
        assert error == 0


@pytest.mark.parametrize("kind", NOT_AFFINE)
def test_other_block_types_are_requantized_to_8_bit_within_half_a_step(kind):
    exact = dequantize(random_tensor(kind))
    w, scales, biases, error = requantize(exact)
    got = mlx_dequantized((w, scales, biases), 8)
    groups = exact.reshape(exact.shape[0], -1, 32)
    step = (groups.max(-1) - groups.min(-1)) / 255
    # half a step of rounding; the float16 bias (the group's minimum) and scale shift the
    # range by 2^-11 relative at most
    bound = 0.5 * step * (1 + 2**-10) + 2**-10 * np.abs(groups).max(-1)
    assert (np.abs(got - exact).reshape(groups.shape) <= bound[..., None]).all()
    assert error == pytest.approx(np.abs(got - exact).max(), rel=1e-6)
    print(f"{kind.name}: max abs error {error:.3g}, {error / np.abs(exact).max():.2%} of max |w|")


def test_q4_0_q4_1_q8_0_are_converted_as_mx_load_reads_them(tmp_path):
    path = tmp_path / "legacy.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for kind in (T.Q4_0, T.Q4_1, T.Q8_0):
        writer.add_tensor(f"{kind.name}.weight", random_blocks(kind, 8, 256, seed=int(kind)), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    theirs = mx.load(str(path))
    for tensor in read_gguf(path)[1]:
        q, scales, biases, bits = affine_codes(tensor)
        name = tensor.name.removesuffix(".weight")
        np.testing.assert_array_equal(pack(q, bits), np.array(theirs[f"{name}.weight"]))
        assert theirs[f"{name}.scales"].dtype == mx.float16
        np.testing.assert_array_equal(scales.astype(np.float16), np.array(theirs[f"{name}.scales"]))
        np.testing.assert_array_equal(biases.astype(np.float16), np.array(theirs[f"{name}.biases"]))


# ---------------------------------------------------------------------------- architectures

def logits(model, n=37):
    tokens = mx.array([[(7 * i + 3) % 200 + 1 for i in range(n)]])
    return np.array(model(tokens).astype(mx.float32))


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_each_architecture_converts_to_the_same_model(arch, tmp_path):
    model, config = write_model_gguf(tmp_path / f"{arch}.gguf", arch)
    folder = convert_gguf(tmp_path / f"{arch}.gguf", tmp_path / arch, dtype="float32")
    converted, _ = mlx_lm.load(str(folder))
    written = json.loads((folder / "config.json").read_text())
    for key in ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rope_theta", "tie_word_embeddings", "sliding_window", "sliding_window_pattern",
                "query_pre_attn_scalar", "rope_local_base_freq", "rope_scaling"):
        assert written.get(key) == config.get(key), key
    assert set(dict(tree_flatten(converted.parameters()))) == set(dict(tree_flatten(model.parameters())))
    np.testing.assert_allclose(logits(converted), logits(model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, kind", [("llama", T.Q4_0), ("qwen2", T.Q5_0), ("qwen3", T.Q5_1),
                                        ("gemma3", T.Q8_0), ("llama", T.Q4_1)])
def test_quantized_files_keep_their_codes(arch, kind, tmp_path, capfd):
    path = tmp_path / "model.gguf"
    write_model_gguf(path, arch, kind)
    capfd.readouterr()
    quantized, _ = mlx_lm.load(str(convert_gguf(path, tmp_path / "q")))
    notice = capfd.readouterr().err.strip().splitlines()
    dense, _ = mlx_lm.load(str(convert_gguf(path, tmp_path / "f", dtype="float32")))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    layers = {k: v for k, v in config["quantization"].items() if isinstance(v, dict)}
    assert layers and all(v == {"group_size": 32, "bits": AFFINE_BITS[kind]} for v in layers.values())
    assert "model.layers.0.self_attn.q_proj" in layers  # llama: permuted rows moved as whole blocks
    assert len(notice) == 1 and notice[0].startswith("[triattn] model.gguf: ")
    assert f"{len(layers)} {kind.name} as {AFFINE_BITS[kind]}-bit affine" in notice[0]
    assert "F32 kept as f32" in notice[0]
    weights, dense_weights = dict(tree_flatten(quantized.parameters())), dict(tree_flatten(dense.parameters()))
    for module, settings in layers.items():
        codes = tuple(weights[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
        np.testing.assert_array_equal(mlx_dequantized(codes, settings["bits"]), dense_weights[f"{module}.weight"])
    # the quantized embedding's float16 output makes the activations float16
    a, b = logits(quantized), logits(dense)
    assert np.abs(a - b).max() <= 3e-2 * np.abs(b).max()


def test_float_dtypes(tmp_path):
    model, _ = write_model_gguf(tmp_path / "m.gguf", "qwen3")
    for dtype, tolerance in (("float16", 1e-2), ("bfloat16", 5e-2)):
        converted, _ = mlx_lm.load(str(convert_gguf(tmp_path / "m.gguf", tmp_path / dtype, dtype=dtype)))
        assert {p.dtype for _, p in tree_flatten(converted.parameters())} == {getattr(mx, dtype)}
        a, b = logits(converted), logits(model)
        assert np.abs(a - b).max() <= tolerance * np.abs(b).max()


def test_llama3_rope_frequencies_become_rope_scaling(tmp_path):
    from triattn_mlx.gguf import _llama3_rope_scaling

    head_dim, theta = 128, 500000.0
    # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for Llama 3.1 (factor 8)
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        smooth = (8192 / wavelen - 1) / (4 - 1)
        factors.append(1 if wavelen < 8192 / 4 else 8 if wavelen > 8192 else 1 / ((1 - smooth) / 8 + smooth))
    scaling = _llama3_rope_scaling(np.array(factors, np.float32), head_dim, theta)
    assert scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    with pytest.raises(ValueError, match="rope_freqs"):
        _llama3_rope_scaling(np.array(factors, np.float32) * 1.1, head_dim, theta)


# ---------------------------------------------------------------------------- tokenizers

def test_byte_level_tokenizer_and_chat_template(tmp_path):
    write_model_gguf(tmp_path / "m.gguf", "qwen2")
    _, tokenizer = mlx_lm.load(str(convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dtype="float32")))
    text = "the cat in the hat, 12345 héllo 日本語\n\n  x"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_start|>") == [tokenizer.convert_tokens_to_ids("<|im_start|>")]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"


def test_sentencepiece_tokenizer_matches_sentencepiece_and_adds_bos(tmp_path):
    write_model_gguf(tmp_path / "g.gguf", "gemma3")
    meta, _ = read_gguf(tmp_path / "g.gguf")
    reference = sentencepiece_reference(meta)
    _, tokenizer = mlx_lm.load(str(convert_gguf(tmp_path / "g.gguf", tmp_path / "out", dtype="float32")))
    for text in ["the capital", "a   cat  in the hat", "héllo\tworld\n\n", "   leading", "x" * 5]:
        assert tokenizer.encode(text) == [2] + reference.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text
    tokens, _, _ = sentencepiece_vocab()
    assert tokenizer.encode("a   b")[2] == tokens.index("   ")  # a user-defined run of spaces, whole


# ---------------------------------------------------------------------------- errors, cache

def write_unsupported(path, arch="mamba", extra=None):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    for name, x in (extra or {}).items():
        writer.add_tensor(name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    write_unsupported(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=r"GGUF architecture 'mamba' is not supported \(supported: "
                                         r"llama, qwen2, qwen3, gemma3\)"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    env = dict(os.environ, TRIATTN_CACHE=str(tmp_path / "cache"))
    for cli, args in (("generate", ["--prompt", "hi"]),
                      ("calibrate", ["--output", str(tmp_path / "s.safetensors")])):
        command = [sys.executable, "-m", f"triattn_mlx.{cli}", "--model", str(tmp_path / "m.gguf"), *args]
        r = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1] == ("error: GGUF architecture 'mamba' is not supported "
                                                     "(supported: llama, qwen2, qwen3, gemma3)")


def test_unsupported_tensor_type_and_tensor_are_clear_errors(tmp_path):
    path = tmp_path / "m.gguf"
    write_model_gguf(path, "qwen2")
    meta, tensors = read_gguf(path)
    from triattn_mlx.gguf import build_config, mlx_name
    from triattn_mlx.gguf_format import check_tensor_kinds

    build_config(meta, tensors)
    with pytest.raises(ValueError, match=r"GGUF tensor type\(s\) I32 are not supported \(first: x\)"):
        check_tensor_kinds([*tensors, GGUFTensor("x", T.I32, (4,), np.zeros(16, np.uint8))])
    with pytest.raises(ValueError, match="GGUF tensor 'blk.0.ffn_gate_exps.weight' is not part of a qwen2 model"):
        mlx_name("qwen2", "blk.0.ffn_gate_exps.weight")


def test_gguf_model_dir_converts_once_per_file_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("TRIATTN_CACHE", str(tmp_path / "cache"))
    write_model_gguf(tmp_path / "m.gguf", "qwen3")
    first = gguf_model_dir(tmp_path / "m.gguf")
    assert (first / "config.json").is_file() and first.parent == tmp_path / "cache"
    stamp = (first / "config.json").stat().st_mtime_ns
    assert gguf_model_dir(tmp_path / "m.gguf") == first and (first / "config.json").stat().st_mtime_ns == stamp
    assert gguf_model_dir(tmp_path / "m.gguf", dtype="float32") != first
    os.utime(tmp_path / "m.gguf", ns=(1, 1))  # a changed file is converted again
    assert gguf_model_dir(tmp_path / "m.gguf") != first
    assert not list((tmp_path / "cache").glob("*.part"))
    with pytest.raises(ValueError, match="dtype must be"):
        gguf_model_dir(tmp_path / "m.gguf", dtype="int8")
