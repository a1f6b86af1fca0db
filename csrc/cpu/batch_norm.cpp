// CPU kernels of the training-mode BN ops (schemas and semantics: csrc/sdkernels.cpp):
//   * bn_stats:                per-channel (mean, invstd) + running-stat update;
//   * relu_bn_backward_reduce: per-channel sum(dy), sum(dy * xhat), optionally dy itself;
//   * bn_backward_apply:       grad_y = k * (dy - sum_dy / M - xhat * sum_dy_xhat / M).
//
// Layouts: NCHW-contiguous and channels-last-like tensors are walked in place (see
// layout.h); other strides, and grad_out/out in a format other than y's, are first
// copied to the suggested format of x (y). Outputs keep that format.
// Precision: elementwise math in float (double for float64). Sums are accumulated in
// float over short runs (at most 16 values per accumulator with SIMD) and continued in
// double; bn_stats sums x - x[0, c] (a per-channel shift), so a large mean does not
// cancel the variance (mean 1e4, std 1 in float32: variance good to ~1e-6).
// Each op reads its inputs once (bn_stats: x; the backward ops: grad_out, out, y).
// Reductions are bitwise deterministic (fixed partition and merge order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/batch_norm.h"
#include "cpu/layout.h"

namespace sdkernels {

// Defined in csrc/sdkernels.cpp (shared by every backend).
void check_bn_stats_inputs(const at::Tensor& x, const std::optional<at::Tensor>& running_mean,
                           const std::optional<at::Tensor>& running_var, double momentum,
                           double eps);
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

using cpu::Geometry;

// dy = out > 0 ? grad_out : 0 (a select, so loops stay branch-free), or grad_out.
template <bool kHasOut, typename acc_t, typename scalar_t>
inline acc_t masked(const scalar_t* __restrict__ go, const scalar_t* __restrict__ out,
                    int64_t j) {
  const acc_t g = static_cast<acc_t>(go[j]);
  if constexpr (kHasOut) {
    return static_cast<acc_t>(out[j]) > acc_t(0) ? g : acc_t(0);
  } else {
    return g;
  }
}

// ------------------------------------------------------------------------------------
// bn_stats: sums of d = x - shift and d * d.

// NCHW unit: `nrows` runs of `len` values, `stride` apart, summed in chunks of kChunk.
// `omp simd reduction` lets the compiler keep one partial sum per vector lane (a fixed
// order for a given build and CPU, so still deterministic); without OpenMP the loop is
// a plain sequential sum.
template <typename scalar_t, typename acc_t>
SDKERNELS_CPU_CLONES
void stats_unit(const scalar_t* __restrict__ x, int64_t stride, int64_t nrows, int64_t len,
                acc_t shift, double* s1, double* s2) {
  double u1 = 0.0, u2 = 0.0;
  for (int64_t r = 0; r < nrows; ++r) {
    const scalar_t* __restrict__ xr = x + r * stride;
    for (int64_t j0 = 0; j0 < len; j0 += cpu::kChunk) {
      const int64_t j1 = std::min(len, j0 + cpu::kChunk);
      acc_t t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t d = static_cast<acc_t>(xr[j]) - shift;
        t1 += d;
        t2 += d * d;
      }
      u1 += static_cast<double>(t1);
      u2 += static_cast<double>(t2);
    }
  }
  *s1 = u1;
  *s2 = u2;
}

// Channels-last block: n values (whole periods of P, possibly a shorter last one).
template <typename scalar_t, typename acc_t>
SDKERNELS_CPU_CLONES
void stats_block(const scalar_t* __restrict__ x, int64_t n, int64_t P,
                 const acc_t* __restrict__ shift, acc_t* __restrict__ f1,
                 acc_t* __restrict__ f2, double* __restrict__ d1, double* __restrict__ d2) {
  for (int64_t q = 0; q < n; q += cpu::kFlushPeriods * P) {
    const int64_t end = std::min(n, q + cpu::kFlushPeriods * P);
    for (int64_t j = 0; j < P; ++j) {
      f1[j] = acc_t(0);
      f2[j] = acc_t(0);
    }
    for (int64_t p = q; p < end; p += P) {
      const int64_t len = std::min(P, end - p);
      for (int64_t j = 0; j < len; ++j) {
        const acc_t d = static_cast<acc_t>(x[p + j]) - shift[j];
        f1[j] += d;
        f2[j] += d * d;
      }
    }
    for (int64_t j = 0; j < P; ++j) {
      d1[j] += static_cast<double>(f1[j]);
      d2[j] += static_cast<double>(f2[j]);
    }
  }
}

