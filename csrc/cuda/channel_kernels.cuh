// Shared device machinery of the per-channel CUDA kernels (scale-bias(-add)-ReLU and its
// backward, BN statistics, BN backward): vector loads, the two layouts, generic
// elementwise and two-stage deterministic reduction drivers. No torch headers (compiled by
// a bare nvcc). The host-side plans (layout choice, vector widths, block shapes, split
// counts) live in channel_plan.h, plain C++ that host code and a host-only test share.
//
// Layouts: see channel_plan.h (NCHW [N, C, inner]; channels_last [M, C] rows of C).
//
// Vector width V (elements per thread access; a vector never straddles a channel run):
//   * reductions: the logical width of channel_plan.h's reduce_vec_width(), a function of
//     shape and dtype only. When a pointer is not 16-byte aligned the Op is instantiated
//     with kAligned == false and fetches the same V elements with V scalar accesses:
//     thread -> element assignment and summation order are unchanged, so an aligned copy
//     and a misaligned view reduce bitwise identically (see the rule in channel_plan.h).
//   * elementwise: V = 16 / sizeof(T) when the run is a multiple of it and every pointer
//     is 16-byte aligned, else 1 (no order to preserve).
//
// Ops plug into the drivers as small structs (see batch_norm_kernel.cu):
//   using acc_t; struct Chan; struct Loaded;
//   __device__ Chan channel(int64_t c) const;          per-channel constants
//   __device__ Loaded load(int64_t i) const;           the inputs of elements [i, i + V)
//   elementwise:  template <int NC> __device__ void store(int64_t i, const Loaded&,
//                                                         const Chan* ch) const;
//   reduction:    template <int NC> __device__ void accumulate(int64_t i, const Loaded&,
//                     const Chan* ch, acc_t* a, acc_t* b) const;   a[V], b[V]
//                 (accumulate may also store elementwise results of elements [i, i + V):
//                 every element is visited exactly once)
// ch points at V channel structs (channels_last: one per vector lane, NC == V) or at one
// (NCHW: the whole vector is one channel, NC == 1); lane v uses ch[NC == 1 ? 0 : v].
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "channel_plan.h"

namespace sdkernels {
namespace cuda {
namespace detail {

template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};

// Explicit conversions (nvcc flags disable the implicit __half/__nv_bfloat16 ones).
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename OpMath<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
constexpr int max_vec() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Read-only (non-coherent cache) load of V elements at p. kAligned: p is aligned to the
// Vec (one 4/8/16-byte access); else V scalar accesses of the same elements (for
// reductions over misaligned views: same elements, same order, see the top note).
template <typename T, int V, bool kAligned = true>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) {
  Vec<T, V> out;
  if constexpr (!kAligned && V > 1) {
#pragma unroll
    for (int v = 0; v < V; ++v) out.v[v] = __ldg(p + v);
  } else if constexpr (sizeof(Vec<T, V>) == 16) {
    const int4 raw = __ldg(reinterpret_cast<const int4*>(p));
    memcpy(&out, &raw, sizeof(raw));
  } else if constexpr (sizeof(Vec<T, V>) == 8) {
    const int2 raw = __ldg(reinterpret_cast<const int2*>(p));
    memcpy(&out, &raw, sizeof(raw));
  } else if constexpr (sizeof(Vec<T, V>) == 4) {
    const int raw = __ldg(reinterpret_cast<const int*>(p));
    memcpy(&out, &raw, sizeof(raw));
  } else {
    out = *reinterpret_cast<const Vec<T, V>*>(p);
  }
  return out;
}

template <typename T, int V, bool kAligned = true>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) {
  if constexpr (!kAligned && V > 1) {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = v.v[k];
  } else {
    *reinterpret_cast<Vec<T, V>*>(p) = v;
  }
}

// --- host helpers (the plans are in channel_plan.h) ----------------------------------

inline bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// --- elementwise drivers --------------------------------------------------------------

// grid (col_tiles, row_blocks), block (tx, ty). Thread: column vector cv, rows
// r = blockIdx.y * ty + threadIdx.y + k * gridDim.y * ty; U rows in flight.
template <typename Op, int V, int U>
__global__ void __launch_bounds__(kThreads)
    elementwise_cl_kernel(const Op op, int64_t M, int64_t C) {
  const int64_t cg = C / V;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (cv >= cg) return;  // no block-level synchronisation below
  const int64_t c0 = cv * V;
  typename Op::Chan ch[V];
#pragma unroll
  for (int v = 0; v < V; ++v) ch[v] = op.channel(c0 + v);
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < M;
       r += U * step) {
    typename Op::Loaded in[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + u * step;
      if (rr < M) in[u] = op.load(rr * C + c0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + u * step;
      if (rr < M) op.template store<V>(rr * C + c0, in[u], ch);
    }
  }
}

