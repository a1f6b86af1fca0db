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
  const at::Tensor sc = scale.contiguous();
  const bool float_params = scale.scalar_type() == at::kFloat;
  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t splits = cuda::scale_bias_add_relu_reduce_splits(g.numel, g.C);
  at::Tensor part_gx = at::empty({g.C, splits}, x.options().dtype(acc_type));
  at::Tensor part_g = at::empty({g.C, splits}, x.options().dtype(acc_type));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kBwdName, [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (float_params) {
      SDKERNELS_CUDA_CHECK(
          kBwdName, (cuda::launch_scale_bias_add_relu_backward_elementwise<cuda_t, float>(
                        cptr<scalar_t>(goc), cptr<scalar_t>(oc), sc.const_data_ptr<float>(),
                        mptr<scalar_t>(grad_x), mptr<scalar_t>(grad_res), g.numel, g.C,
                        g.inner, g.channels_last, stream)));
    } else {
      SDKERNELS_CUDA_CHECK(
          kBwdName, (cuda::launch_scale_bias_add_relu_backward_elementwise<cuda_t, cuda_t>(
                        cptr<scalar_t>(goc), cptr<scalar_t>(oc), cptr<scalar_t>(sc),
                        mptr<scalar_t>(grad_x), mptr<scalar_t>(grad_res), g.numel, g.C,
                        g.inner, g.channels_last, stream)));
    }
    SDKERNELS_CUDA_CHECK(
        kBwdName, (cuda::launch_scale_bias_add_relu_backward_reduce<cuda_t, acc_t>(
                      cptr<scalar_t>(goc), cptr<scalar_t>(oc), cptr<scalar_t>(xc),
                      part_gx.mutable_data_ptr<acc_t>(), part_g.mutable_data_ptr<acc_t>(),
                      g.numel, g.C, g.inner, g.channels_last, splits, stream)));
  });
  // Partials [C, splits] summed in a fixed order by ATen, cast to scale's dtype.
  at::Tensor grad_scale = part_gx.sum(1).to(scale.scalar_type());
  at::Tensor grad_bias = part_g.sum(1).to(scale.scalar_type());
  return {grad_x, grad_scale, grad_bias, grad_res};
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, CUDA, m) {
  m.impl("scale_bias_add_relu", &sdkernels::scale_bias_add_relu_cuda);
  m.impl("scale_bias_add_relu_backward", &sdkernels::scale_bias_add_relu_backward_cuda);
}
