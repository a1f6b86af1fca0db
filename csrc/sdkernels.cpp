// sdkernels._C: declares the sdkernels ops once and holds the input checks every
// backend shares. Backends implement the ops with TORCH_LIBRARY_IMPL in
// csrc/cpu/*.cpp (always built) and csrc/cuda/*_cuda.cpp (built with CUDA).
//
// The Python module is an empty stub (as in pytorch/extension-cpp): importing
// sdkernels._C loads this shared library, and its static initialisers register the
// ops with the dispatcher. Fake kernels and autograd live in sdkernels/ops/extension.py.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

extern "C" {
// Empty module: `import sdkernels._C` only has to load the library.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // m_name
      "sdkernels compiled ops; use torch.ops.sdkernels.*",  // m_doc
      -1,  // m_size
      nullptr,  // m_methods
  };
  return PyModule_Create(&module_def);
}
}

namespace sdkernels {

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// scale (and bias) are 1-D of length C with x's dtype or float32.
void check_per_channel(const char* op, const char* name, const at::Tensor& v,
                       const at::Tensor& x) {
  TORCH_CHECK(v.layout() == at::kStrided, op, ": expected ", name,
              " to be a strided (dense) tensor, got layout ", v.layout());
  TORCH_CHECK(v.device() == x.device(), op, ": expected ", name,
              " on the same device as x (", x.device(), "), got ", v.device());
  TORCH_CHECK(v.dim() == 1, op, ": expected ", name, " to be 1-D of length C = ",
              x.size(1), ", got a ", v.dim(), "-D tensor of shape ", v.sizes());
  TORCH_CHECK(v.size(0) == x.size(1), op, ": expected ", name, " of length C = ",
              x.size(1), " (x.shape[1]), got length ", v.size(0));
  TORCH_CHECK(v.scalar_type() == x.scalar_type() || v.scalar_type() == at::kFloat,
              op, ": expected ", name, " to have x's dtype (", x.scalar_type(),
              ") or float32, got ", v.scalar_type());
}

// Same shape, dtype and device as x (any strides).
void check_like_x(const char* op, const char* name, const at::Tensor& t,
                  const at::Tensor& x) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": expected ", name,
              " to be a strided (dense) tensor, got layout ", t.layout());
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name,
              " on the same device as x (", x.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": expected ", name,
              " to have x's dtype (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": expected ", name,
              " to have x's shape ", x.sizes(), ", got ", t.sizes());
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.layout() == at::kStrided, op,
              ": expected x to be a strided (dense) tensor, got layout ", x.layout());
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op,
              ": expected x to be float32, float64, bfloat16 or float16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, op,
              ": expected x of shape [N, C, *] (at least 2-D), got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
}

}  // namespace

// Shared input validation; declared again (extern) in each backend file.
void check_scale_bias_add_relu_inputs(const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& bias,
                                      const at::Tensor& residual) {
  constexpr const char* op = "sdkernels::scale_bias_add_relu";
  check_x(op, x);
  check_like_x(op, "residual", residual, x);
  check_per_channel(op, "scale", scale, x);
  check_per_channel(op, "bias", bias, x);
  TORCH_CHECK(bias.scalar_type() == scale.scalar_type(), op,
              ": expected scale and bias to have the same dtype, got ",
              scale.scalar_type(), " and ", bias.scalar_type());
}

void check_scale_bias_add_relu_backward_inputs(const at::Tensor& grad_out,
                                               const at::Tensor& out,
                                               const at::Tensor& x,
                                               const at::Tensor& scale) {
  constexpr const char* op = "sdkernels::scale_bias_add_relu_backward";
  check_x(op, x);
  check_like_x(op, "grad_out", grad_out, x);
  check_like_x(op, "out", out, x);
  check_per_channel(op, "scale", scale, x);
}

// Per-channel statistics (mean, invstd) and BN parameters: 1-D of length C, float32 for
// float32/float16/bfloat16 x, float64 for float64 x (the kernels' accumulation dtype).
void check_stat(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  check_per_channel(op, name, v, x);
  const at::ScalarType want = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(v.scalar_type() == want, op, ": expected ", name, " to be ", want,
              " (the statistics dtype for ", x.scalar_type(), " x), got ", v.scalar_type());
}

