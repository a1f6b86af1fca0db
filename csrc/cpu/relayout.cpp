// CPU kernel of sdkernels::relayout: a 4-D tensor copied between NCHW-contiguous and
// channels_last, as x.contiguous(memory_format) computes it.
//
// Why it exists: ATen's strided copy walks the permuted side with an inner loop of C
// values, which for the small channel counts of CIFAR ResNets (16, 32) runs at a few
// GB/s; the fused training branch converts NCHW blocks to channels_last and back in
// every step. Here each image is one [R, K] -> [K, R] matrix transpose
// (NCHW -> NHWC: R = C, K = H*W; back: R = H*W, K = C) done in square tiles, so both
// sides are read and written in cache-line runs.
// Limits: 4-D input that is NCHW-contiguous or channels_last (anything else, and other
// ranks, goes through ATen's copy); bit-exact for every dtype (values are moved, never
// converted).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include "cpu/layout.h"
#include "cpu/relayout.h"

namespace sdkernels {
namespace cpu {
namespace {

constexpr int64_t kTile = 32;

// The values are moved as raw 2/4/8-byte words; may_alias keeps that legal under strict
// aliasing for tensors holding float, half, bfloat16 or integer data.
#if defined(__GNUC__) || defined(__clang__)
using word16 = uint16_t __attribute__((may_alias));
using word32 = uint32_t __attribute__((may_alias));
using word64 = uint64_t __attribute__((may_alias));
#else
using word16 = uint16_t;
using word32 = uint32_t;
using word64 = uint64_t;
#endif

// dst[k * R + r] = src[r * K + k] for r in [r0, r1), k in [k0, k1). One side is always
// walked with a stride; it is the side with the shorter one (a stride of K = H*W values
// maps a tile's rows onto the same few L1 sets, which thrashes).
template <typename T>
SDKERNELS_CPU_CLONES
void transpose_tile(const T* __restrict__ src, T* __restrict__ dst, int64_t R, int64_t K,
                    int64_t r0, int64_t r1, int64_t k0, int64_t k1) {
  if (K > R) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* s = src + r * K;
      for (int64_t k = k0; k < k1; ++k) dst[k * R + r] = s[k];
    }
  } else {
    for (int64_t k = k0; k < k1; ++k) {
      T* d = dst + k * R;
      for (int64_t r = r0; r < r1; ++r) d[r] = src[r * K + k];
    }
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SDKERNELS_AVX2_TRANSPOSE 1
// 8x8 blocks of 32-bit values in AVX2 registers: the scalar loop moves one value per
// load/store pair, which is what made both ATen's copy and the tile loop slow here.
__attribute__((target("avx2"))) void transpose_tile_avx2(const word32* src, word32* dst,
                                                         int64_t R, int64_t K, int64_t r0,
                                                         int64_t r1, int64_t k0, int64_t k1) {
  const int64_t r8 = r0 + (r1 - r0) / 8 * 8, k8 = k0 + (k1 - k0) / 8 * 8;
  for (int64_t r = r0; r < r8; r += 8) {
    for (int64_t k = k0; k < k8; k += 8) {
      __m256 v[8], t[8];
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm256_castsi256_ps(_mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(src + (r + i) * K + k)));
      }
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        v[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        v[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        v[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        v[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        t[i] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x20);
        t[i + 4] = _mm256_permute2f128_ps(v[i], v[i + 4], 0x31);
      }
      for (int i = 0; i < 8; ++i) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (k + i) * R + r),
                            _mm256_castps_si256(t[i]));
      }
    }
  }
  // Ragged edges (fewer than 8 rows or columns left) with the scalar loop.
  if (k8 < k1) transpose_tile(src, dst, R, K, r0, r1, k8, k1);
  if (r8 < r1) transpose_tile(src, dst, R, K, r8, r1, k0, k8);
}

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// Transposes `batch` [R, K] matrices of `esize`-byte elements.
void batched_transpose(const void* src, void* dst, int64_t batch, int64_t R, int64_t K,
                       int64_t esize) {
  const int64_t tr = ceil_div(R, kTile), tk = ceil_div(K, kTile);
  const int64_t per = tr * tk;
  const int64_t grain = std::max<int64_t>(1, kGrain / (kTile * kTile));
  at::parallel_for(0, batch * per, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / per;
      const int64_t r0 = ((t % per) / tk) * kTile, k0 = (t % tk) * kTile;
      const int64_t r1 = std::min(R, r0 + kTile), k1 = std::min(K, k0 + kTile);
      const int64_t off = b * R * K;
      switch (esize) {
        case 2:
          transpose_tile(static_cast<const word16*>(src) + off,
                         static_cast<word16*>(dst) + off, R, K, r0, r1, k0, k1);
          break;
        case 4:
#ifdef SDKERNELS_AVX2_TRANSPOSE
          if (have_avx2()) {
            transpose_tile_avx2(static_cast<const word32*>(src) + off,
                                static_cast<word32*>(dst) + off, R, K, r0, r1, k0, k1);
            break;
          }
#endif
          transpose_tile(static_cast<const word32*>(src) + off,
                         static_cast<word32*>(dst) + off, R, K, r0, r1, k0, k1);
          break;
        default:
          transpose_tile(static_cast<const word64*>(src) + off,
                         static_cast<word64*>(dst) + off, R, K, r0, r1, k0, k1);
      }
    }
  });
}

bool fast_path(const at::Tensor& x) {
  const int64_t es = x.element_size();
  return x.device().is_cpu() && x.dim() == 4 && x.layout() == at::kStrided &&
         (es == 2 || es == 4 || es == 8) && !x.is_complex() && x.numel() > 0 &&
         (x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast));
}

}  // namespace

at::Tensor to_memory_format(const at::Tensor& x, at::MemoryFormat fmt) {
  if (x.is_contiguous(fmt)) return x;
  if (!fast_path(x)) return x.contiguous(fmt);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    batched_transpose(x.const_data_ptr(), out.mutable_data_ptr(), N, C, HW, x.element_size());
  } else {
    batched_transpose(x.const_data_ptr(), out.mutable_data_ptr(), N, HW, C, x.element_size());
  }
  return out;
}

}  // namespace cpu

namespace {

at::Tensor relayout_cpu(const at::Tensor& x, bool channels_last) {
  TORCH_CHECK(x.layout() == at::kStrided,
              "sdkernels::relayout: expected a strided (dense) tensor, got layout ", x.layout());
  TORCH_CHECK(x.dim() == 4, "sdkernels::relayout: expected a 4-D tensor [N, C, H, W], got a ",
              x.dim(), "-D tensor of shape ", x.sizes());
  const at::MemoryFormat fmt =
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = cpu::to_memory_format(x, fmt);
  // An op's output never aliases its input.
  return out.is_same(x) ? x.clone(fmt) : out;
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, CPU, m) {
  m.impl("relayout", &sdkernels::relayout_cpu);
}

TORCH_LIBRARY_IMPL(sdkernels, Autograd, m) {
  m.impl("relayout", torch::autograd::autogradNotImplementedFallback());
}
