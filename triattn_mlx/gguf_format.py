"""The GGUF file format, as far as conversion to MLX needs it.

- `read_gguf`: the header (metadata, tensor table) parsed here, tensors memory-mapped. The
  `gguf` package's GGUFReader reads the same (tests compare the two) but builds a numpy view
  per array element: ~25 s of CPU on a 150k-token vocabulary, against ~1 s here.
- `affine_codes` + `pack`: block types that are an affine code over 32 elements (value =
  scale * q + bias: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the 32-element sub-blocks of Q4_K and
  Q5_K) as MLX's quantized layout, without changing a value.
- `dequantize`: any type, by the `gguf` package (llama.cpp's own formulas); `requantize`: to
  8-bit affine, for block types that are not affine over 32 elements (Q6_K, Q2_K and Q3_K
  use 16-element sub-blocks; IQ* use lookup grids).

Why not `mx.load`: as of MLX 0.32.4 it reads Q4_0, Q4_1 and Q8_0 into this same layout
(bit-identical: tests/test_gguf.py), but refuses the whole file when one tensor is Q5_0,
Q5_1, Q3_K, Q5_K or IQ*, turns BF16 into float16, and dequantizes Q4_K wrongly (on
Qwen2.5-Coder-1.5B's Q4_K_M file, an RMS error of 50-80% of the weights' RMS).
"""

import struct
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

GROUP_SIZE = 32  # the 32-element blocks of every repacked GGUF type: one MLX group each


@dataclass
class GGUFTensor:
    name: str
    kind: "gguf.GGMLQuantizationType"  # noqa: F821
    shape: tuple  # numpy order: (rows, columns) for a matrix
    data: np.ndarray  # the raw blocks, uint8 [*shape[:-1], bytes per row]


_VALUE_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


def read_gguf(path):
    """(metadata, tensors) of a GGUF file: scalars as Python values, numeric arrays as numpy
    arrays, string arrays as lists; tensors memory-mapped, not read."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    data = np.memmap(path, np.uint8, mode="r")
    buf = memoryview(data)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                         "big-endian files are not)")
    pos = 24

    def string(pos):
        (n,) = struct.unpack_from("<Q", buf, pos)
        return str(buf[pos + 8: pos + 8 + n], "utf-8", errors="replace"), pos + 8 + n

    def value(kind, pos):
        if kind == _STRING:
            return string(pos)
        if kind == _ARRAY:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _VALUE_DTYPES:
                dtype = np.dtype(_VALUE_DTYPES[item])
                return np.frombuffer(buf, dtype, count, pos).copy(), pos + count * dtype.itemsize
            items = []
            for _ in range(count):
                v, pos = value(item, pos)
                items.append(v)
            return items, pos
        dtype = np.dtype(_VALUE_DTYPES[kind])
        return np.frombuffer(buf, dtype, 1, pos)[0].item(), pos + dtype.itemsize

    meta = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = value(kind, pos + 4)

    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, dims, kind, offset))
    alignment = int(meta.get("general.alignment", 32))
    start = -(-pos // alignment) * alignment

    tensors = []
    for name, dims, kind, offset in infos:
        try:
            kind = GGMLQuantizationType(kind)
        except ValueError:
            raise ValueError(f"{path}: tensor '{name}' has GGML type {kind}, unknown to the "
                             "installed gguf package (pip install -U gguf)") from None
        block_size, type_size = GGML_QUANT_SIZES[kind]
        shape = tuple(int(d) for d in reversed(dims))
        row_bytes = shape[-1] // block_size * type_size
        n_bytes = row_bytes * int(np.prod(shape[:-1], dtype=np.int64))
        raw = data[start + offset: start + offset + n_bytes].reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensor(name, kind, shape, raw))
    return meta, tensors


def _f16(x):
    return x.view(np.float16).astype(np.float32)


def _nibbles(qs):
    # qs: uint8 [..., 16] -> [..., 32]: low nibbles are elements 0-15, high nibbles 16-31
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(scales):
    # The 6-bit scale and min of each of the 8 sub-blocks of a Q4_K/Q5_K super-block,
    # packed in 12 bytes: [n, 12] -> ([n, 8], [n, 8])
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _fifth_bit(qh, n_blocks):
    # qh: uint8 [n, 4] = one little-endian uint32 per 32 elements; bit j is element j's bit 4
    return np.unpackbits(qh, axis=-1, bitorder="little").reshape(n_blocks, 32) << 4


# Each decoder: raw blocks uint8 [n, type_size] -> (q uint8 [n, block], scale, bias [n, block/32]),
# such that value = scale * q + bias per 32 elements (the formulas of ggml-quants.c).
def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), d, -8 * d


def _q4_1(b):
    return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 6:]) | _fifth_bit(b[:, 2:6], len(b)), d, -16 * d


def _q5_1(b):
    return _nibbles(b[:, 8:]) | _fifth_bit(b[:, 4:8], len(b)), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q8_0(b):
    d = _f16(b[:, :2])
    return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _k_quant(b, bits):
    # Q4_K / Q5_K super-block of 256: d, dmin, 8 (scale, min) pairs, then the codes; each
    # 32-element sub-block is scale*q - min: value = (d * sc) * q - (dmin * m)
    n = len(b)
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32)
    if bits == 5:
        qh = b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = q | ((qh & 1) << 4)
    return q.reshape(n, 256), d * sc, -(dmin * mn)


def _affine_decoders():
    from gguf import GGMLQuantizationType as T

    return {T.Q4_0: (4, _q4_0), T.Q4_1: (4, _q4_1), T.Q5_0: (5, _q5_0), T.Q5_1: (5, _q5_1),
            T.Q8_0: (8, _q8_0), T.Q4_K: (4, lambda b: _k_quant(b, 4)), T.Q5_K: (5, lambda b: _k_quant(b, 5))}


def affine_codes(tensor):
    """An exactly-affine GGUF tensor as (q uint8 [rows, cols], scales, biases float32
    [rows, cols / 32], bits), or None for a type that is not affine over 32 elements."""
    from gguf import GGML_QUANT_SIZES

    decoder = _affine_decoders().get(tensor.kind)
    if decoder is None:
        return None
    bits, decode = decoder
    _, type_size = GGML_QUANT_SIZES[tensor.kind]
    rows, cols = int(np.prod(tensor.shape[:-1])), tensor.shape[-1]
    q, scale, bias = decode(np.ascontiguousarray(tensor.data).reshape(-1, type_size))
    groups = cols // GROUP_SIZE
    return q.reshape(rows, cols), scale.reshape(rows, groups), bias.reshape(rows, groups), bits


def pack(q, bits):
    """MLX's packing of `bits`-bit codes: a little-endian bit stream in uint32 words.
    q: uint8 [rows, cols] -> uint32 [rows, cols * bits / 32]"""
    rows, cols = q.shape
    out = np.empty((rows, cols * bits // 8), np.uint8)
    shifts = (np.arange(8, dtype=np.uint64) * bits).reshape(1, 1, 8)
    for start in range(0, rows, 4096):  # 8 codes -> one uint64 -> its low `bits` bytes
        chunk = q[start:start + 4096].reshape(-1, cols // 8, 8).astype(np.uint64)
        words = (chunk << shifts).sum(-1, dtype=np.uint64).view(np.uint8).reshape(-1, cols // 8, 8)
        out[start:start + 4096] = words[..., :bits].reshape(-1, cols * bits // 8)
    return out.view(np.uint32)


def dequantize(tensor):
    """The `gguf` package's float32 dequantization of a tensor, in its numpy shape."""
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(np.asarray(tensor.data), tensor.kind).reshape(tensor.shape)