void check_bn_stats_inputs(const at::Tensor& x,
                           const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, double momentum,
                           double eps) {
  constexpr const char* op = "sdkernels::bn_stats";
  check_x(op, x);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": expected running_mean and running_var to be both given or both None");
  if (running_mean.has_value()) {
    check_per_channel(op, "running_mean", *running_mean, x);
    check_per_channel(op, "running_var", *running_var, x);
    TORCH_CHECK(running_mean->is_contiguous() && running_var->is_contiguous(), op,
                ": expected contiguous running_mean and running_var (updated in place)");
  }
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, op,
              ": expected momentum in [0, 1], got ", momentum);
  TORCH_CHECK(eps > 0.0, op, ": expected eps > 0, got ", eps);
}

void check_scale_bias_relu_inputs(const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& bias) {
  constexpr const char* op = "sdkernels::scale_bias_relu";
  check_x(op, x);
  check_per_channel(op, "scale", scale, x);
  check_per_channel(op, "bias", bias, x);
  TORCH_CHECK(bias.scalar_type() == scale.scalar_type(), op,
              ": expected scale and bias to have the same dtype, got ",
              scale.scalar_type(), " and ", bias.scalar_type());
}

void check_relu_bn_backward_reduce_inputs(const at::Tensor& grad_out,
                                          const std::optional<at::Tensor>& out,
                                          const at::Tensor& y, const at::Tensor& mean,
                                          const at::Tensor& invstd) {
  constexpr const char* op = "sdkernels::relu_bn_backward_reduce";
  check_x(op, y);
  check_like_x(op, "grad_out", grad_out, y);
  if (out.has_value()) check_like_x(op, "out", *out, y);
  check_stat(op, "mean", mean, y);
  check_stat(op, "invstd", invstd, y);
}

void check_bn_backward_apply_inputs(const at::Tensor& grad_out,
                                    const std::optional<at::Tensor>& out,
                                    const at::Tensor& y, const at::Tensor& mean,
                                    const at::Tensor& invstd,
                                    const std::optional<at::Tensor>& weight,
                                    const at::Tensor& sum_dy,
                                    const at::Tensor& sum_dy_xhat) {
  constexpr const char* op = "sdkernels::bn_backward_apply";
  check_x(op, y);
  check_like_x(op, "grad_out", grad_out, y);
  if (out.has_value()) check_like_x(op, "out", *out, y);
  check_stat(op, "mean", mean, y);
  check_stat(op, "invstd", invstd, y);
  if (weight.has_value()) check_stat(op, "weight", *weight, y);
  check_stat(op, "sum_dy", sum_dy, y);
  check_stat(op, "sum_dy_xhat", sum_dy_xhat, y);
}

}  // namespace sdkernels

