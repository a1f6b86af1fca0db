// Torch-facing host code of the CUDA training-mode BN ops (design §5): bn_stats,
// scale_bias_relu, relu_bn_backward_reduce and bn_backward_apply. Input checks (shared
// with every backend, csrc/sdkernels.cpp), layout choice (x.suggest_memory_format(),
// other strides made contiguous in it first), dtype dispatch, x's device and its current
// stream. The kernels live in batch_norm_kernel.cu and scale_bias_add_relu_kernel.cu (no
// torch headers). Only compiled when CUDA is built.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/batch_norm_kernel.cuh"
#include "cuda/host_utils.h"
#include "cuda/scale_bias_add_relu_kernel.cuh"

namespace sdkernels {

// Defined in csrc/sdkernels.cpp (shared by every backend).
void check_bn_stats_inputs(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, double momentum,
                           double eps);
void check_scale_bias_relu_inputs(const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& bias);
void check_relu_bn_backward_reduce_inputs(const at::Tensor& grad_out,
                                          const std::optional<at::Tensor>& out,
                                          const at::Tensor& y, const at::Tensor& mean,
                                          const at::Tensor& invstd);
void check_bn_backward_apply_inputs(const at::Tensor& grad_out,
                                    const std::optional<at::Tensor>& out, const at::Tensor& y,
                                    const at::Tensor& mean, const at::Tensor& invstd,
                                    const std::optional<at::Tensor>& weight,
                                    const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat);

namespace {

constexpr const char* kStatsName = "sdkernels::bn_stats";
constexpr const char* kSbrName = "sdkernels::scale_bias_relu";
constexpr const char* kReduceName = "sdkernels::relu_bn_backward_reduce";
constexpr const char* kApplyName = "sdkernels::bn_backward_apply";

using cuda_host::check_on_cuda;
using cuda_host::cptr;
using cuda_host::CudaType;
using cuda_host::Geometry;
using cuda_host::geometry_of;
using cuda_host::mptr;
using cuda_host::stats_type;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// --- bn_stats -------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x,
                                                 const std::optional<at::Tensor>& running_mean,
                                                 const std::optional<at::Tensor>& running_var,
                                                 double momentum, double eps) {
  check_bn_stats_inputs(x, running_mean, running_var, momentum, eps);
  check_on_cuda(kStatsName, "x", x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Geometry g = geometry_of(x);
  const at::ScalarType acc_type = stats_type(x.scalar_type());
  const at::TensorOptions sopts = x.options().dtype(acc_type);
  if (g.numel == 0) {
    // M == 0: mean 0, invstd 1 / sqrt(eps) (computed as the reference does), running
    // statistics untouched. No sdkernels kernel runs.
    return {at::zeros({g.C}, sopts), at::full({g.C}, eps, sopts).rsqrt_()};
  }

  const at::Tensor xc = x.contiguous(g.format);
  at::Tensor mean = at::empty({g.C}, sopts);
  at::Tensor invstd = at::empty({g.C}, sopts);

  // The kernel updates float32 running statistics (or float64 ones for float64 x) in
  // place; any other dtype combination goes through acc-dtype copies written back after.
  const bool update = running_mean.has_value();
  at::Tensor rm, rv;
  bool copy_back = false;
  if (update) {
    rm = *running_mean;
    rv = *running_var;
    const at::ScalarType rt = rm.scalar_type();
    const bool direct = rt == rv.scalar_type() && (rt == at::kFloat || rt == acc_type);
    if (!direct) {
      rm = running_mean->to(acc_type).contiguous();
      rv = running_var->to(acc_type).contiguous();
      copy_back = true;
    }
  }

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kStatsName, [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = acc_type_t<scalar_t>;
    // Shape-only plan (channel_plan.h): aligned and misaligned x sum in one order.
    const cuda::ChannelReducePlan plan = cuda::plan_channel_reduce(
        g.numel, g.C, g.inner, g.channels_last, static_cast<int>(sizeof(cuda_t)));
    at::Tensor ws = at::empty({2 * plan.splits * g.C}, sopts);
    acc_t* const ws_p = ws.mutable_data_ptr<acc_t>();
    acc_t* const mean_p = mean.mutable_data_ptr<acc_t>();
    acc_t* const invstd_p = invstd.mutable_data_ptr<acc_t>();
    if (!update) {
      SDKERNELS_CUDA_CHECK(kStatsName, (cuda::launch_bn_stats<cuda_t, acc_t, acc_t>(
                                           cptr<scalar_t>(xc), g.numel, g.C, g.inner,
                                           g.channels_last, plan, ws_p, momentum, eps,
                                           mean_p, invstd_p, nullptr, nullptr, stream)));
    } else if (rm.scalar_type() == at::kFloat) {
      SDKERNELS_CUDA_CHECK(kStatsName, (cuda::launch_bn_stats<cuda_t, acc_t, float>(
                                           cptr<scalar_t>(xc), g.numel, g.C, g.inner,
                                           g.channels_last, plan, ws_p, momentum, eps,
                                           mean_p, invstd_p, rm.mutable_data_ptr<float>(),
                                           rv.mutable_data_ptr<float>(), stream)));
    } else {
      // Running statistics in the accumulation dtype, float64 (float64 x).
      SDKERNELS_CUDA_CHECK(kStatsName, (cuda::launch_bn_stats<cuda_t, acc_t, acc_t>(
                                           cptr<scalar_t>(xc), g.numel, g.C, g.inner,
                                           g.channels_last, plan, ws_p, momentum, eps,
                                           mean_p, invstd_p, rm.mutable_data_ptr<acc_t>(),
                                           rv.mutable_data_ptr<acc_t>(), stream)));
    }
  });
  if (copy_back) {
    running_mean->copy_(rm);
    running_var->copy_(rv);
  }
  return {mean, invstd};
}

// --- scale_bias_relu ------------------------------------------------------------------

at::Tensor scale_bias_relu_cuda(const at::Tensor& x, const at::Tensor& scale,
                                const at::Tensor& bias) {
  check_scale_bias_relu_inputs(x, scale, bias);
  check_on_cuda(kSbrName, "x", x);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Geometry g = geometry_of(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(g.format));
  if (g.numel == 0) return out;

  const at::Tensor xc = x.contiguous(g.format);
  const at::Tensor sc = scale.contiguous();
  const at::Tensor bc = bias.contiguous();
  const bool float_params = scale.scalar_type() == at::kFloat;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kSbrName, [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    if (float_params) {
      SDKERNELS_CUDA_CHECK(kSbrName, (cuda::launch_scale_bias_relu_forward<cuda_t, float>(
                                         cptr<scalar_t>(xc), sc.const_data_ptr<float>(),
                                         bc.const_data_ptr<float>(), mptr<scalar_t>(out),
                                         g.numel, g.C, g.inner, g.channels_last, stream)));
    } else {
      SDKERNELS_CUDA_CHECK(kSbrName, (cuda::launch_scale_bias_relu_forward<cuda_t, cuda_t>(
                                         cptr<scalar_t>(xc), cptr<scalar_t>(sc),
                                         cptr<scalar_t>(bc), mptr<scalar_t>(out), g.numel,
                                         g.C, g.inner, g.channels_last, stream)));
    }
  });
  return out;
}