template <typename acc_t>
acc_t finite_or_zero(acc_t v) {
  return std::isfinite(v) ? v : acc_t(0);
}

template <typename T>
void update_running(T* r, const std::vector<double>& stat, double momentum) {
  for (size_t c = 0; c < stat.size(); ++c) {
    r[c] = static_cast<T>((1.0 - momentum) * static_cast<double>(r[c]) + momentum * stat[c]);
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x,
                                                const std::optional<at::Tensor>& running_mean,
                                                const std::optional<at::Tensor>& running_var,
                                                double momentum, double eps) {
  check_bn_stats_inputs(x, running_mean, running_var, momentum, eps);
  const Geometry g = cpu::geometry_of(x);
  const int64_t C = g.C;
  const int64_t M = g.M();
  const at::ScalarType st = cpu::stats_dtype(x.scalar_type());
  at::Tensor mean = at::empty({C}, x.options().dtype(st));
  at::Tensor invstd = at::empty({C}, x.options().dtype(st));
  std::vector<double> mean_d(static_cast<size_t>(C), 0.0);
  std::vector<double> var_d(static_cast<size_t>(C), 0.0);

  if (M > 0 && C > 0) {
    const at::Tensor xc = x.contiguous(g.format);
    std::vector<double> s1(static_cast<size_t>(C)), s2(static_cast<size_t>(C));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "sdkernels::bn_stats", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      // Shift = x[0, c, 0, ...]: a value from the channel, so sums of x - shift stay
      // near the spread of the data rather than its mean.
      const int64_t cstride = g.rows_of_channels ? 1 : g.inner;
      std::vector<acc_t> shift(static_cast<size_t>(g.rows_of_channels ? g.period : C));
      for (int64_t c = 0; c < C; ++c) {
        shift[c] = finite_or_zero(static_cast<acc_t>(xp[c * cstride]));
      }
      for (size_t j = C; j < shift.size(); ++j) shift[j] = shift[j - C];
      const int64_t stride = C * g.inner;
      cpu::reduce_per_channel<acc_t>(
          g,
          [&](int64_t c, int64_t n0, int64_t n1, int64_t s, int64_t len, double* a,
              double* b) {
            stats_unit<scalar_t, acc_t>(xp + (n0 * C + c) * g.inner + s, stride, n1 - n0,
                                        len, shift[c], a, b);
          },
          [&](int64_t off, int64_t n, acc_t* f1, acc_t* f2, double* d1, double* d2) {
            stats_block<scalar_t, acc_t>(xp + off, n, g.period, shift.data(), f1, f2, d1, d2);
          },
          s1.data(), s2.data());
      for (int64_t c = 0; c < C; ++c) {
        const double m1 = s1[c] / static_cast<double>(M);
        mean_d[c] = static_cast<double>(shift[c]) + m1;
        const double v = s2[c] / static_cast<double>(M) - m1 * m1;
        var_d[c] = v < 0.0 ? 0.0 : v;  // rounding can make it slightly negative; keeps NaN
      }
    });
  }

  AT_DISPATCH_FLOATING_TYPES(st, "sdkernels::bn_stats", [&] {
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* ip = invstd.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      mp[c] = static_cast<scalar_t>(mean_d[c]);
      ip[c] = static_cast<scalar_t>(1.0 / std::sqrt(var_d[c] + eps));
    }
  });

  if (running_mean.has_value() && M > 0) {
    // Unbiased variance for the running estimate, as nn.BatchNorm (M == 1: var).
    const double unbias = M > 1 ? static_cast<double>(M) / static_cast<double>(M - 1) : 1.0;
    for (double& v : var_d) v *= unbias;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean->scalar_type(),
                                    "sdkernels::bn_stats", [&] {
      update_running(running_mean->mutable_data_ptr<scalar_t>(), mean_d, momentum);
    });
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_var->scalar_type(),
                                    "sdkernels::bn_stats", [&] {
      update_running(running_var->mutable_data_ptr<scalar_t>(), var_d, momentum);
    });
  }
  return {mean, invstd};
}

// ------------------------------------------------------------------------------------
// relu_bn_backward_reduce: sums of dy and dy * (y - mean); dy written when kWantDy.
// (go/out/y/dy point at the same position of same-layout tensors.)

