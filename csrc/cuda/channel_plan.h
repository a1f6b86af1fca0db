// Host-side launch plans of the per-channel CUDA drivers (channel_kernels.cuh): layout,
// vector widths, block shapes and the split of a reduction into partials. Plain C++17,
// header-only, no CUDA or torch headers: included by the device code (.cu via
// channel_kernels.cuh), by the torch-facing host files (*_cuda.cpp, to size workspaces)
// and by a host-only test (tests/test_extension_ops.py compiles it with the host
// compiler), so the split logic can be checked on a machine without a GPU.
//
// Layouts (all pointers are to dense tensors):
//   NCHW          [N, C, inner] contiguous; channel of flat index i = (i / inner) % C
//   channels_last [M = N * inner, C] contiguous (rows of C); channel of i = i % C
// The two coincide when inner == 1 or C == 1; effective_channels_last() then picks the
// one that vectorises (rows of C for inner == 1, runs of inner for C == 1).
//
// Reproducibility rule: every quantity that fixes a reduction's summation order (the
// logical vector width, the (tx, ty) block shape, the number of splits and their row or
// vector ranges, hence which thread adds which element in which order) is a function of
// the shape (numel, C, inner, layout) and the element size ONLY. Pointer alignment is
// deliberately not an input: a misaligned view (e.g. storage_offset 1) and an aligned
// copy of the same values must sum in the same order and give bitwise equal results.
// Alignment may only change how a thread fetches its V elements (one 16-byte access or
// V scalar accesses, see load_vec in channel_kernels.cuh), never which elements it owns
// or how it accumulates them. (Before, a misaligned input fell back to V = 1, which also
// changed tx / ty and the split count: aligned and misaligned inputs were summed in
// different orders and differed in the last bits.) Elementwise launches have no order
// and may still pick their vector width from alignment (vec_width below).
#pragma once

#include <algorithm>
#include <cstdint>

namespace sdkernels {
namespace cuda {

// How a per-channel reduction runs: the logical vector width (elements per thread
// access, a function of shape and dtype only) and the number of partials per channel.
struct ChannelReducePlan {
  int vec = 1;
  int64_t splits = 1;
};

namespace detail {

constexpr int kThreads = 256;  // every driver's block size (8 warps)
constexpr int kWarps = kThreads / 32;
// Reductions: aim at ~1024 blocks in the partial pass (a few waves of 256-thread blocks
// on 108-132 SMs) but give every thread some work; at most kMaxSplits partials per
// channel. The split depends on the shape only (never on the device or on pointer
// alignment), so results are bitwise reproducible on every GPU and for every view.
constexpr int64_t kReduceTargetBlocks = 1024;
constexpr int64_t kMaxSplits = 1024;
constexpr int64_t kMinRowsPerThread = 4;  // channels_last partial pass
constexpr int64_t kMinVecsPerThread = 4;  // NCHW partial pass
// Elementwise grid-stride caps.
constexpr int64_t kElementwiseBlocks = 8192;
// Finalize: a block of kFinC channels x kFinS split lanes.
constexpr int kFinC = 8;
constexpr int kFinS = kThreads / kFinC;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// See the layout note at the top.
inline bool effective_channels_last(int64_t C, int64_t inner, bool channels_last) {
  if (C == 1) return false;
  if (inner == 1) return true;
  return channels_last;
}

// Elements per 16-byte access for elements of elem_size bytes (1 for elem_size > 16).
inline int max_vec_of(int elem_size) {
  return elem_size >= 1 && elem_size <= 16 ? 16 / elem_size : 1;
}

// The logical vector width of a reduction: max_vec_of(elem_size) when the contiguous run
// (C for channels_last, inner for NCHW) is a multiple of it, else 1. Shape and dtype
// only: no alignment (see the reproducibility rule above).
inline int reduce_vec_width(int elem_size, int64_t C, int64_t inner, bool channels_last) {
  const int vmax = max_vec_of(elem_size);
  const int64_t run = effective_channels_last(C, inner, channels_last) ? C : inner;
  return run % vmax == 0 ? vmax : 1;
}

// Vector width of an elementwise launch (no summation order): the logical width when
// every data pointer is 16-byte aligned, else 1.
inline int vec_width(int elem_size, int64_t C, int64_t inner, bool channels_last,
                     bool pointers_aligned) {
  return pointers_aligned ? reduce_vec_width(elem_size, C, inner, channels_last) : 1;
}

// channels_last blocks are (tx, ty): tx threads over column vectors (a power of two <=
// 32, so a warp covers whole rows), ty = kThreads / tx over rows.
inline int cl_threads_x(int64_t col_vecs) {
  int tx = 1;
  while (tx < col_vecs && tx < 32) tx <<= 1;
  return tx;
}

// Number of partials per channel of a reduction (>= 1, <= kMaxSplits); depends only on
// the shape, the layout and the (logical) vector width.
inline int64_t reduce_splits(int64_t numel, int64_t C, int64_t inner, bool channels_last,
                             int vec) {
  if (numel <= 0 || C <= 0 || vec <= 0) return 1;
  const int64_t M = numel / C;
  const bool cl = effective_channels_last(C, inner, channels_last);
  int64_t total, want;
  if (cl) {
    const int64_t cg = C / vec;
    const int tx = cl_threads_x(cg);
    const int ty = kThreads / tx;
    const int64_t col_tiles = ceil_div(cg, tx);
    total = M;
    want = std::min(ceil_div(M, ty * kMinRowsPerThread),
                    ceil_div(kReduceTargetBlocks, col_tiles));
  } else {
    total = M / vec;
    want = std::min(ceil_div(total, kThreads * kMinVecsPerThread),
                    ceil_div(kReduceTargetBlocks, C));
  }
  if (total <= 0) return 1;
  want = std::max<int64_t>(1, std::min(want, kMaxSplits));
  const int64_t chunk = ceil_div(total, want);
  return ceil_div(total, chunk);  // no empty split
}

}  // namespace detail

// The plan of a per-channel reduction over numel elements of elem_size bytes. The
// workspace of the two-stage drivers needs 2 * plan.splits * C accumulator elements.
// Depends on the shape and the element size only (see the reproducibility rule).
inline ChannelReducePlan plan_channel_reduce(int64_t numel, int64_t C, int64_t inner,
                                             bool channels_last, int elem_size) {
  ChannelReducePlan plan;
  if (numel <= 0 || C <= 0 || inner <= 0 || elem_size <= 0 || elem_size > 16) return plan;
  plan.vec = detail::reduce_vec_width(elem_size, C, inner, channels_last);
  plan.splits = detail::reduce_splits(numel, C, inner, channels_last, plan.vec);
  return plan;
}

}  // namespace cuda
}  // namespace sdkernels
