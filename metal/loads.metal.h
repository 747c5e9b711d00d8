// Metal side of the key loads shared by the kernel headers (keys_*.h).
#define FN inline
#define LOAD_U4(p) (*reinterpret_cast<const device uint4*>(p))
FN float bits_as_float(unsigned u) { return as_type<float>(u); }
FN float half_bits_to_float(unsigned h) { return float(as_type<half>((ushort)h)); }
