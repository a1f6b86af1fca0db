// CPU kernel of sdkernels::scale_bias_relu: out = relu(x * scale[c] + bias[c]).
//
// NCHW-contiguous and channels-last-like x are walked in place (layout.h); any other
// strides are first copied to x's suggested memory format, which the output keeps.
// Math in float (double for float64 x); scale and bias may be x's dtype or float32.
// One pass: reads x, writes out. Its gradient is scale_bias_add_relu_backward's
// (registered in sdkernels/ops/extension.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/layout.h"

namespace sdkernels {

// Defined in csrc/sdkernels.cpp (shared by every backend).
void check_scale_bias_relu_inputs(const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& bias);

namespace {

// `v < 0 ? 0 : v` keeps NaN, like torch.relu.

// NCHW rows: `nrows` rows of `inner` values, the first of channel c0.
template <typename scalar_t, typename opmath_t>
SDKERNELS_CPU_CLONES
void rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
          const opmath_t* __restrict__ s, const opmath_t* __restrict__ b, int64_t C,
          int64_t c0, int64_t inner, int64_t nrows) {
  int64_t c = c0;
  for (int64_t r = 0; r < nrows; ++r) {
    const opmath_t sc = s[c], bc = b[c];
    const int64_t o = r * inner;
    for (int64_t j = 0; j < inner; ++j) {
      const opmath_t v = static_cast<opmath_t>(x[o + j]) * sc + bc;
      cpu::store(&out[o + j], v < opmath_t(0) ? opmath_t(0) : v);
    }
    if (++c == C) c = 0;
  }
}

// Channels last: n values from a period boundary, scale and bias tiled to the period P.
template <typename scalar_t, typename opmath_t>
SDKERNELS_CPU_CLONES
void periods(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
             const opmath_t* __restrict__ s, const opmath_t* __restrict__ b, int64_t P,
             int64_t n) {
  for (int64_t p = 0; p < n; p += P) {
    const int64_t len = std::min(P, n - p);
    for (int64_t j = 0; j < len; ++j) {
      const opmath_t v = static_cast<opmath_t>(x[p + j]) * s[j] + b[j];
      cpu::store(&out[p + j], v < opmath_t(0) ? opmath_t(0) : v);
    }
  }
}

at::Tensor scale_bias_relu_cpu(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& bias) {
  check_scale_bias_relu_inputs(x, scale, bias);
  const cpu::Geometry g = cpu::geometry_of(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(g.format));
  if (g.numel == 0) return out;

  const at::Tensor xc = x.contiguous(g.format);
  const int64_t len = g.rows_of_channels ? g.period : g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "sdkernels::scale_bias_relu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const std::vector<opmath_t> s = cpu::per_channel<opmath_t>(scale, len);
    const std::vector<opmath_t> b = cpu::per_channel<opmath_t>(bias, len);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    cpu::for_each_span(
        g,
        [&](int64_t r0, int64_t r1) {
          const int64_t off = r0 * g.inner;
          rows<scalar_t, opmath_t>(xp + off, op + off, s.data(), b.data(), g.C, r0 % g.C,
                                   g.inner, r1 - r0);
        },
        [&](int64_t off, int64_t n) {
          periods<scalar_t, opmath_t>(xp + off, op + off, s.data(), b.data(), g.period, n);
        });
  });
  return out;
}

// scale_bias_relu_: x = relu(x * scale[c] + bias[c] (+ residual)) in place. The eval
// epilogue after a plain convolution: writing into the convolution's own output saves
// allocating a fresh activation per stage, whose first touch (page faults) costs more
// than the pass itself on CPU. x is read and written at the same index only; the
// residual may be x itself, so neither pointer is __restrict__.
template <typename scalar_t, typename opmath_t, bool kRes>
SDKERNELS_CPU_CLONES
void rows_inplace(scalar_t* x, const scalar_t* r, const opmath_t* __restrict__ s,
                  const opmath_t* __restrict__ b, int64_t C, int64_t c0, int64_t inner,
                  int64_t nrows) {
  int64_t c = c0;
  for (int64_t row = 0; row < nrows; ++row) {
    const opmath_t sc = s[c], bc = b[c];
    const int64_t o = row * inner;
    for (int64_t j = 0; j < inner; ++j) {
      opmath_t v = static_cast<opmath_t>(x[o + j]) * sc + bc;
      if constexpr (kRes) v += static_cast<opmath_t>(r[o + j]);
      cpu::store(&x[o + j], v < opmath_t(0) ? opmath_t(0) : v);
    }
    if (++c == C) c = 0;
  }
}