// 1-D grid-stride over the numel / V vectors; channel = (q / (inner / V)) % C.
// Index is uint32_t when numel / V <= 2^31 (no overflow of q + U * step), else uint64_t.
template <typename Op, int V, int U, typename Index>
__global__ void __launch_bounds__(kThreads)
    elementwise_nchw_kernel(const Op op, Index nvec, Index inner_vecs, Index C) {
  const Index step = static_cast<Index>(gridDim.x) * blockDim.x;
  for (Index q = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; q < nvec;
       q += U * step) {
    typename Op::Loaded in[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const Index qq = q + u * step;
      if (qq < nvec) in[u] = op.load(static_cast<int64_t>(qq) * V);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const Index qq = q + u * step;
      if (qq < nvec) {
        const typename Op::Chan ch = op.channel(static_cast<int64_t>((qq / inner_vecs) % C));
        op.template store<1>(static_cast<int64_t>(qq) * V, in[u], &ch);
      }
    }
  }
}

// Launches op over all numel elements. Requires numel % C == 0 (C > 0); V must match
// vec_width() for the op's pointers.
template <int V, int U, typename Op>
cudaError_t launch_elementwise(const Op& op, int64_t numel, int64_t C, int64_t inner,
                               bool channels_last, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  if (C <= 0 || inner <= 0) return cudaErrorInvalidValue;
  if (effective_channels_last(C, inner, channels_last)) {
    if (C % V != 0) return cudaErrorInvalidValue;
    const int64_t M = numel / C;
    const int64_t cg = C / V;
    const int tx = cl_threads_x(cg);
    const int ty = kThreads / tx;
    const int64_t col_tiles = ceil_div(cg, tx);
    if (col_tiles > INT_MAX) return cudaErrorInvalidValue;
    const int64_t max_row_blocks =
        std::min<int64_t>(65535, std::max<int64_t>(1, kElementwiseBlocks / col_tiles));
    const int64_t row_blocks =
        std::max<int64_t>(1, std::min(ceil_div(M, static_cast<int64_t>(ty) * U), max_row_blocks));
    const dim3 grid(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(row_blocks));
    const dim3 block(static_cast<unsigned int>(tx), static_cast<unsigned int>(ty));
    elementwise_cl_kernel<Op, V, U><<<grid, block, 0, stream>>>(op, M, C);
  } else {
    if (inner % V != 0) return cudaErrorInvalidValue;
    const int64_t nvec = numel / V;
    const int64_t blocks = std::max<int64_t>(
        1, std::min<int64_t>(ceil_div(nvec, static_cast<int64_t>(kThreads) * U),
                             8 * kElementwiseBlocks));
    if (nvec <= (int64_t(1) << 31)) {
      elementwise_nchw_kernel<Op, V, U, uint32_t>
          <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
              op, static_cast<uint32_t>(nvec), static_cast<uint32_t>(inner / V),
              static_cast<uint32_t>(C));
    } else {
      elementwise_nchw_kernel<Op, V, U, uint64_t>
          <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
              op, static_cast<uint64_t>(nvec), static_cast<uint64_t>(inner / V),
              static_cast<uint64_t>(C));
    }
  }
  return cudaGetLastError();
}

// --- reduction drivers ----------------------------------------------------------------
// Stage 1 writes two partial sums per (split, channel) to part_a / part_b, laid out
// [splits, C]; stage 2 (finalize_kernel) sums them over splits in a fixed order, in
// double, and hands (c, sum_a, sum_b) to the op's finisher. Every order is fixed: no
// atomics, bitwise reproducible.

// Sums a[V], b[V] over threadIdx.y for each threadIdx.x of a (tx, ty) block, tx a power
// of two <= 32: warp shuffles (fixed tree) then the warps in order through shared memory.
// Every thread of the block must call it. The result is valid where threadIdx.y == 0.
template <typename acc_t, int V>
__device__ __forceinline__ void reduce_over_rows(acc_t (&a)[V], acc_t (&b)[V], acc_t* smem) {
  const int tx = blockDim.x;
  const int t = threadIdx.y * tx + threadIdx.x;
  const int lane = t & 31;
  const int warp = t >> 5;
  for (int off = 16; off >= tx; off >>= 1) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      a[v] += __shfl_down_sync(0xffffffffu, a[v], off);
      b[v] += __shfl_down_sync(0xffffffffu, b[v], off);
    }
  }
  // Lanes [0, tx) of each warp now hold the warp's sums for threadIdx.x == lane.
  // smem layout [warp][2V][tx]: conflict-free.
  if (lane < tx) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      smem[(warp * 2 * V + v) * tx + lane] = a[v];
      smem[(warp * 2 * V + V + v) * tx + lane] = b[v];
    }
  }
  __syncthreads();
  if (threadIdx.y == 0) {  // warp 0, lane == threadIdx.x: already holds warp 0's sums
    for (int w = 1; w < kWarps; ++w) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        a[v] += smem[(w * 2 * V + v) * tx + threadIdx.x];
        b[v] += smem[(w * 2 * V + V + v) * tx + threadIdx.x];
      }
    }
  }
}

