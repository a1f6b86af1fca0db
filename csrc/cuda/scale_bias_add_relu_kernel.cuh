// Device-side launchers of sdkernels::scale_bias_add_relu (forward and backward) and of
// sdkernels::scale_bias_relu's forward (the same kernel without the residual).
//
// No torch headers here: this header and scale_bias_add_relu_kernel.cu compile with a
// bare nvcc (CI has a CPU torch and no GPU). The torch-facing host code lives in
// scale_bias_add_relu_cuda.cpp. All pointers are to dense tensors in one of two layouts:
//   channels_last == false: [N, C, inner] contiguous, channel of flat index i = (i / inner) % C
//   channels_last == true:  [N * inner, C] contiguous, channel of flat index i = i % C
// Launchers return the result of cudaGetLastError() after their launches
// (cudaErrorInvalidValue for arguments they cannot handle). The forward launchers use
// 16-byte vector accesses when the contiguous run (C for channels_last, inner otherwise)
// is a multiple of 16 / sizeof(scalar_t) and the pointers are 16-byte aligned (see
// channel_kernels.cuh).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "channel_plan.h"

namespace sdkernels {
namespace cuda {

// out = relu(x * scale[c] + bias[c] + residual), math in acc_t (float, or double for
// double). param_t (type of scale and bias) is scalar_t or float.
// Instantiated for (scalar_t, param_t) in {(float, float), (double, double),
// (double, float), (__half, __half), (__half, float), (__nv_bfloat16, __nv_bfloat16),
// (__nv_bfloat16, float)}.
template <typename scalar_t, typename param_t>
cudaError_t launch_scale_bias_add_relu_forward(
    const scalar_t* x, const param_t* scale, const param_t* bias, const scalar_t* residual,
    scalar_t* out, int64_t numel, int64_t C, int64_t inner, bool channels_last,
    cudaStream_t stream);

// out = relu(x * scale[c] + bias[c]) (sdkernels::scale_bias_relu): the same kernel as
// above without the residual. Same instantiations.
template <typename scalar_t, typename param_t>
cudaError_t launch_scale_bias_relu_forward(const scalar_t* x, const param_t* scale,
                                           const param_t* bias, scalar_t* out, int64_t numel,
                                           int64_t C, int64_t inner, bool channels_last,
                                           cudaStream_t stream);

// Backward of scale_bias_add_relu, one pass over grad_out, out and x (the channel-reduce
// driver of channel_kernels.cuh, the one bn's backward uses: coalesced rows of C for
// channels_last, no per-element index division), g = out > 0 ? grad_out : 0:
//   grad_residual = g, grad_x = g * scale[c]                          (elementwise)
//   grad_scale[c] = sum g * x, grad_bias[c] = sum g                   (per channel)
// The sums are deterministic: the shape-only split of `plan` (plan_channel_reduce(numel,
// C, inner, channels_last, sizeof(scalar_t)), channel_plan.h), partials in acc_t, merged
// in double in a fixed order; aligned and misaligned inputs give bitwise equal sums.
// acc_t is double for double and float otherwise; scale is given in acc_t (the host
// converts float/half/bfloat16 parameters exactly). workspace holds 2 * plan.splits * C
// acc_t. Instantiated for scalar_t in {float, double, __half, __nv_bfloat16}.
template <typename scalar_t, typename acc_t>
cudaError_t launch_scale_bias_add_relu_backward(
    const scalar_t* grad_out, const scalar_t* out, const scalar_t* x, const acc_t* scale,
    scalar_t* grad_x, scalar_t* grad_residual, int64_t numel, int64_t C, int64_t inner,
    bool channels_last, const ChannelReducePlan& plan, acc_t* workspace, acc_t* grad_scale,
    acc_t* grad_bias, cudaStream_t stream);

}  // namespace cuda
}  // namespace sdkernels