// --- relu_bn_backward_reduce ------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_bn_backward_reduce_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& invstd, bool want_dy) {
  check_relu_bn_backward_reduce_inputs(grad_out, out, y, mean, invstd);
  check_on_cuda(kReduceName, "y", y);
  const c10::cuda::CUDAGuard device_guard(y.device());
  const Geometry g = geometry_of(y);
  const at::TensorOptions sopts = y.options().dtype(stats_type(y.scalar_type()));
  at::Tensor sum_dy = at::empty({g.C}, sopts);
  at::Tensor sum_dy_xhat = at::empty({g.C}, sopts);
  at::Tensor dy = want_dy ? at::empty(y.sizes(), y.options().memory_format(g.format))
                          : at::empty({0}, y.options());
  if (g.numel == 0) {
    sum_dy.zero_();
    sum_dy_xhat.zero_();
    return {sum_dy, sum_dy_xhat, dy};
  }

  const at::Tensor goc = grad_out.contiguous(g.format);
  const at::Tensor oc = out.has_value() ? out->contiguous(g.format) : at::Tensor();
  const at::Tensor yc = y.contiguous(g.format);
  const at::Tensor mc = mean.contiguous();
  const at::Tensor ic = invstd.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), kReduceName, [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = acc_type_t<scalar_t>;
    // Shape-only plan (channel_plan.h): aligned and misaligned inputs sum in one order.
    const cuda::ChannelReducePlan plan = cuda::plan_channel_reduce(
        g.numel, g.C, g.inner, g.channels_last, static_cast<int>(sizeof(cuda_t)));
    at::Tensor ws = at::empty({2 * plan.splits * g.C}, sopts);
    SDKERNELS_CUDA_CHECK(
        kReduceName,
        (cuda::launch_relu_bn_backward_reduce<cuda_t, acc_t>(
            cptr<scalar_t>(goc), oc.defined() ? cptr<scalar_t>(oc) : nullptr,
            cptr<scalar_t>(yc), mc.const_data_ptr<acc_t>(), ic.const_data_ptr<acc_t>(),
            want_dy ? mptr<scalar_t>(dy) : nullptr, g.numel, g.C, g.inner, g.channels_last,
            plan, ws.mutable_data_ptr<acc_t>(), sum_dy.mutable_data_ptr<acc_t>(),
            sum_dy_xhat.mutable_data_ptr<acc_t>(), stream)));
  });
  return {sum_dy, sum_dy_xhat, dy};
}

