// CUDA side of the key loads shared by the kernel headers (keys_*.h).
#define FN __device__ __forceinline__
#define LOAD_U4(p) (*reinterpret_cast<const uint4*>(p))
FN float bits_as_float(unsigned u) { return __uint_as_float(u); }
FN float half_bits_to_float(unsigned h) { return __half2float(__ushort_as_half((unsigned short)h)); }
