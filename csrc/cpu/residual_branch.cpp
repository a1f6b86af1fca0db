// CPU implementation of sdkernels::residual_branch_forward / residual_branch_backward:
// a whole residual branch (conv -> BN -> ReLU -> ... -> conv -> BN, gate scale,
// residual add, ReLU) in training mode, in one call each way.
//
// What it fuses: nothing new numerically; it is the recomputing decomposition of
// sdkernels/ops/fused_block.py (design §5) moved below Python. Per step the Python
// version issued ~40 small ops (folding BN into scale/shift, casts, layout copies) at
// 5-10 us each, about as long as the elementwise work itself on CIFAR-sized blocks;
// here the per-channel folding is a loop over C values, layout conversions use the
// tiled transpose (cpu/relayout.h), and the convolutions go straight to ATen
// (oneDNN), so what is left is the convolutions plus one pass per elementwise op.
//
// Forward:  y_i = conv_i(a_{i-1}); (mean_i, invstd_i) = bn_stats(y_i) (+ running stats);
//           a_i = scale_bias_relu(y_i, k_i, t_i); out = scale_bias_add_relu(y_L, s k_L,
//           s t_L, residual). Saves x, out, y_i, mean_i, invstd_i (never a_i).
// Backward: relu_bn_backward_reduce + bn_backward_apply per stage, a_{i-1} recomputed
//           by scale_bias_relu, then ATen's convolution_backward (dgrad + wgrad).
// Layout: 4-D tensors are computed in channels_last (oneDNN's fast layout on CPU);
//         out and the input/residual gradients keep the layout of x/residual.
// Limits: CPU tensors, 4-D, convolutions without bias or transposition; float32,
//         float64, bfloat16, float16 (the sdkernels ops' dtypes). The Python wrapper
//         sends everything else to the module path. Not differentiable itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/batch_norm.h"
#include "cpu/layout.h"
#include "cpu/relayout.h"

namespace sdkernels {
namespace {

constexpr const char* kFwd = "sdkernels::residual_branch_forward";
constexpr const char* kBwd = "sdkernels::residual_branch_backward";
constexpr auto kCL = at::MemoryFormat::ChannelsLast;

using Opt = std::optional<at::Tensor>;

// The sdkernels ops, called through the dispatcher (their CPU kernels live in other
// files); handles are looked up once.
std::tuple<at::Tensor, at::Tensor> bn_stats(const at::Tensor& y, const Opt& rm, const Opt& rv,
                                            double momentum, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdkernels::bn_stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const Opt&, const Opt&, double, double)>();
  return op.call(y, rm, rv, momentum, eps);
}

at::Tensor scale_bias_relu(const at::Tensor& y, const at::Tensor& s, const at::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdkernels::scale_bias_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&)>();
  return op.call(y, s, b);
}

at::Tensor scale_bias_add_relu(const at::Tensor& y, const at::Tensor& s, const at::Tensor& b,
                               const at::Tensor& r) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdkernels::scale_bias_add_relu", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&)>();
  return op.call(y, s, b, r);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_bn_backward_reduce(
    const at::Tensor& g, const Opt& out, const at::Tensor& y, const at::Tensor& mean,
    const at::Tensor& invstd, bool want_dy) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sdkernels::relu_bn_backward_reduce", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const Opt&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(g, out, y, mean, invstd, want_dy);
}

// The layout results keep: channels_last only when x is stored that way and not also
// plain contiguous (as fused_block._layout).
at::MemoryFormat layout_of(const at::Tensor& x) {
  return (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(kCL))
             ? kCL
             : at::MemoryFormat::Contiguous;
}

// acc += (act > 0 ? g : 0): the identity shortcut's share of the input gradient (the
// ReLU-masked output gradient), added without materialising it. All three tensors have
// the same dense layout.
template <typename scalar_t>
SDKERNELS_CPU_CLONES
void relu_grad_add_span(scalar_t* __restrict__ acc, const scalar_t* __restrict__ g,
                        const scalar_t* __restrict__ act, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) {
    const opmath_t v = static_cast<opmath_t>(acc[j]) +
                       (static_cast<opmath_t>(act[j]) > opmath_t(0) ? static_cast<opmath_t>(g[j])
                                                                    : opmath_t(0));
    cpu::store(&acc[j], v);
  }
}