template <typename scalar_t, typename opmath_t, bool kRes>
SDKERNELS_CPU_CLONES
void periods_inplace(scalar_t* x, const scalar_t* r,
                     const opmath_t* __restrict__ s, const opmath_t* __restrict__ b, int64_t P,
                     int64_t n) {
  for (int64_t p = 0; p < n; p += P) {
    const int64_t len = std::min(P, n - p);
    for (int64_t j = 0; j < len; ++j) {
      opmath_t v = static_cast<opmath_t>(x[p + j]) * s[j] + b[j];
      if constexpr (kRes) v += static_cast<opmath_t>(r[p + j]);
      cpu::store(&x[p + j], v < opmath_t(0) ? opmath_t(0) : v);
    }
  }
}

void scale_bias_relu_inplace_cpu(const at::Tensor& x, const at::Tensor& scale,
                                        const at::Tensor& bias,
                                        const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "sdkernels::scale_bias_relu_";
  check_scale_bias_relu_inputs(x, scale, bias);
  const cpu::Geometry g = cpu::geometry_of(x);
  TORCH_CHECK(x.is_contiguous(g.format), op,
              ": expected x dense in its memory format (NCHW-contiguous or channels_last), "
              "got strides ", x.strides());
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                op, ": expected residual with x's shape ", x.sizes(), ", dtype and device, got ",
                residual->sizes(), " ", residual->scalar_type());
    rc = residual->contiguous(g.format);
    TORCH_CHECK(!rc.is_alias_of(x) || rc.is_same(x), op,
                ": residual must not overlap x (other than being x itself)");
  }
  // Autograd (and anyone holding x) sees the mutation; a no-op on inference tensors.
  if (!c10::InferenceMode::is_enabled() || !x.is_inference()) {
    x.unsafeGetTensorImpl()->bump_version();
  }
  if (g.numel == 0) return;
  const int64_t len = g.rows_of_channels ? g.period : g.C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const std::vector<opmath_t> s = cpu::per_channel<opmath_t>(scale, len);
    const std::vector<opmath_t> b = cpu::per_channel<opmath_t>(bias, len);
    scalar_t* xp = x.mutable_data_ptr<scalar_t>();
    const scalar_t* rp = rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr;
    cpu::for_each_span(
        g,
        [&](int64_t r0, int64_t r1) {
          const int64_t off = r0 * g.inner;
          if (rp) {
            rows_inplace<scalar_t, opmath_t, true>(xp + off, rp + off, s.data(), b.data(), g.C,
                                                   r0 % g.C, g.inner, r1 - r0);
          } else {
            rows_inplace<scalar_t, opmath_t, false>(xp + off, nullptr, s.data(), b.data(), g.C,
                                                    r0 % g.C, g.inner, r1 - r0);
          }
        },
        [&](int64_t off, int64_t n) {
          if (rp) {
            periods_inplace<scalar_t, opmath_t, true>(xp + off, rp + off, s.data(), b.data(),
                                                      g.period, n);
          } else {
            periods_inplace<scalar_t, opmath_t, false>(xp + off, nullptr, s.data(), b.data(),
                                                       g.period, n);
          }
        });
  });
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, CPU, m) {
  m.impl("scale_bias_relu", &sdkernels::scale_bias_relu_cpu);
  m.impl("scale_bias_relu_", &sdkernels::scale_bias_relu_inplace_cpu);
}

namespace sdkernels {
namespace {

// scale_bias_relu_ is an eval-time op without a derivative. autograd's not-implemented
// fallback attaches nothing to an op returning (), which would leave x's old grad_fn in
// place and give silently wrong gradients; so with grad mode on and any input requiring
// grad this raises, and otherwise it goes straight to the backend kernel (which bumps
// x's version counter itself).
void scale_bias_relu_inplace_autograd(const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& bias,
                                      const std::optional<at::Tensor>& residual) {
  const bool needs_grad =
      x.requires_grad() || scale.requires_grad() || bias.requires_grad() ||
      (residual.has_value() && residual->defined() && residual->requires_grad());
  TORCH_CHECK(!(at::GradMode::is_enabled() && needs_grad),
              "sdkernels::scale_bias_relu_: not differentiable (an in-place eval epilogue); "
              "call it under torch.no_grad() or on tensors that do not require grad");
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdkernels::scale_bias_relu_", "")
                       .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&)>();
  op.call(x, scale, bias, residual);
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, Autograd, m) {
  m.impl("scale_bias_relu_", &sdkernels::scale_bias_relu_inplace_autograd);
}