// channels_last stage 1: grid (col_tiles, splits), block (tx, ty). Block (x, s) reduces
// rows [s * chunk, min(M, (s + 1) * chunk)) of its column vectors.
template <typename Op, int V, int U>
__global__ void __launch_bounds__(kThreads)
    reduce_cl_kernel(const Op op, int64_t M, int64_t C, int64_t chunk,
                     typename Op::acc_t* __restrict__ part_a,
                     typename Op::acc_t* __restrict__ part_b) {
  using acc_t = typename Op::acc_t;
  __shared__ acc_t smem[kWarps * 2 * V * 32];
  const int64_t cg = C / V;
  const int64_t cv = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < cg;
  const int64_t c0 = cv * V;
  const int64_t split = blockIdx.y;
  const int64_t row0 = split * chunk;
  const int64_t row1 = row0 + chunk < M ? row0 + chunk : M;
  acc_t a[V], b[V];
#pragma unroll
  for (int v = 0; v < V; ++v) a[v] = b[v] = acc_t(0);
  if (active) {
    typename Op::Chan ch[V];
#pragma unroll
    for (int v = 0; v < V; ++v) ch[v] = op.channel(c0 + v);
    const int64_t step = blockDim.y;
    for (int64_t r = row0 + threadIdx.y; r < row1; r += U * step) {
      typename Op::Loaded in[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t rr = r + u * step;
        if (rr < row1) in[u] = op.load(rr * C + c0);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t rr = r + u * step;
        if (rr < row1) op.template accumulate<V>(rr * C + c0, in[u], ch, a, b);
      }
    }
  }
  reduce_over_rows<acc_t, V>(a, b, smem);
  if (threadIdx.y == 0 && active) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      part_a[split * C + c0 + v] = a[v];
      part_b[split * C + c0 + v] = b[v];
    }
  }
}

