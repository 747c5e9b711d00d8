// Plain key storage for the score kernel: keys [B, H_kv, N, D] of type T, KT its kind
// (0 float32, 1 float16, 2 bfloat16). LOAD_RUN reads `count` consecutive elements of key
// row `row` from element e into float dst[] in 16-byte loads (count * sizeof(T) must be a
// multiple of 16, and the row start 16-byte aligned: kernels.py checks both).
#define ELEMS_16B (KT == 0 ? 4 : 8)

// Element i of a 16-byte word holding 4 float32 or 8 float16/bfloat16 values.
FN float unpack_16b(uint4 v, int i, int kt) {
  const int word = kt == 0 ? i : i / 2;
  const unsigned u = word == 0 ? v.x : word == 1 ? v.y : word == 2 ? v.z : v.w;
  if (kt == 0) return bits_as_float(u);
  const unsigned h = (u >> (16 * (i % 2))) & 0xffffu;
  return kt == 2 ? bits_as_float(h << 16) : half_bits_to_float(h);
}

#define LOAD_RUN(dst, row, e, count)                                           \
  for (int q_ = 0; q_ < (count) / ELEMS_16B; q_++) {                           \
    const uint4 v_ = LOAD_U4(keys + (row) * D + (e) + q_ * ELEMS_16B);         \
    for (int i_ = 0; i_ < ELEMS_16B; i_++) {                                   \
      dst[q_ * ELEMS_16B + i_] = unpack_16b(v_, i_, KT);                       \
    }                                                                          \
  }