void relu_grad_add_(at::Tensor& acc, const at::Tensor& g, const at::Tensor& act) {
  const bool same = acc.strides() == g.strides() && acc.strides() == act.strides() &&
                    acc.is_non_overlapping_and_dense();
  if (!same) {
    acc.add_(g * act.gt(0));  // layouts differ (not on the fused path's own tensors)
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(),
                                  "sdkernels::relu_grad_add_", [&] {
    scalar_t* ap = acc.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* op = act.const_data_ptr<scalar_t>();
    at::parallel_for(0, acc.numel(), cpu::kGrain, [&](int64_t b, int64_t e) {
      relu_grad_add_span(ap + b, gp + b, op + b, e - b);
    });
  });
}

struct Conv {
  std::array<int64_t, 2> stride, padding, dilation;
  int64_t groups;
};

void check_list_len(const char* op, const char* name, size_t got, size_t want) {
  TORCH_CHECK(got == want, op, ": expected ", name, " to have ", want, " entries, got ", got);
}

std::vector<Conv> convs_of(const char* op, size_t n, at::IntArrayRef strides,
                           at::IntArrayRef paddings, at::IntArrayRef dilations,
                           at::IntArrayRef groups) {
  check_list_len(op, "strides", strides.size(), 2 * n);
  check_list_len(op, "paddings", paddings.size(), 2 * n);
  check_list_len(op, "dilations", dilations.size(), 2 * n);
  check_list_len(op, "groups", groups.size(), n);
  std::vector<Conv> cs(n);
  for (size_t i = 0; i < n; ++i) {
    cs[i] = {{strides[2 * i], strides[2 * i + 1]},
             {paddings[2 * i], paddings[2 * i + 1]},
             {dilations[2 * i], dilations[2 * i + 1]},
             groups[i]};
  }
  return cs;
}

void check_inputs(const char* op, const at::Tensor& x, at::TensorList weights,
                  const c10::List<Opt>& bn_weights, const c10::List<Opt>& bn_biases) {
  TORCH_CHECK(x.layout() == at::kStrided && x.device().is_cpu(), op,
              ": expected a strided CPU tensor x, got ", x.device(), " ", x.layout());
  TORCH_CHECK(x.dim() == 4, op, ": expected a 4-D input [N, C, H, W], got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                  dt == at::kHalf,
              op, ": expected x to be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(!weights.empty(), op, ": expected at least one stage");
  check_list_len(op, "bn_weights", bn_weights.size(), weights.size());
  check_list_len(op, "bn_biases", bn_biases.size(), weights.size());
  for (const auto& w : weights) {
    TORCH_CHECK(w.dim() == 4 && w.device() == x.device() && w.scalar_type() == dt, op,
                ": expected 4-D convolution weights with x's dtype (", dt, ") and device, got ",
                w.scalar_type(), " of shape ", w.sizes(), " on ", w.device());
  }
}

// Per-channel (scale, shift) of BN apply with the gate scale folded in, in the
// statistics dtype: scale = s * gamma * invstd, shift = s * (beta - mean * gamma * invstd).
std::pair<at::Tensor, at::Tensor> fold(const at::Tensor& mean, const at::Tensor& invstd,
                                       const Opt& gamma, const Opt& beta, double s) {
  const auto st = mean.scalar_type();
  at::Tensor scale = at::empty_like(mean), shift = at::empty_like(mean);
  const at::Tensor g = gamma.has_value() ? gamma->to(st).contiguous() : at::Tensor();
  const at::Tensor b = beta.has_value() ? beta->to(st).contiguous() : at::Tensor();
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES(st, "sdkernels::residual_branch fold", [&] {
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    const scalar_t* ip = is.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = scale.mutable_data_ptr<scalar_t>();
    scalar_t* hp = shift.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < mean.numel(); ++c) {
      const scalar_t k = gp ? ip[c] * gp[c] : ip[c];
      const scalar_t t = bp ? bp[c] - mp[c] * k : -mp[c] * k;
      sp[c] = static_cast<scalar_t>(s) * k;
      hp[c] = static_cast<scalar_t>(s) * t;
    }
  });
  return {scale, shift};
}

