// Quantized key storage for the score kernel (mx.quantize layout, BITS in {2, 4, 8}):
// keys [B, H_kv, N, D * BITS / 32] uint32, scales and biases [B, H_kv, N, D / GS] of type T.
// Element j is bits (j % (32 / BITS)) * BITS of word j / (32 / BITS), times its group's
// scale, plus its bias: dequantized in registers, never written back.
#define KEY(row, j) \
  ((float)((keys[(row) * (D * BITS / 32) + (j) / (32 / BITS)] >> (((j) % (32 / BITS)) * BITS)) & ((1u << BITS) - 1u)) \
   * (float)scales[(row) * (D / GS) + (j) / GS] + (float)biases[(row) * (D / GS) + (j) / GS])
// `count` consecutive elements of key row `row` from element e into float dst[]
// (consecutive elements share code words, which the compiler loads once).
#define LOAD_RUN(dst, row, e, count)      \
  for (int i_ = 0; i_ < (count); i_++) {  \
    dst[i_] = KEY(row, (e) + i_);         \
  }