// --- bn_backward_apply ------------------------------------------------------------------

at::Tensor bn_backward_apply_cuda(const at::Tensor& grad_out,
                                  const std::optional<at::Tensor>& out, const at::Tensor& y,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  const std::optional<at::Tensor>& weight,
                                  const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat) {
  check_bn_backward_apply_inputs(grad_out, out, y, mean, invstd, weight, sum_dy, sum_dy_xhat);
  check_on_cuda(kApplyName, "y", y);
  const c10::cuda::CUDAGuard device_guard(y.device());
  const Geometry g = geometry_of(y);
  at::Tensor grad_y = at::empty(y.sizes(), y.options().memory_format(g.format));
  if (g.numel == 0) return grad_y;

  const at::Tensor goc = grad_out.contiguous(g.format);
  const at::Tensor oc = out.has_value() ? out->contiguous(g.format) : at::Tensor();
  const at::Tensor yc = y.contiguous(g.format);
  const at::Tensor mc = mean.contiguous();
  const at::Tensor ic = invstd.contiguous();
  const at::Tensor wc = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor sdc = sum_dy.contiguous();
  const at::Tensor sxc = sum_dy_xhat.contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), kApplyName, [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    using acc_t = acc_type_t<scalar_t>;
    SDKERNELS_CUDA_CHECK(
        kApplyName,
        (cuda::launch_bn_backward_apply<cuda_t, acc_t>(
            cptr<scalar_t>(goc), oc.defined() ? cptr<scalar_t>(oc) : nullptr,
            cptr<scalar_t>(yc), mc.const_data_ptr<acc_t>(), ic.const_data_ptr<acc_t>(),
            wc.defined() ? wc.const_data_ptr<acc_t>() : nullptr, sdc.const_data_ptr<acc_t>(),
            sxc.const_data_ptr<acc_t>(), mptr<scalar_t>(grad_y), g.numel, g.C, g.inner,
            g.channels_last, stream)));
  });
  return grad_y;
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, CUDA, m) {
  m.impl("bn_stats", &sdkernels::bn_stats_cuda);
  m.impl("scale_bias_relu", &sdkernels::scale_bias_relu_cuda);
  m.impl("relu_bn_backward_reduce", &sdkernels::relu_bn_backward_reduce_cuda);
  m.impl("bn_backward_apply", &sdkernels::bn_backward_apply_cuda);
}