TORCH_LIBRARY(sdkernels, m) {
  // out = relu(x * scale[c] + bias[c] + residual), x: [N, C, *], channel dim 1.
  m.def(
      "scale_bias_add_relu(Tensor x, Tensor scale, Tensor bias, Tensor residual) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Returns (grad_x, grad_scale, grad_bias, grad_residual).
  m.def(
      "scale_bias_add_relu_backward(Tensor grad_out, Tensor out, Tensor x, "
      "Tensor scale) -> (Tensor, Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // --- Training-mode BN, decomposed as in design §5 (ops below) --------------------
  // Per-channel batch statistics of x [N, C, *] over M = N * prod(shape[2:]) values:
  // returns (mean, invstd = 1 / sqrt(var + eps)), var biased, in the statistics dtype
  // (float32, or float64 for float64 x). When running_mean/running_var are given they
  // are updated in place as nn.BatchNorm does: r = (1 - momentum) * r + momentum * s,
  // with the unbiased variance var * M / (M - 1) (M == 1: var itself). M == 0: mean 0,
  // invstd 1 / sqrt(eps), running statistics untouched.
  m.def(
      "bn_stats(Tensor x, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "float momentum, float eps) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // out = relu(x * scale[c] + bias[c]): BN apply + ReLU inside a residual branch.
  m.def("scale_bias_relu(Tensor x, Tensor scale, Tensor bias) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // In place: x = relu(x * scale[c] + bias[c] + residual) (residual optional): the eval
  // epilogue written into a convolution's output (CPU). x must be dense in its memory
  // format; residual has x's shape and dtype. Returns nothing (PT2 functionalizes
  // custom in-place ops only without aliased returns). Not differentiable.
  m.def(
      "scale_bias_relu_(Tensor(a!) x, Tensor scale, Tensor bias, Tensor? residual=None) "
      "-> ()",
      {at::Tag::pt2_compliant_tag});
  // BN-backward reductions behind an optional ReLU: dy = grad_out where out > 0 (all of
  // grad_out when out is None), xhat = (y - mean[c]) * invstd[c]. Returns
  // (sum_dy[c], sum_dy_xhat[c], dy): sums in the statistics dtype; dy is materialised
  // (y's shape, dtype and memory format) when want_dy, else an empty tensor of shape [0].
  m.def(
      "relu_bn_backward_reduce(Tensor grad_out, Tensor? out, Tensor y, Tensor mean, "
      "Tensor invstd, bool want_dy) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // BN-backward apply: grad_y = weight[c] * invstd[c] * (dy - sum_dy[c] / M
  //                                 - xhat * sum_dy_xhat[c] / M)
  // with dy and xhat as above, M = numel / C, weight = gamma (times the gate scale) or 1
  // when None. M == 0 gives an empty grad_y.
  m.def(
      "bn_backward_apply(Tensor grad_out, Tensor? out, Tensor y, Tensor mean, "
      "Tensor invstd, Tensor? weight, Tensor sum_dy, Tensor sum_dy_xhat) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // A 4-D tensor copied to channels_last (channels_last=True) or NCHW-contiguous
  // layout: x.contiguous(memory_format), always a new tensor.
  m.def("relayout(Tensor x, bool channels_last) -> Tensor", {at::Tag::pt2_compliant_tag});
  // --- A whole residual branch in training (CPU; sdkernels/ops/fused_block.py) ---------
  // Stage i of n: y_i = conv_i(a_{i-1}) (a_0 = x; weights[i], strides/paddings/
  // dilations[2i:2i+2], groups[i], no bias), batch statistics of y_i (running stats
  // updated in place when given: both lists empty or both of length n), then
  // a_i = relu(BN_i(y_i)) for i < n-1 and
  //   out = relu(residual + gate_scale * BN_{n-1}(y_{n-1}))   (residual None: x).
  // Returns (out in x's memory format, saved = [y_0..y_{n-1}, mean_0.., invstd_0..]).
  // Not tagged pt2_compliant: PT2 cannot functionalize a mutating op that returns a
  // Tensor[] (yet); under torch.compile the blocks run their modules instead.
  m.def(
      "residual_branch_forward(Tensor x, Tensor? residual, Tensor[] weights, "
      "Tensor?[] bn_weights, Tensor?[] bn_biases, Tensor(a!)[] running_means, "
      "Tensor(b!)[] running_vars, int[] strides, int[] paddings, int[] dilations, "
      "int[] groups, float[] momentums, float[] eps, float gate_scale) "
      "-> (Tensor, Tensor[])");
  // Its backward from what the forward saved (the BN outputs and activations are
  // recomputed). output_mask = [x, residual, then (weight, bn_weight, bn_bias) per
  // stage]. Returns (grad_x, grad_residual, grad_weights, grad_bn_weights,
  // grad_bn_biases); gradients not asked for (or of absent parameters) are empty [0]
  // tensors. With residual None (identity) grad_x includes the shortcut's gradient.
  m.def(
      "residual_branch_backward(Tensor grad_out, Tensor x, Tensor out, Tensor[] saved, "
      "Tensor[] weights, Tensor?[] bn_weights, Tensor?[] bn_biases, int[] strides, "
      "int[] paddings, int[] dilations, int[] groups, float gate_scale, "
      "bool identity_residual, bool[] output_mask) "
      "-> (Tensor, Tensor, Tensor[], Tensor[], Tensor[])",
      {at::Tag::pt2_compliant_tag});
}
