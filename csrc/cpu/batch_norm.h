// Entry points of csrc/cpu/batch_norm.cpp for other CPU kernels (the fused branch).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sdkernels {

// sdkernels::bn_backward_apply, written into `dest` when it is defined (y's shape, dtype
// and memory format; it may be grad_out itself), else into a new tensor. Returns grad_y.
at::Tensor bn_backward_apply_into(const at::Tensor& grad_out,
                                  const std::optional<at::Tensor>& out, const at::Tensor& y,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  const std::optional<at::Tensor>& weight,
                                  const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                  const at::Tensor& dest);

}  // namespace sdkernels