at::Tensor conv(const at::Tensor& h, const at::Tensor& w, const Conv& c) {
  return at::convolution(h, w, std::nullopt, c.stride, c.padding, c.dilation, false, {0, 0},
                         c.groups);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> residual_branch_forward_cpu(
    const at::Tensor& x, const Opt& residual, at::TensorList weights,
    const c10::List<Opt>& bn_weights, const c10::List<Opt>& bn_biases,
    at::TensorList running_means, at::TensorList running_vars, at::IntArrayRef strides,
    at::IntArrayRef paddings, at::IntArrayRef dilations, at::IntArrayRef groups,
    at::ArrayRef<double> momentums, at::ArrayRef<double> eps, double gate_scale) {
  check_inputs(kFwd, x, weights, bn_weights, bn_biases);
  const size_t n = weights.size();
  const std::vector<Conv> cs = convs_of(kFwd, n, strides, paddings, dilations, groups);
  const bool track = !running_means.empty();
  TORCH_CHECK(running_means.size() == running_vars.size() && (!track || running_means.size() == n),
              kFwd, ": expected running_means and running_vars both empty or both with ", n,
              " entries, got ", running_means.size(), " and ", running_vars.size());
  check_list_len(kFwd, "momentums", momentums.size(), n);
  check_list_len(kFwd, "eps", eps.size(), n);
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() && residual->device() == x.device(),
                kFwd, ": expected residual with x's dtype and device");
  }

  const at::Tensor xc = cpu::to_memory_format(x, kCL);
  at::Tensor h = xc;
  std::vector<at::Tensor> ys, means, invstds;
  for (size_t i = 0; i < n; ++i) {
    // With channels_last activations ATen hands oneDNN a channels_last weight, copying
    // an NCHW one with its slow strided copy (~50-100 us for 64x64x3x3, in every
    // forward and backward call); the tiled transpose does it in a fraction of that.
    const at::Tensor y = conv(h, cpu::to_memory_format(weights[i], kCL), cs[i]);
    auto [mean, invstd] = bn_stats(y, track ? Opt(running_means[i]) : std::nullopt,
                                   track ? Opt(running_vars[i]) : std::nullopt, momentums[i],
                                   eps[i]);
    const bool last = i + 1 == n;
    auto [scale, shift] = fold(mean, invstd, bn_weights.get(i), bn_biases.get(i),
                               last ? gate_scale : 1.0);
    if (last) {
      const at::Tensor res = residual.has_value() ? cpu::to_memory_format(*residual, kCL) : xc;
      TORCH_CHECK(res.sizes() == y.sizes(), kFwd, ": expected the residual to have the "
                  "branch output's shape ", y.sizes(), ", got ", res.sizes());
      h = scale_bias_add_relu(y, scale, shift, res);
    } else {
      h = scale_bias_relu(y, scale, shift);
    }
    ys.push_back(y);
    means.push_back(mean);
    invstds.push_back(invstd);
  }
  std::vector<at::Tensor> saved = std::move(ys);
  saved.insert(saved.end(), means.begin(), means.end());
  saved.insert(saved.end(), invstds.begin(), invstds.end());
  return {cpu::to_memory_format(h, layout_of(x)), std::move(saved)};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>>
