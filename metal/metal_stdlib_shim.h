// Not a kernel source: a stand-in for what MLX compiles before a custom kernel's source
// (metal::utils(): <metal_stdlib>, `using namespace metal`, MLX's bfloat16_t/float16_t
// typedefs), so that clang can syntax-check the Metal source MLX generates on a machine
// without Apple's Metal compiler (triattn_mlx/msl_check.py). It declares the subset of the
// Metal Shading Language that kernels here may use, with Metal's spellings and types;
// anything it does not declare fails the check, so a builtin used for the first time must
// be added here from Apple's MSL specification, not guessed.
//
// Checked with: clang++ -std=c++14 --target=arm64-apple-macos13 -nostdinc -nostdinc++
// -fno-exceptions -fno-rtti (MSL 3 is C++14-based; Apple GPUs share arm64's data model).
// Address spaces are clang address spaces, so mixing them (a device pointer passed where
// a thread pointer is expected, a constant pointer cast to a device one) is an error, as
// in Metal. Declarations only: nothing here is ever run.
#pragma once

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))  // variables: msl_check makes them static
#define thread  // Metal's default address space for locals and unqualified pointers

namespace metal {

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef unsigned long size_t;
typedef long ptrdiff_t;

typedef _Float16 half;  // arithmetic in half, implicit conversions to and from float

// bfloat: a 2-byte floating type distinct from half that converts to and from float
// (clang 14 has no arithmetic __bf16 on this target: __fp16 stands in).
typedef __fp16 bfloat;

#define METAL_SHIM_VECTORS(T)                             \
  typedef T T##2 __attribute__((ext_vector_type(2)));     \
  typedef T T##3 __attribute__((ext_vector_type(3)));     \
  typedef T T##4 __attribute__((ext_vector_type(4)));
METAL_SHIM_VECTORS(char)
METAL_SHIM_VECTORS(uchar)
METAL_SHIM_VECTORS(short)
METAL_SHIM_VECTORS(ushort)
METAL_SHIM_VECTORS(int)
METAL_SHIM_VECTORS(uint)
METAL_SHIM_VECTORS(long)
METAL_SHIM_VECTORS(ulong)
METAL_SHIM_VECTORS(half)
METAL_SHIM_VECTORS(bfloat)
METAL_SHIM_VECTORS(float)
#undef METAL_SHIM_VECTORS  // (no bool vectors: clang 14 has none)

// Reinterprets the bits of a value as another type of the same size.
template <typename To, typename From>
To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type: source and destination sizes differ");
  return __builtin_bit_cast(To, x);
}

// Math: overloads for float and half, scalar and vector (an int argument is ambiguous).
#define METAL_SHIM_UNARY(f)                                                        \
  float f(float); float2 f(float2); float3 f(float3); float4 f(float4);            \
  half f(half); half2 f(half2); half3 f(half3); half4 f(half4);
#define METAL_SHIM_BINARY(f)                                                       \
  float f(float, float); float2 f(float2, float2); float4 f(float4, float4);       \
  half f(half, half); half2 f(half2, half2); half4 f(half4, half4);
METAL_SHIM_UNARY(sqrt) METAL_SHIM_UNARY(rsqrt) METAL_SHIM_UNARY(fabs) METAL_SHIM_UNARY(exp)
METAL_SHIM_UNARY(exp2) METAL_SHIM_UNARY(log) METAL_SHIM_UNARY(log2) METAL_SHIM_UNARY(sin)
METAL_SHIM_UNARY(cos) METAL_SHIM_UNARY(tanh) METAL_SHIM_UNARY(floor) METAL_SHIM_UNARY(ceil)
METAL_SHIM_UNARY(round) METAL_SHIM_UNARY(trunc)
METAL_SHIM_BINARY(pow) METAL_SHIM_BINARY(fmin) METAL_SHIM_BINARY(fmax) METAL_SHIM_BINARY(atan2)
float fma(float, float, float); half fma(half, half, half);
bool isnan(float); bool isnan(half); bool isinf(float); bool isinf(half);
template <typename T> T abs(T);
template <typename T> T min(T, T);
template <typename T> T max(T, T);
template <typename T> T clamp(T, T, T);
template <typename T> T select(T, T, bool);
namespace fast { METAL_SHIM_UNARY(sqrt) METAL_SHIM_UNARY(rsqrt) METAL_SHIM_UNARY(exp) METAL_SHIM_UNARY(exp2) }
namespace precise { METAL_SHIM_UNARY(sqrt) METAL_SHIM_UNARY(rsqrt) METAL_SHIM_UNARY(exp) METAL_SHIM_UNARY(exp2) }
#undef METAL_SHIM_UNARY
#undef METAL_SHIM_BINARY

// Synchronization.
enum class mem_flags : uint {
  mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

// SIMD-group functions (a simdgroup is 32 threads on Apple GPUs).
template <typename T> T simd_shuffle(T data, ushort simd_lane_id);
template <typename T> T simd_shuffle_xor(T data, ushort mask);
template <typename T> T simd_shuffle_down(T data, ushort delta);
template <typename T> T simd_shuffle_up(T data, ushort delta);
template <typename T> T simd_broadcast(T data, ushort broadcast_lane_id);
template <typename T> T simd_sum(T data);
template <typename T> T simd_max(T data);
template <typename T> T simd_min(T data);
template <typename T> T simd_prefix_inclusive_sum(T data);
template <typename T> T simd_prefix_exclusive_sum(T data);

}  // namespace metal

using namespace metal;  // as MLX's preamble does (bf16.h)

typedef half float16_t;  // MLX's names for the kernel's input types (utils.h, bf16.h)
typedef bfloat bfloat16_t;

#pragma GCC poison double  // Metal has no double