template <bool kHasOut, bool kWantDy, typename scalar_t, typename acc_t>
SDKERNELS_CPU_CLONES
void reduce_unit(const scalar_t* __restrict__ go, const scalar_t* __restrict__ out,
                 const scalar_t* __restrict__ y, scalar_t* __restrict__ dy_out,
                 int64_t stride, int64_t nrows, int64_t len, acc_t mean, double* s1,
                 double* s2) {
  double u1 = 0.0, u2 = 0.0;
  for (int64_t r = 0; r < nrows; ++r) {
    for (int64_t j0 = r * stride; j0 < r * stride + len; j0 += cpu::kChunk) {
      const int64_t j1 = std::min(r * stride + len, j0 + cpu::kChunk);
      acc_t t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t1, t2)
      for (int64_t j = j0; j < j1; ++j) {
        const acc_t dy = masked<kHasOut, acc_t>(go, out, j);
        if constexpr (kWantDy) cpu::store(&dy_out[j], dy);
        t1 += dy;
        t2 += dy * (static_cast<acc_t>(y[j]) - mean);
      }
      u1 += static_cast<double>(t1);
      u2 += static_cast<double>(t2);
    }
  }
  *s1 = u1;
  *s2 = u2;
}

template <bool kHasOut, bool kWantDy, typename scalar_t, typename acc_t>
SDKERNELS_CPU_CLONES
void reduce_block(const scalar_t* __restrict__ go, const scalar_t* __restrict__ out,
                  const scalar_t* __restrict__ y, scalar_t* __restrict__ dy_out, int64_t n,
                  int64_t P, const acc_t* __restrict__ mean, acc_t* __restrict__ f1,
                  acc_t* __restrict__ f2, double* __restrict__ d1, double* __restrict__ d2) {
  for (int64_t q = 0; q < n; q += cpu::kFlushPeriods * P) {
    const int64_t end = std::min(n, q + cpu::kFlushPeriods * P);
    for (int64_t j = 0; j < P; ++j) {
      f1[j] = acc_t(0);
      f2[j] = acc_t(0);
    }
    for (int64_t p = q; p < end; p += P) {
      const int64_t len = std::min(P, end - p);
      for (int64_t j = 0; j < len; ++j) {
        const acc_t dy = masked<kHasOut, acc_t>(go, out, p + j);
        if constexpr (kWantDy) cpu::store(&dy_out[p + j], dy);
        f1[j] += dy;
        f2[j] += dy * (static_cast<acc_t>(y[p + j]) - mean[j]);
      }
    }
    for (int64_t j = 0; j < P; ++j) {
      d1[j] += static_cast<double>(f1[j]);
      d2[j] += static_cast<double>(f2[j]);
    }
  }
}

template <bool kHasOut, bool kWantDy, typename scalar_t>
void reduce_kernel(const Geometry& g, const scalar_t* go, const scalar_t* out,
                   const scalar_t* y, scalar_t* dy, const at::Tensor& mean, double* s1,
                   double* s2) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> m =
      cpu::per_channel<acc_t>(mean, g.rows_of_channels ? g.period : g.C);
  const int64_t C = g.C;
  const int64_t inner = g.inner;
  cpu::reduce_per_channel<acc_t>(
      g,
      [&](int64_t c, int64_t n0, int64_t n1, int64_t s, int64_t len, double* a,
          double* b) {
        const int64_t off = (n0 * C + c) * inner + s;
        reduce_unit<kHasOut, kWantDy, scalar_t, acc_t>(
            go + off, kHasOut ? out + off : nullptr, y + off, kWantDy ? dy + off : nullptr,
            C * inner, n1 - n0, len, m[c], a, b);
      },
      [&](int64_t off, int64_t n, acc_t* f1, acc_t* f2, double* d1, double* d2) {
        reduce_block<kHasOut, kWantDy, scalar_t, acc_t>(
            go + off, kHasOut ? out + off : nullptr, y + off, kWantDy ? dy + off : nullptr,
            n, g.period, m.data(), f1, f2, d1, d2);
      },
      s1, s2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_bn_backward_reduce_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& out, const at::Tensor& y,
    const at::Tensor& mean, const at::Tensor& invstd, bool want_dy) {
  check_relu_bn_backward_reduce_inputs(grad_out, out, y, mean, invstd);
  const Geometry g = cpu::geometry_of(y);
  const int64_t C = g.C;
  const auto opts = y.options().memory_format(g.format);
  at::Tensor dy = want_dy ? at::empty(y.sizes(), opts) : at::empty({0}, y.options());
  at::Tensor sum_dy = at::empty({C}, mean.options());
  at::Tensor sum_dy_xhat = at::empty({C}, mean.options());
  std::vector<double> s1(static_cast<size_t>(C), 0.0), s2(static_cast<size_t>(C), 0.0);

  if (g.numel > 0) {
    const at::Tensor goc = grad_out.contiguous(g.format);
    const at::Tensor yc = y.contiguous(g.format);
    const at::Tensor oc = out.has_value() ? out->contiguous(g.format) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                    "sdkernels::relu_bn_backward_reduce", [&] {
      const scalar_t* gp = goc.const_data_ptr<scalar_t>();
      const scalar_t* op = oc.defined() ? oc.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* yp = yc.const_data_ptr<scalar_t>();
      scalar_t* dp = want_dy ? dy.mutable_data_ptr<scalar_t>() : nullptr;
      if (op != nullptr && want_dy) {
        reduce_kernel<true, true>(g, gp, op, yp, dp, mean, s1.data(), s2.data());
      } else if (op != nullptr) {
        reduce_kernel<true, false>(g, gp, op, yp, dp, mean, s1.data(), s2.data());
      } else if (want_dy) {
        reduce_kernel<false, true>(g, gp, op, yp, dp, mean, s1.data(), s2.data());
      } else {
        reduce_kernel<false, false>(g, gp, op, yp, dp, mean, s1.data(), s2.data());
      }
    });
  }

  const std::vector<double> is = cpu::per_channel<double>(invstd, C);
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "sdkernels::relu_bn_backward_reduce", [&] {
    scalar_t* p1 = sum_dy.mutable_data_ptr<scalar_t>();
    scalar_t* p2 = sum_dy_xhat.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      p1[c] = static_cast<scalar_t>(s1[c]);
      p2[c] = static_cast<scalar_t>(s2[c] * is[c]);
    }
  });
  return {sum_dy, sum_dy_xhat, dy};
}