// NCHW stage 1: grid (C, splits), 1-D block. Block (c, s) reduces the channel's vectors
// q in [s * chunk, min(nvec, (s + 1) * chunk)), q = n * inner_vecs + hw / V.
template <typename Op, int V, int U, typename Index>
__global__ void __launch_bounds__(kThreads)
    reduce_nchw_kernel(const Op op, int64_t C, int64_t inner, Index nvec, Index chunk,
                       typename Op::acc_t* __restrict__ part_a,
                       typename Op::acc_t* __restrict__ part_b) {
  using acc_t = typename Op::acc_t;
  __shared__ acc_t smem[2 * kWarps];
  const int64_t c = blockIdx.x;
  const int64_t split = blockIdx.y;
  const Index inner_vecs = static_cast<Index>(inner / V);
  const Index q0 = static_cast<Index>(split) * chunk;
  const Index q1 = q0 + chunk < nvec ? q0 + chunk : nvec;
  const typename Op::Chan ch = op.channel(c);
  acc_t a[V], b[V];
#pragma unroll
  for (int v = 0; v < V; ++v) a[v] = b[v] = acc_t(0);
  for (Index q = q0 + threadIdx.x; q < q1; q += U * kThreads) {
    typename Op::Loaded in[U];
    int64_t off[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const Index qq = q + u * kThreads;
      if (qq < q1) {
        const Index n = qq / inner_vecs;
        const Index hv = qq - n * inner_vecs;
        off[u] = (static_cast<int64_t>(n) * C + c) * inner + static_cast<int64_t>(hv) * V;
        in[u] = op.load(off[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const Index qq = q + u * kThreads;
      if (qq < q1) op.template accumulate<1>(off[u], in[u], &ch, a, b);
    }
  }
  acc_t sa = a[0], sb = b[0];
#pragma unroll
  for (int v = 1; v < V; ++v) {
    sa += a[v];
    sb += b[v];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    sa += __shfl_down_sync(0xffffffffu, sa, off);
    sb += __shfl_down_sync(0xffffffffu, sb, off);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    smem[warp] = sa;
    smem[kWarps + warp] = sb;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      sa += smem[w];
      sb += smem[kWarps + w];
    }
    part_a[split * C + c] = sa;
    part_b[split * C + c] = sb;
  }
}

// Stage 2: grid ceil(C / kFinC), block (kFinC, kFinS). Sums part_*[s, c] over s in double
// (fixed strided order, then a fixed tree) and calls fin.finish(c, sum_a, sum_b).
template <typename Fin, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const Fin fin, const acc_t* __restrict__ part_a,
                    const acc_t* __restrict__ part_b, int64_t C, int64_t splits) {
  __shared__ double sh_a[kFinS][kFinC];
  __shared__ double sh_b[kFinS][kFinC];
  const int cx = threadIdx.x;
  const int sy = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kFinC + cx;
  double sa = 0.0, sb = 0.0;
  if (c < C) {
    for (int64_t s = sy; s < splits; s += kFinS) {
      sa += static_cast<double>(part_a[s * C + c]);
      sb += static_cast<double>(part_b[s * C + c]);
    }
  }
  sh_a[sy][cx] = sa;
  sh_b[sy][cx] = sb;
  __syncthreads();
#pragma unroll
  for (int off = kFinS / 2; off > 0; off >>= 1) {
    if (sy < off) {
      sh_a[sy][cx] += sh_a[sy + off][cx];
      sh_b[sy][cx] += sh_b[sy + off][cx];
    }
    __syncthreads();
  }
  if (sy == 0 && c < C) fin.finish(c, sh_a[0][cx], sh_b[0][cx]);
}

// Runs both stages. V is the logical vector width (reduce_vec_width() of channel_plan.h:
// shape and dtype only; a misaligned input keeps V and uses an Op with kAligned ==
// false). workspace holds 2 * splits * C acc_t; splits must equal
// reduce_splits(numel, C, inner, channels_last, V). Requires numel > 0, C > 0.
template <int V, int U, typename Op, typename Fin>
cudaError_t launch_channel_reduce(const Op& op, const Fin& fin, int64_t numel, int64_t C,
                                  int64_t inner, bool channels_last, int64_t splits,
                                  typename Op::acc_t* workspace, cudaStream_t stream) {
  using acc_t = typename Op::acc_t;
  if (numel <= 0) return cudaSuccess;
  if (C <= 0 || inner <= 0 || numel % C != 0) return cudaErrorInvalidValue;
  if (splits != reduce_splits(numel, C, inner, channels_last, V) || splits > 65535)
    return cudaErrorInvalidValue;
  if (workspace == nullptr) return cudaErrorInvalidValue;
  acc_t* part_a = workspace;
  acc_t* part_b = workspace + splits * C;
  const int64_t M = numel / C;
  if (effective_channels_last(C, inner, channels_last)) {
    if (C % V != 0) return cudaErrorInvalidValue;
    const int64_t cg = C / V;
    const int tx = cl_threads_x(cg);
    const int ty = kThreads / tx;
    const int64_t col_tiles = ceil_div(cg, tx);
    if (col_tiles > INT_MAX) return cudaErrorInvalidValue;
    const int64_t chunk = ceil_div(M, splits);
    const dim3 grid(static_cast<unsigned int>(col_tiles), static_cast<unsigned int>(splits));
    const dim3 block(static_cast<unsigned int>(tx), static_cast<unsigned int>(ty));
    reduce_cl_kernel<Op, V, U><<<grid, block, 0, stream>>>(op, M, C, chunk, part_a, part_b);
  } else {
    if (inner % V != 0 || C > INT_MAX) return cudaErrorInvalidValue;
    const int64_t nvec = M / V;
    const int64_t chunk = ceil_div(nvec, splits);
    const dim3 grid(static_cast<unsigned int>(C), static_cast<unsigned int>(splits));
    if (nvec <= (int64_t(1) << 31)) {
      reduce_nchw_kernel<Op, V, U, uint32_t><<<grid, kThreads, 0, stream>>>(
          op, C, inner, static_cast<uint32_t>(nvec), static_cast<uint32_t>(chunk), part_a,
          part_b);
    } else {
      reduce_nchw_kernel<Op, V, U, uint64_t><<<grid, kThreads, 0, stream>>>(
          op, C, inner, static_cast<uint64_t>(nvec), static_cast<uint64_t>(chunk), part_a,
          part_b);
    }
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t fin_blocks = ceil_div(C, kFinC);
  if (fin_blocks > INT_MAX) return cudaErrorInvalidValue;
  finalize_kernel<Fin, acc_t><<<static_cast<unsigned int>(fin_blocks), dim3(kFinC, kFinS), 0,
                                stream>>>(fin, part_a, part_b, C, splits);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace sdkernels
