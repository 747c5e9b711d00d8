// The score kernel's CUDA twin run on CPU threads: metal/prologue.cuda + the shared body
// and key headers, one std::thread per lane, warp shuffles through per-warp barriers, group
// memory as a static array, and CPU stand-ins for the 16-byte loads of loads.cuda.h.
// Checks every score against a float64 reference. Built and run by
// tests/test_kernel_emulator.py (g++ -std=c++20 -pthread); exit status 1 on a mismatch.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

struct Shape {
  int d[4];
  int operator[](int i) const { return d[i]; }
};
struct Dim {
  unsigned x, y, z;
};
thread_local Dim threadIdx, blockIdx;
Dim blockDim, gridDim;
constexpr int WARPS = 8;
std::barrier<>* warp_barrier[WARPS];
std::barrier<>* group_barrier;
float exchange[WARPS][32];

float shuffle_xor(float x, int o) {
  const int w = threadIdx.y, l = threadIdx.x;
  exchange[w][l] = x;
  warp_barrier[w]->arrive_and_wait();
  const float other = exchange[w][l ^ o];
  warp_barrier[w]->arrive_and_wait();
  return other;
}
#define __shared__ static
#define __syncthreads() group_barrier->arrive_and_wait()
#define __shfl_xor_sync(mask, x, o) shuffle_xor(x, o)

// loads.cuda.h on the CPU: the same 16-byte loads and bit conversions.
struct uint4 {
  unsigned x, y, z, w;
};
#define FN inline
template <typename P>
uint4 load_u4(const P* p) {
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}
#define LOAD_U4(p) load_u4(p)
FN float bits_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FN float half_bits_to_float(unsigned h) {
  const uint16_t bits = (uint16_t)h;
  _Float16 x;
  std::memcpy(&x, &bits, 2);
  return (float)x;
}

#include "../../metal/keys_plain.h"
template <typename T, int KT, int D, int HALF, int G, int ROWS, int SUB>
void score_plain(const T* keys, const Shape keys_shape, const float* weights, float* scores) {
#include "../../metal/prologue.cuda"
#include "../../metal/triattention_score.body"
}
#undef LOAD_RUN
#include "../../metal/keys_quantized.h"
template <typename T, int D, int HALF, int G, int ROWS, int SUB, int BITS, int GS>
void score_quantized(const unsigned* keys, const Shape keys_shape, const T* scales, const T* biases,
                     const float* weights, float* scores) {
#include "../../metal/prologue.cuda"
#include "../../metal/triattention_score.body"
}

// Launch as kernels._launch does: (32, WARPS) groups, keys_per_warp keys per warp.
template <typename F>
void launch(int N, int BH, int keys_per_warp, F kernel) {
  const int warps_y = (N + keys_per_warp * WARPS - 1) / (keys_per_warp * WARPS) * WARPS;
  blockDim = {32, WARPS, 1};
  gridDim = {1, (unsigned)(warps_y / WARPS), (unsigned)BH};
  for (unsigned bz = 0; bz < gridDim.z; bz++) {
    for (unsigned by = 0; by < gridDim.y; by++) {
      std::barrier<> group(32 * WARPS);
      group_barrier = &group;
      for (auto& w : warp_barrier) w = new std::barrier<>(32);
      std::vector<std::thread> lanes;
      for (unsigned ty = 0; ty < WARPS; ty++) {
        for (unsigned tx = 0; tx < 32; tx++) {
          lanes.emplace_back([=] {
            threadIdx = {tx, ty, 0};
            blockIdx = {0, by, bz};
            kernel();
          });
        }
      }
      for (auto& t : lanes) t.join();
      for (auto& w : warp_barrier) delete w;
    }
  }
}

// Plain keys stored as float32, float16 or bfloat16 (KT 0, 1, 2), rounded in `dense` too.
template <int KT>
auto store(std::vector<float>& dense) {
  using S = std::conditional_t<KT == 0, float, std::conditional_t<KT == 1, _Float16, uint16_t>>;
  std::vector<S> stored(dense.size());
  for (size_t i = 0; i < dense.size(); i++) {
    if constexpr (KT == 2) {
      unsigned bits;
      std::memcpy(&bits, &dense[i], 4);
      stored[i] = (uint16_t)(bits >> 16);
      bits = (bits >> 16) << 16;
      std::memcpy(&dense[i], &bits, 4);
    } else {
      stored[i] = (S)dense[i];
      dense[i] = (float)stored[i];
    }
  }
  return stored;
}