// ------------------------------------------------------------------------------------
// bn_backward_apply: grad_y = a[c] * dy + b[c] * (y - mean[c]) + d[c] with
// a = k, b = -k * invstd * sum_dy_xhat / M, d = -k * sum_dy / M, k = weight * invstd.

template <typename acc_t>
struct ApplyCoef {
  std::vector<acc_t> a, b, d, mean;
};

// NCHW rows: `nrows` rows of `inner` values, the first of channel c0. gy may be go
// itself (bn_backward_apply_into), so those two are not __restrict__.
template <bool kHasOut, typename scalar_t, typename acc_t>
SDKERNELS_CPU_CLONES
void apply_rows(const scalar_t* go, const scalar_t* __restrict__ out,
                const scalar_t* __restrict__ y, scalar_t* gy,
                const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                const acc_t* __restrict__ d, const acc_t* __restrict__ mean, int64_t C,
                int64_t c0, int64_t inner, int64_t nrows) {
  int64_t c = c0;
  for (int64_t r = 0; r < nrows; ++r) {
    const acc_t ac = a[c], bc = b[c], dc = d[c], mc = mean[c];
    const int64_t o = r * inner;
    for (int64_t j = 0; j < inner; ++j) {
      const acc_t dy = masked<kHasOut, acc_t>(go, out, o + j);
      cpu::store(&gy[o + j], ac * dy + bc * (static_cast<acc_t>(y[o + j]) - mc) + dc);
    }
    if (++c == C) c = 0;
  }
}

// Channels last: n values from a period boundary, coefficients tiled to the period P.
template <bool kHasOut, typename scalar_t, typename acc_t>
SDKERNELS_CPU_CLONES
void apply_periods(const scalar_t* go, const scalar_t* __restrict__ out,
                   const scalar_t* __restrict__ y, scalar_t* gy,
                   const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                   const acc_t* __restrict__ d, const acc_t* __restrict__ mean, int64_t P,
                   int64_t n) {
  for (int64_t p = 0; p < n; p += P) {
    const int64_t len = std::min(P, n - p);
    for (int64_t j = 0; j < len; ++j) {
      const acc_t dy = masked<kHasOut, acc_t>(go, out, p + j);
      cpu::store(&gy[p + j],
                 a[j] * dy + b[j] * (static_cast<acc_t>(y[p + j]) - mean[j]) + d[j]);
    }
  }
}

template <bool kHasOut, typename scalar_t, typename acc_t>
void apply_kernel(const Geometry& g, const scalar_t* go, const scalar_t* out,
                  const scalar_t* y, scalar_t* gy, const ApplyCoef<acc_t>& k) {
  const int64_t inner = g.inner;
  cpu::for_each_span(
      g,
      [&](int64_t r0, int64_t r1) {
        const int64_t off = r0 * inner;
        apply_rows<kHasOut, scalar_t, acc_t>(go + off, kHasOut ? out + off : nullptr,
                                             y + off, gy + off, k.a.data(), k.b.data(),
                                             k.d.data(), k.mean.data(), g.C, r0 % g.C, inner,
                                             r1 - r0);
      },
      [&](int64_t off, int64_t n) {
        apply_periods<kHasOut, scalar_t, acc_t>(go + off, kHasOut ? out + off : nullptr,
                                                y + off, gy + off, k.a.data(), k.b.data(),
                                                k.d.data(), k.mean.data(), g.period, n);
      });
}

}  // namespace