def requantize(values, bits=8):
    """Affine codes (groups of 32, float16 scale and bias) of a dequantized tensor, for the
    block types that are not affine over 32 elements; with the largest change it makes.
    Codes are rounded against the float16 scale and bias they are stored with.
    values: float32 [rows, cols] -> (codes uint32, scales, biases as mx arrays, max abs error)"""
    rows, cols = values.shape
    levels = 2**bits - 1
    codes = np.empty((rows, cols), np.uint8)
    scales = np.empty((rows, cols // GROUP_SIZE), np.float16)
    biases = np.empty_like(scales)
    error = 0.0
    for start in range(0, rows, 4096):
        groups = np.asarray(values[start:start + 4096], np.float32).reshape(-1, cols // GROUP_SIZE, GROUP_SIZE)
        low, high = groups.min(-1), groups.max(-1)
        scale = ((high - low) / levels).astype(np.float16)
        scale[scale == 0] = 1
        bias = low.astype(np.float16)
        s, b = scale.astype(np.float32)[..., None], bias.astype(np.float32)[..., None]
        q = np.clip(np.rint((groups - b) / s), 0, levels)
        error = max(error, float(np.abs(q * s + b - groups).max()))
        codes[start:start + 4096] = q.reshape(-1, cols)
        scales[start:start + 4096], biases[start:start + 4096] = scale, bias
    return mx.array(pack(codes, bits)), mx.array(scales), mx.array(biases), error


def check_tensor_kinds(tensors):
    """Raise ValueError naming the tensors whose type this converter cannot read."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize as gguf_dequantize

    bad = {}
    for kind in {t.kind for t in tensors}:
        _, type_size = GGML_QUANT_SIZES[kind]
        try:
            gguf_dequantize(np.zeros((1, type_size), np.uint8), kind)
        except (NotImplementedError, ValueError):
            bad[kind.name] = next(t.name for t in tensors if t.kind == kind)
    if bad:
        raise ValueError(f"GGUF tensor type(s) {', '.join(sorted(bad))} are not supported (first: "
                         f"{', '.join(bad.values())}); supported: the types the installed gguf "
                         "package dequantizes (F32, F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K, IQ*)")