// BITS 0: plain keys of kind KT; else mx.quantize layout with group size GS.
template <int D, int HALF, int G, int ROWS, int SUB, int BITS, int GS, int KT = 0>
bool run_case(int N, int keys_per_warp, unsigned seed) {
  const int B = 2, H = 2;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> dense((size_t)B * H * N * D), weights(H * G * 3 * D / 2), scores(B * H * G * N, NAN);
  for (auto& x : weights) x = normal(rng);
  const Shape shape{{B, H, N, D}};
  if constexpr (BITS == 0) {
    for (auto& x : dense) x = normal(rng);
    const auto keys = store<KT>(dense);
    using S = typename std::remove_cvref_t<decltype(keys)>::value_type;
    launch(N, B * H, keys_per_warp, [&] {
      score_plain<S, KT, D, HALF, G, ROWS, SUB>(keys.data(), shape, weights.data(), scores.data());
    });
  } else {
    const int words = D * BITS / 32, groups = D / GS;
    std::vector<unsigned> codes((size_t)B * H * N * words, 0);
    std::vector<float> scale((size_t)B * H * N * groups), bias(scale.size());
    for (size_t i = 0; i < scale.size(); i++) {
      scale[i] = 0.05f + (rng() % 100) / 100.0f;
      bias[i] = normal(rng);
    }
    for (size_t row = 0; row < (size_t)B * H * N; row++) {
      for (int j = 0; j < D; j++) {
        const unsigned q = rng() % (1u << BITS);
        codes[row * words + j / (32 / BITS)] |= q << ((j % (32 / BITS)) * BITS);
        dense[row * D + j] = q * scale[row * groups + j / GS] + bias[row * groups + j / GS];
      }
    }
    launch(N, B * H, keys_per_warp, [&] {
      score_quantized<float, D, HALF, G, ROWS, SUB, BITS, GS>(codes.data(), shape, scale.data(), bias.data(),
                                                              weights.data(), scores.data());
    });
  }
  double worst = 0, largest = 0;
  for (int bh = 0; bh < B * H; bh++) {
    for (int g = 0; g < G; g++) {
      const float* w = &weights[((bh % H) * G + g) * 3 * D / 2];
      for (int n = 0; n < N; n++) {
        const float* k = &dense[((size_t)bh * N + n) * D];
        double ref = 0;
        for (int f = 0; f < D / 2; f++) {
          const double re = k[HALF ? f : 2 * f], im = k[HALF ? f + D / 2 : 2 * f + 1];
          ref += w[f] * re + w[f + D / 2] * im + w[f + D] * std::sqrt(re * re + im * im);
        }
        const double got = scores[((size_t)((bh / H) * H + bh % H) * G + g) * N + n];
        worst = std::isnan(got) ? INFINITY : std::max(worst, std::abs(got - ref));
        largest = std::max(largest, std::abs(ref));
      }
    }
  }
  const bool ok = worst <= 1e-5 * largest;
  std::printf("%s D=%d HALF=%d G=%d ROWS=%d SUB=%d BITS=%d GS=%d KT=%d N=%d keys/warp=%d: max err %.2e of %.1f\n",
              ok ? "ok  " : "FAIL", D, HALF, G, ROWS, SUB, BITS, GS, KT, N, keys_per_warp, worst, largest);
  return ok;
}

int main() {
  bool ok = true;
  // plain keys: head dims, both pair layouts, GQA groups, passes, lanes per key
  ok &= run_case<64, 1, 1, 1, 8, 0, 0>(203, 4, 1);
  ok &= run_case<64, 0, 4, 2, 8, 0, 0>(203, 32, 2);
  ok &= run_case<128, 1, 4, 2, 8, 0, 0>(203, 32, 3);
  ok &= run_case<128, 0, 8, 4, 4, 0, 0>(157, 64, 4);
  ok &= run_case<256, 1, 4, 2, 16, 0, 0>(203, 32, 5);
  ok &= run_case<256, 0, 1, 1, 8, 0, 0>(99, 4, 6);
  ok &= run_case<256, 1, 4, 1, 32, 0, 0>(37, 4, 11);
  // float16 and bfloat16 keys: 8 elements per 16-byte load
  ok &= run_case<64, 1, 4, 2, 4, 0, 0, 1>(203, 32, 12);
  ok &= run_case<128, 1, 4, 2, 8, 0, 0, 1>(203, 32, 13);
  ok &= run_case<128, 0, 4, 2, 8, 0, 0, 2>(203, 32, 14);
  ok &= run_case<256, 1, 8, 1, 16, 0, 0, 2>(131, 4, 15);
  // quantized keys: bit widths and group sizes
  ok &= run_case<64, 1, 4, 2, 8, 4, 32>(203, 32, 7);
  ok &= run_case<128, 0, 4, 2, 8, 8, 64>(203, 32, 8);
  ok &= run_case<128, 1, 4, 1, 8, 2, 64>(131, 4, 9);
  ok &= run_case<256, 1, 8, 2, 8, 4, 128>(203, 32, 10);
  return ok ? 0 : 1;
}
