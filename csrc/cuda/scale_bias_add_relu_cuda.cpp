// Torch-facing host code of the CUDA sdkernels::scale_bias_add_relu ops: input checks,
// layout choice, dtype dispatch and the current stream; the kernels themselves live in
// scale_bias_add_relu_kernel.cu (no torch headers). Only compiled when CUDA is built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "cuda/host_utils.h"
#include "cuda/scale_bias_add_relu_kernel.cuh"

namespace sdkernels {

// Defined in csrc/sdkernels.cpp (shared by every backend).
void check_scale_bias_add_relu_inputs(const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& bias, const at::Tensor& residual);
void check_scale_bias_add_relu_backward_inputs(const at::Tensor& grad_out,
                                               const at::Tensor& out, const at::Tensor& x,
                                               const at::Tensor& scale);

namespace {

constexpr const char* kFwdName = "sdkernels::scale_bias_add_relu";
constexpr const char* kBwdName = "sdkernels::scale_bias_add_relu_backward";

using cuda_host::cptr;
using cuda_host::CudaType;
using cuda_host::Geometry;
using cuda_host::geometry_of;
using cuda_host::mptr;

at::Tensor scale_bias_add_relu_cuda(const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& bias, const at::Tensor& residual) {
  check_scale_bias_add_relu_inputs(x, scale, bias, residual);
  cuda_host::check_on_cuda(kFwdName, "x", x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Geometry g = geometry_of(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(g.format));
  if (g.numel == 0) return out;

  const at::Tensor xc = x.contiguous(g.format);
  const at::Tensor rc = residual.contiguous(g.format);
  const at::Tensor sc = scale.contiguous();
  const at::Tensor bc = bias.contiguous();
  const bool float_params = scale.scalar_type() == at::kFloat;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kFwdName, [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    if (float_params) {
      SDKERNELS_CUDA_CHECK(kFwdName, (cuda::launch_scale_bias_add_relu_forward<cuda_t, float>(
                                         cptr<scalar_t>(xc), sc.const_data_ptr<float>(),
                                         bc.const_data_ptr<float>(), cptr<scalar_t>(rc),
                                         mptr<scalar_t>(out), g.numel, g.C, g.inner,
                                         g.channels_last, stream)));
    } else {
      SDKERNELS_CUDA_CHECK(kFwdName, (cuda::launch_scale_bias_add_relu_forward<cuda_t, cuda_t>(
                                         cptr<scalar_t>(xc), cptr<scalar_t>(sc),
                                         cptr<scalar_t>(bc), cptr<scalar_t>(rc),
                                         mptr<scalar_t>(out), g.numel, g.C, g.inner,
                                         g.channels_last, stream)));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_bias_add_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
    const at::Tensor& scale) {
  check_scale_bias_add_relu_backward_inputs(grad_out, out, x, scale);
  cuda_host::check_on_cuda(kBwdName, "x", x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Geometry g = geometry_of(x);
  const auto opts = x.options().memory_format(g.format);
  at::Tensor grad_x = at::empty(x.sizes(), opts);
  at::Tensor grad_res = at::empty(x.sizes(), opts);
  if (g.numel == 0) {
    at::Tensor zeros = at::zeros({g.C}, scale.options());
    return {grad_x, zeros, zeros.clone(), grad_res};
  }

  const at::Tensor goc = grad_out.contiguous(g.format);
  const at::Tensor oc = out.contiguous(g.format);
  const at::Tensor xc = x.contiguous(g.format);
  // The kernel reads scale in the accumulation dtype (float, double for double x): the
  // float16/bfloat16 -> float and float -> double conversions are exact, so grad_x is
  // what g * to_acc(scale[c]) gives with the original dtype. No copy when it already is.
  const at::ScalarType acc_type = cuda_host::stats_type(x.scalar_type());
  const at::Tensor sc = scale.to(acc_type).contiguous();
  const at::TensorOptions aopts = x.options().dtype(acc_type);
  at::Tensor grad_scale = at::empty({g.C}, aopts);
  at::Tensor grad_bias = at::empty({g.C}, aopts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwdName, [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // Shape-only plan (channel_plan.h): aligned and misaligned inputs sum in one order.
    const cuda::ChannelReducePlan plan = cuda::plan_channel_reduce(
        g.numel, g.C, g.inner, g.channels_last, static_cast<int>(sizeof(cuda_t)));
    at::Tensor ws = at::empty({2 * plan.splits * g.C}, aopts);
    SDKERNELS_CUDA_CHECK(
        kBwdName, (cuda::launch_scale_bias_add_relu_backward<cuda_t, acc_t>(
                      cptr<scalar_t>(goc), cptr<scalar_t>(oc), cptr<scalar_t>(xc),
                      sc.const_data_ptr<acc_t>(), mptr<scalar_t>(grad_x),
                      mptr<scalar_t>(grad_res), g.numel, g.C, g.inner, g.channels_last, plan,
                      ws.mutable_data_ptr<acc_t>(), grad_scale.mutable_data_ptr<acc_t>(),
                      grad_bias.mutable_data_ptr<acc_t>(), stream)));
  });
  // Sums finished in double by the kernel, rounded to acc_t, returned in scale's dtype.
  return {grad_x, grad_scale.to(scale.scalar_type()), grad_bias.to(scale.scalar_type()),
          grad_res};
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, CUDA, m) {
  m.impl("scale_bias_add_relu", &sdkernels::scale_bias_add_relu_cuda);
  m.impl("scale_bias_add_relu_backward", &sdkernels::scale_bias_add_relu_backward_cuda);
}