residual_branch_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& out, at::TensorList saved,
                             at::TensorList weights, const c10::List<Opt>& bn_weights,
                             const c10::List<Opt>& bn_biases, at::IntArrayRef strides,
                             at::IntArrayRef paddings, at::IntArrayRef dilations,
                             at::IntArrayRef groups, double gate_scale,
                             bool identity_residual, const c10::List<bool>& output_mask_list) {
  const std::vector<bool> output_mask = output_mask_list.vec();
  check_inputs(kBwd, x, weights, bn_weights, bn_biases);
  const size_t n = weights.size();
  const std::vector<Conv> cs = convs_of(kBwd, n, strides, paddings, dilations, groups);
  check_list_len(kBwd, "saved", saved.size(), 3 * n);
  check_list_len(kBwd, "output_mask", output_mask.size(), 2 + 3 * n);
  TORCH_CHECK(grad_out.sizes() == out.sizes(), kBwd, ": expected grad_out of shape ",
              out.sizes(), ", got ", grad_out.sizes());
  const at::TensorList ys = saved.slice(0, n), means = saved.slice(n, n),
                       invstds = saved.slice(2 * n, n);
  // The identity shortcut's gradient (ReLU-masked grad_out) is added to the input
  // gradient at the end straight from grad_out and out; only a separate residual needs
  // it materialised.
  const bool want_dy = !identity_residual && output_mask[1];
  auto none = [&]() { return at::empty({0}, x.options()); };

  std::vector<at::Tensor> gws(n), ggammas(n), gbetas(n);
  const at::Tensor g_last = cpu::to_memory_format(grad_out, kCL);
  const at::Tensor act_last = cpu::to_memory_format(out, kCL);
  at::Tensor g = g_last, act = act_last, dy_res, gx;
  for (size_t k = n; k-- > 0;) {
    const bool last = k + 1 == n;
    const double s = last ? gate_scale : 1.0;
    const Opt gamma = bn_weights.get(k), beta = bn_biases.get(k);
    const at::Tensor& y = ys[k];
    const auto st = means[k].scalar_type();
    auto [sum_dy, sum_dy_xhat, dy] =
        relu_bn_backward_reduce(g, act, y, means[k], invstds[k], last && want_dy);
    if (last) dy_res = dy;
    Opt eff_w;
    if (gamma.has_value()) {
      eff_w = s == 1.0 ? gamma->to(st) : gamma->to(st) * s;
    } else if (s != 1.0) {
      eff_w = at::full_like(means[k], s);
    }
    // Earlier stages' g is the dgrad this function computed: its buffer takes grad_y
    // (one activation-sized allocation fewer; fresh pages are what costs on CPU).
    at::Tensor gy = bn_backward_apply_into(g, act, y, means[k], invstds[k], eff_w, sum_dy,
                                           sum_dy_xhat, last ? at::Tensor() : g);
    // Temporaries are dropped as soon as they are dead, so the allocator can hand their
    // memory to the next one instead of growing the heap.
    g = at::Tensor();
    act = at::Tensor();
    if (gamma.has_value() && output_mask[3 + 3 * k]) {
      ggammas[k] = (s == 1.0 ? sum_dy_xhat : sum_dy_xhat * s).to(gamma->scalar_type());
    } else {
      ggammas[k] = none();
    }
    if (beta.has_value() && output_mask[4 + 3 * k]) {
      gbetas[k] = (s == 1.0 ? sum_dy : sum_dy * s).to(beta->scalar_type());
    } else {
      gbetas[k] = none();
    }
    at::Tensor h_in;
    if (k > 0) {
      auto [psc, psh] = fold(means[k - 1], invstds[k - 1], bn_weights.get(k - 1),
                             bn_biases.get(k - 1), 1.0);
      h_in = scale_bias_relu(ys[k - 1], psc, psh);
    } else {
      h_in = cpu::to_memory_format(x, kCL);
    }
    auto [gh, gw, gb] = at::convolution_backward(
        gy, h_in, cpu::to_memory_format(weights[k], kCL), std::vector<int64_t>{0},
        cs[k].stride, cs[k].padding,
        cs[k].dilation, false, {0, 0}, cs[k].groups,
        {k > 0 || output_mask[0], static_cast<bool>(output_mask[2 + 3 * k]), false});
    gy = at::Tensor();
    // oneDNN returns the weight gradient in the activations' layout.
    gws[k] = gw.defined() ? cpu::to_memory_format(gw, weights[k].suggest_memory_format())
                          : none();
    if (k > 0) {
      g = gh;
      act = h_in;
    } else {
      gx = gh;
    }
  }
  at::Tensor grad_x = none(), grad_res = none();
  if (output_mask[0]) {
    if (identity_residual) relu_grad_add_(gx, g_last, act_last);
    grad_x = cpu::to_memory_format(gx, layout_of(x));
  }
  if (!identity_residual && output_mask[1]) grad_res = dy_res;  // channels_last
  return {grad_x, grad_res, gws, ggammas, gbetas};
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, CPU, m) {
  m.impl("residual_branch_forward", &sdkernels::residual_branch_forward_cpu);
  m.impl("residual_branch_backward", &sdkernels::residual_branch_backward_cpu);
}

// Not differentiable: they are the forward and backward of an autograd.Function
// (sdkernels/ops/fused_block.py).
TORCH_LIBRARY_IMPL(sdkernels, Autograd, m) {
  m.impl("residual_branch_forward", torch::autograd::autogradNotImplementedFallback());
  m.impl("residual_branch_backward", torch::autograd::autogradNotImplementedFallback());
}
