// How the CPU kernels walk an [N, C, *] tensor, shared by csrc/cpu/batch_norm.cpp and
// csrc/cpu/scale_bias_relu.cpp.
//
// Two memory layouts (anything else is first made contiguous in its suggested format):
//   * NCHW-contiguous: N*C rows of `inner` = prod(shape[2:]) values, one channel per row;
//   * channels-last-like (channels_last / channels_last_3d, or inner == 1, e.g. [N, C]):
//     a flat run of N*inner rows of C channels. It is walked in "periods" of k whole rows
//     (k*C >= kMinPeriod values) with per-channel parameters tiled to the period, so that
//     small C still gives long inner loops the compiler vectorises.
// Partitions depend only on the shape, never on the thread count, and partial sums are
// merged in a fixed order: reductions are bitwise deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// The hot loops are compiled three times on x86-64 Linux with GCC >= 12, for AVX-512
// (x86-64-v4), AVX2/FMA (x86-64-v3) and the baseline, and picked at load time (an
// ifunc): the extension is built without -march flags, and SSE2 code is ~2x slower for
// float32 and ~3-4x for bfloat16. Other compilers/platforms get the baseline build only
// (as does -DSDKERNELS_NO_CPU_CLONES, to test one code path).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(__linux__) && __GNUC__ >= 12 && !defined(SDKERNELS_NO_CPU_CLONES)
#define SDKERNELS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SDKERNELS_CPU_CLONES
#endif