at::Tensor bn_backward_apply_into(const at::Tensor& grad_out,
                                  const std::optional<at::Tensor>& out, const at::Tensor& y,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  const std::optional<at::Tensor>& weight,
                                  const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                                  const at::Tensor& dest) {
  check_bn_backward_apply_inputs(grad_out, out, y, mean, invstd, weight, sum_dy, sum_dy_xhat);
  const Geometry g = cpu::geometry_of(y);
  at::Tensor grad_y = dest;
  if (!grad_y.defined()) {
    grad_y = at::empty(y.sizes(), y.options().memory_format(g.format));
  } else {
    // Written element by element right after grad_out's value at the same position is
    // read, so dest may be grad_out itself (the fused branch reuses its buffers).
    TORCH_CHECK(dest.sizes() == y.sizes() && dest.scalar_type() == y.scalar_type() &&
                    dest.is_contiguous(g.format) &&
                    (dest.is_same(grad_out) || !dest.is_alias_of(grad_out)) &&
                    !dest.is_alias_of(y) && (!out.has_value() || !dest.is_alias_of(*out)),
                "sdkernels::bn_backward_apply: bad destination tensor");
  }
  if (g.numel == 0) return grad_y;

  const int64_t C = g.C;
  const int64_t len = g.rows_of_channels ? g.period : C;
  const double inv_m = 1.0 / static_cast<double>(g.M());
  const std::vector<double> is = cpu::per_channel<double>(invstd, C);
  const std::vector<double> sd = cpu::per_channel<double>(sum_dy, C);
  const std::vector<double> sdx = cpu::per_channel<double>(sum_dy_xhat, C);
  const std::vector<double> w =
      weight.has_value() ? cpu::per_channel<double>(*weight, C) : std::vector<double>(C, 1.0);

  const at::Tensor goc = grad_out.contiguous(g.format);
  const at::Tensor yc = y.contiguous(g.format);
  const at::Tensor oc = out.has_value() ? out->contiguous(g.format) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "sdkernels::bn_backward_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ApplyCoef<acc_t> k;
    k.a.resize(len);
    k.b.resize(len);
    k.d.resize(len);
    k.mean = cpu::per_channel<acc_t>(mean, len);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t c = j % C;
      const double kc = w[c] * is[c];
      k.a[j] = static_cast<acc_t>(kc);
      k.b[j] = static_cast<acc_t>(-kc * is[c] * sdx[c] * inv_m);
      k.d[j] = static_cast<acc_t>(-kc * sd[c] * inv_m);
    }
    const scalar_t* gp = goc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    scalar_t* gyp = grad_y.mutable_data_ptr<scalar_t>();
    if (oc.defined()) {
      apply_kernel<true, scalar_t, acc_t>(g, gp, oc.const_data_ptr<scalar_t>(), yp, gyp, k);
    } else {
      apply_kernel<false, scalar_t, acc_t>(g, gp, nullptr, yp, gyp, k);
    }
  });
  return grad_y;
}

namespace {

at::Tensor bn_backward_apply_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                 const at::Tensor& y, const at::Tensor& mean,
                                 const at::Tensor& invstd,
                                 const std::optional<at::Tensor>& weight,
                                 const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat) {
  return bn_backward_apply_into(grad_out, out, y, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                at::Tensor());
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, CPU, m) {
  m.impl("bn_stats", &sdkernels::bn_stats_cpu);
  m.impl("relu_bn_backward_reduce", &sdkernels::relu_bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &sdkernels::bn_backward_apply_cpu);
}

// Not differentiable (building blocks of a hand-written BN backward), on every backend:
// outputs computed from inputs that require grad get a node that raises "the derivative
// for ... is not implemented" on backward. Registered here rather than in Python
// (torch.library.register_autograd) because a Python autograd kernel costs ~5 us per
// call even under no_grad, a sizeable share of these ops on small tensors, and
// register_autograd rejects bn_stats anyway (it mutates its running statistics).
TORCH_LIBRARY_IMPL(sdkernels, Autograd, m) {
  m.impl("bn_stats", torch::autograd::autogradNotImplementedFallback());
  m.impl("relu_bn_backward_reduce", torch::autograd::autogradNotImplementedFallback());
  m.impl("bn_backward_apply", torch::autograd::autogradNotImplementedFallback());
}
