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
}