namespace sdkernels {
namespace cpu {

// Elements per parallel task (ATen's GRAIN_SIZE): smaller tensors run on one thread.
constexpr int64_t kGrain = 32768;
// Minimum length of a channels-last period.
constexpr int64_t kMinPeriod = 64;
// Reductions: float (acc_t) partial sums over short runs, continued in double. NCHW:
// units of about kSeg values, summed in chunks of kChunk values (one float partial per
// vector lane); channels last: blocks of about kBlockElems values, with one float
// accumulator per position in the period flushed to double every kFlushPeriods periods.
// Float chains are thus at most 16 additions long (64 without SIMD).
constexpr int64_t kSeg = 4096;
constexpr int64_t kChunk = 64;
constexpr int64_t kBlockElems = 16384;
constexpr int64_t kFlushPeriods = 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// *p = v rounded to scalar_t. Same rounding as c10's conversions, but writes the bits
// directly: c10's constructors go through a temporary that stops GCC vectorising
// `omp simd` loops.
template <typename scalar_t, typename acc_t>
inline void store(scalar_t* p, acc_t v) {
  *p = static_cast<scalar_t>(v);
}
inline void store(c10::BFloat16* p, float v) {
  const uint32_t u = c10::bit_cast<uint32_t>(v);
  p->x = std::isnan(v) ? uint16_t(0x7FC0)
                       : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline void store(c10::Half* p, float v) { p->x = c10::detail::fp16_ieee_from_fp32_value(v); }

struct Geometry {
  int64_t N = 0;
  int64_t C = 0;
  int64_t inner = 1;  // prod(shape[2:])
  int64_t numel = 0;
  bool rows_of_channels = false;  // memory is [N * inner, C]
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
  int64_t period = 0;  // channels-last walk: elements per period (a multiple of C)

  int64_t M() const { return N * inner; }  // values per channel
};

inline Geometry geometry_of(const at::Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  for (int64_t d = 2; d < x.dim(); ++d) g.inner *= x.size(d);
  g.numel = x.numel();
  g.format = x.suggest_memory_format();
  g.rows_of_channels = g.format != at::MemoryFormat::Contiguous || g.inner == 1;
  g.period = g.C > 0 ? g.C * std::max<int64_t>(1, ceil_div(kMinPeriod, g.C)) : 0;
  return g;
}

// Statistics / accumulation dtype of the BN ops (float32, float64 for float64 x).
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel vector (any floating dtype, any stride) as T, tiled to `len` values
// (len = C for a plain copy, g.period for the channels-last walk).
template <typename T>
std::vector<T> per_channel(const at::Tensor& v, int64_t len) {
  std::vector<T> out(static_cast<size_t>(len));
  const int64_t C = v.size(0);
  if (C == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                  "sdkernels::per_channel", [&] {
    const scalar_t* p = v.const_data_ptr<scalar_t>();
    const int64_t st = v.stride(0);
    for (int64_t j = 0; j < std::min(len, C); ++j) out[j] = static_cast<T>(p[j * st]);
  });
  for (int64_t j = C; j < len; ++j) out[j] = out[j - C];
  return out;
}

// Elementwise walk, in parallel tasks of about kGrain values:
// rows(r0, r1):     NCHW rows [r0, r1) (row r = n * C + c holds `inner` values of c);
// periods(off, n):  channels-last values [off, off + n), off at a period boundary.
template <typename RowsFn, typename PeriodsFn>
void for_each_span(const Geometry& g, const RowsFn& rows, const PeriodsFn& periods) {
  if (g.numel == 0) return;
  if (g.rows_of_channels) {
    const int64_t P = g.period;
    const int64_t total = g.numel;
    at::parallel_for(0, ceil_div(total, P), std::max<int64_t>(1, kGrain / P),
                     [&](int64_t p0, int64_t p1) {
                       periods(p0 * P, std::min(total, p1 * P) - p0 * P);
                     });
  } else {
    at::parallel_for(0, g.N * g.C, std::max<int64_t>(1, kGrain / g.inner),
                     [&](int64_t r0, int64_t r1) { rows(r0, r1); });
  }
}

// Two per-channel sums, accumulated in acc_t within fixed units and merged in double:
// unit(c, n0, n1, s, len, &s1, &s2): NCHW; the sums over values [s, s + len) of the
//     rows (n, c), n in [n0, n1) (row (n, c) starts at (n * C + c) * inner);
// block(off, n, f1, f2, d1, d2): channels last; adds values [off, off + n) (off at a
//     period boundary) into the double accumulators d1[j], d2[j] (j = position in the
//     period), using f1[P], f2[P] (acc_t) as scratch for the float partial sums.
// Writes sum1[C], sum2[C].
template <typename acc_t, typename UnitFn, typename BlockFn>
void reduce_per_channel(const Geometry& g, const UnitFn& unit, const BlockFn& block,
                        double* sum1, double* sum2) {
  const int64_t C = g.C;
  std::fill(sum1, sum1 + C, 0.0);
  std::fill(sum2, sum2 + C, 0.0);
  if (g.numel == 0) return;
  if (g.rows_of_channels) {
    const int64_t P = g.period;
    const int64_t total = g.numel;
    const int64_t bper = std::max<int64_t>(kBlockElems / P, 1);
    const int64_t nblocks = ceil_div(ceil_div(total, P), bper);
    std::vector<double> part1(static_cast<size_t>(nblocks * C));
    std::vector<double> part2(static_cast<size_t>(nblocks * C));
    at::parallel_for(0, nblocks, std::max<int64_t>(1, kGrain / (bper * P)),
                     [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> f1(static_cast<size_t>(P)), f2(static_cast<size_t>(P));
      std::vector<double> a1(static_cast<size_t>(P)), a2(static_cast<size_t>(P));
      for (int64_t b = b0; b < b1; ++b) {
        std::fill(a1.begin(), a1.end(), 0.0);
        std::fill(a2.begin(), a2.end(), 0.0);
        const int64_t off = b * bper * P;
        block(off, std::min(total, off + bper * P) - off, f1.data(), f2.data(), a1.data(),
              a2.data());
        double* q1 = part1.data() + b * C;
        double* q2 = part2.data() + b * C;
        std::fill(q1, q1 + C, 0.0);
        std::fill(q2, q2 + C, 0.0);
        for (int64_t r = 0; r < P; r += C) {
          for (int64_t c = 0; c < C; ++c) {
            q1[c] += a1[r + c];
            q2[c] += a2[r + c];
          }
        }
      }
    });
    for (int64_t b = 0; b < nblocks; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        sum1[c] += part1[b * C + c];
        sum2[c] += part2[b * C + c];
      }
    }
  } else {
    // Units: (channel, block of rows, segment of a row), about kSeg values each.
    const int64_t N = g.N;
    const int64_t inner = g.inner;
    const int64_t nseg = ceil_div(inner, kSeg);
    const int64_t seg_len = std::min(inner, kSeg);
    const int64_t rows_per = nseg > 1 ? 1 : std::clamp<int64_t>(kSeg / inner, 1, N);
    const int64_t nrb = ceil_div(N, rows_per);
    const int64_t per_c = nrb * nseg;
    std::vector<double> part1(static_cast<size_t>(C * per_c));
    std::vector<double> part2(static_cast<size_t>(C * per_c));
    at::parallel_for(0, C * per_c, std::max<int64_t>(1, kGrain / (rows_per * seg_len)),
                     [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t c = u / per_c;
        const int64_t rb = (u - c * per_c) / nseg;
        const int64_t s = (u - c * per_c - rb * nseg) * kSeg;
        const int64_t n0 = rb * rows_per;
        unit(c, n0, std::min(N, n0 + rows_per), s, std::min(kSeg, inner - s), &part1[u],
             &part2[u]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < per_c; ++k) {
        sum1[c] += part1[c * per_c + k];
        sum2[c] += part2[c * per_c + k];
      }
    }
  }
}

}  // namespace cpu
}  // namespace sdkernels
