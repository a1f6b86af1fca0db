// Device-side launchers of the training-mode BN ops (design §5): sdkernels::bn_stats,
// relu_bn_backward_reduce and bn_backward_apply. (scale_bias_relu's forward shares the
// scale_bias_add_relu kernel: see scale_bias_add_relu_kernel.cuh.)
//
// No torch headers here: this header and batch_norm_kernel.cu compile with a bare nvcc.
// The torch-facing host code lives in batch_norm_cuda.cpp. Pointers are to dense tensors
// in one of two layouts (as in scale_bias_add_relu_kernel.cuh):
//   channels_last == false: [N, C, inner] contiguous
//   channels_last == true:  [N * inner, C] contiguous (rows of C)
// scalar_t is float, double, __half or __nv_bfloat16; acc_t (accumulation and statistics
// type) is double for double and float otherwise. Launchers return cudaGetLastError()
// after their launches (cudaErrorInvalidValue for arguments they cannot handle) and do
// nothing for numel == 0.
//
// The reductions are two-stage and deterministic: a fixed, shape-only split of every
// channel into `splits` parts (stage 1 writes partial sums, [2, splits, C] acc_t in
// `workspace`), then a finalize kernel sums each channel's partials in a fixed order, in
// double. No atomics: repeated calls are bitwise equal, and so are an aligned copy and a
// misaligned view (e.g. storage_offset 1) of the same values.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "channel_plan.h"

namespace sdkernels {
namespace cuda {

// How a per-channel reduction over x runs (vector width, number of splits): see
// ChannelReducePlan and plan_channel_reduce(numel, C, inner, channels_last, elem_size) in
// channel_plan.h. The plan depends on the shape and the element size only, never on
// pointer alignment, so aligned and misaligned inputs are summed in the same order. The
// workspace needs 2 * plan.splits * C elements of acc_t.

// Batch statistics over M = numel / C values per channel (numerically stable: sums of
// x - x[first element of the channel], a shift shared by all partials, finished in
// double): mean[c], invstd[c] = 1 / sqrt(var_biased + eps). When running_mean /
// running_var are non-null they are updated in place:
//   r = (1 - momentum) * r + momentum * s, s = mean / unbiased var (M == 1: var).
// running_t is float, or double for double x. Requires numel > 0 (the host handles
// M == 0).
template <typename scalar_t, typename acc_t, typename running_t>
cudaError_t launch_bn_stats(const scalar_t* x, int64_t numel, int64_t C, int64_t inner,
                            bool channels_last, const ChannelReducePlan& plan,
                            acc_t* workspace, double momentum, double eps, acc_t* mean,
                            acc_t* invstd, running_t* running_mean, running_t* running_var,
                            cudaStream_t stream);

// dy = out > 0 ? grad_out : 0 (out == nullptr: dy = grad_out);
// sum_dy[c] = sum dy, sum_dy_xhat[c] = invstd[c] * sum dy * (y - mean[c]);
// dy is also written to `dy` (same layout as y) when non-null.
template <typename scalar_t, typename acc_t>
cudaError_t launch_relu_bn_backward_reduce(
    const scalar_t* grad_out, const scalar_t* out, const scalar_t* y, const acc_t* mean,
    const acc_t* invstd, scalar_t* dy, int64_t numel, int64_t C, int64_t inner,
    bool channels_last, const ChannelReducePlan& plan, acc_t* workspace, acc_t* sum_dy,
    acc_t* sum_dy_xhat, cudaStream_t stream);

// grad_y = k[c] * (dy - sum_dy[c] / M - xhat * sum_dy_xhat[c] / M),
// xhat = (y - mean[c]) * invstd[c], k = weight[c] * invstd[c] (weight == nullptr: 1),
// M = numel / C, dy as above.
template <typename scalar_t, typename acc_t>
cudaError_t launch_bn_backward_apply(
    const scalar_t* grad_out, const scalar_t* out, const scalar_t* y, const acc_t* mean,
    const acc_t* invstd, const acc_t* weight, const acc_t* sum_dy, const acc_t* sum_dy_xhat,
    scalar_t* grad_y, int64_t numel, int64_t C, int64_t inner, bool channels_last,
    cudaStream_t stream);

}  // namespace cuda
}  // namespace sdkernels
