// CPU kernels of sdkernels::scale_bias_add_relu and its backward.
//
// Two memory layouts, both walked as [rows, row_len] with plain inner loops the
// compiler vectorises:
//   * NCHW-contiguous:   rows = N*C, row_len = inner (= prod(shape[2:])), channel fixed per row
//   * channels-last-like (channels_last / channels_last_3d x, or inner == 1, e.g. 2-D [N, C]):
//                        rows = N*inner, row_len = C, channel = position in the row
// Math is done in opmath (float for float/half/bfloat16, double for double).
// Backward reductions accumulate in double into fixed-size blocks whose partition does not
// depend on the thread count, merged in a fixed order: results are bitwise deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace sdkernels {

// Defined in csrc/sdkernels.cpp (shared by every backend).
void check_scale_bias_add_relu_inputs(const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& bias, const at::Tensor& residual);
void check_scale_bias_add_relu_backward_inputs(const at::Tensor& grad_out,
                                               const at::Tensor& out, const at::Tensor& x,
                                               const at::Tensor& scale);

namespace {

// Elements per parallel task.
constexpr int64_t kGrain = 32768;
// Upper bound on the number of partial-sum blocks in the channels-last reduction.
constexpr int64_t kMaxBlocks = 1024;
// Independent accumulators in the contiguous reduction (lets the loop vectorise
// without reassociating floating point sums).
constexpr int kLanes = 8;

struct Geometry {
  int64_t N = 0;
  int64_t C = 0;
  int64_t inner = 1;  // prod(shape[2:])
  bool rows_of_channels = false;  // memory is [N * inner, C]
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
};

Geometry geometry_of(const at::Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  for (int64_t d = 2; d < x.dim(); ++d) g.inner *= x.size(d);
  g.format = x.suggest_memory_format();
  g.rows_of_channels = g.format != at::MemoryFormat::Contiguous || g.inner == 1;
  return g;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The loops below live in functions whose pointer parameters are __restrict__ (rather
// than in the parallel_for lambdas, whose by-reference captures defeat the vectoriser).

// Rows [r0, r1) of a [rows, C] layout (channel = position in the row).
template <typename scalar_t, typename opmath_t>
void forward_rows_of_channels(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                              const opmath_t* __restrict__ scale,
                              const opmath_t* __restrict__ bias, scalar_t* __restrict__ out,
                              int64_t C, int64_t r0, int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t off = row * C;
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t v = static_cast<opmath_t>(x[off + c]) * scale[c] + bias[c] +
                         static_cast<opmath_t>(res[off + c]);
      // `v < 0 ? 0 : v` keeps NaN, like torch.relu.
      out[off + c] = static_cast<scalar_t>(v < opmath_t(0) ? opmath_t(0) : v);
    }
  }
}

// Rows [r0, r1) of an [N * C, inner] layout (channel = row % C).
template <typename scalar_t, typename opmath_t>
void forward_channel_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                          const opmath_t* __restrict__ scale, const opmath_t* __restrict__ bias,
                          scalar_t* __restrict__ out, int64_t C, int64_t inner, int64_t r0,
                          int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) {
    const opmath_t s = scale[row % C];
    const opmath_t b = bias[row % C];
    const int64_t off = row * inner;
    for (int64_t j = 0; j < inner; ++j) {
      const opmath_t v =
          static_cast<opmath_t>(x[off + j]) * s + b + static_cast<opmath_t>(res[off + j]);
      out[off + j] = static_cast<scalar_t>(v < opmath_t(0) ? opmath_t(0) : v);
    }
  }
}

template <typename scalar_t, typename opmath_t>
void forward_kernel(const scalar_t* x, const scalar_t* res, const opmath_t* scale,
                    const opmath_t* bias, scalar_t* out, const Geometry& g) {
  const int64_t C = g.C;
  if (g.rows_of_channels) {
    at::parallel_for(0, g.N * g.inner, std::max<int64_t>(1, kGrain / C),
                     [&](int64_t r0, int64_t r1) {
                       forward_rows_of_channels(x, res, scale, bias, out, C, r0, r1);
                     });
  } else {
    const int64_t inner = g.inner;
    at::parallel_for(0, g.N * C, std::max<int64_t>(1, kGrain / inner),
                     [&](int64_t r0, int64_t r1) {
                       forward_channel_rows(x, res, scale, bias, out, C, inner, r0, r1);
                     });
  }
}

// g = out > 0 ? grad_out : 0 (both loaded unconditionally: a select, no branch, so the
// loops vectorise; converting g back to scalar_t is exact).
template <typename opmath_t, typename scalar_t>
inline opmath_t relu_grad(scalar_t out, scalar_t grad_out) {
  const opmath_t o = static_cast<opmath_t>(out);
  const opmath_t go = static_cast<opmath_t>(grad_out);
  return o > opmath_t(0) ? go : opmath_t(0);
}

// Rows [r0, r1) of a [rows, C] layout; adds sum(g * x) and sum(g) per channel into
// pgx[C] and pg[C].
template <typename scalar_t, typename opmath_t>
void backward_rows_of_channels(const scalar_t* __restrict__ gout,
                               const scalar_t* __restrict__ out,
                               const scalar_t* __restrict__ x,
                               const opmath_t* __restrict__ scale,
                               scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_res,
                               double* __restrict__ pgx, double* __restrict__ pg, int64_t C,
                               int64_t r0, int64_t r1) {
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t off = row * C;
    for (int64_t c = 0; c < C; ++c) {
      const opmath_t gv = relu_grad<opmath_t>(out[off + c], gout[off + c]);
      grad_res[off + c] = static_cast<scalar_t>(gv);
      grad_x[off + c] = static_cast<scalar_t>(gv * scale[c]);
      pgx[c] += static_cast<double>(gv) * static_cast<double>(x[off + c]);
      pg[c] += static_cast<double>(gv);
    }
  }
}

// One row (fixed channel, scale s) of an [N * C, inner] layout; returns its sums in
// *sgx and *sg.
template <typename scalar_t, typename opmath_t>
void backward_channel_row(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ out,
                          const scalar_t* __restrict__ x, opmath_t s,
                          scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_res,
                          int64_t inner, double* sgx, double* sg) {
  double lgx[kLanes] = {0.0};
  double lg[kLanes] = {0.0};
  int64_t j = 0;
  for (; j + kLanes <= inner; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const opmath_t gv = relu_grad<opmath_t>(out[j + l], gout[j + l]);
      grad_res[j + l] = static_cast<scalar_t>(gv);
      grad_x[j + l] = static_cast<scalar_t>(gv * s);
      lgx[l] += static_cast<double>(gv) * static_cast<double>(x[j + l]);
      lg[l] += static_cast<double>(gv);
    }
  }
  for (; j < inner; ++j) {
    const opmath_t gv = relu_grad<opmath_t>(out[j], gout[j]);
    grad_res[j] = static_cast<scalar_t>(gv);
    grad_x[j] = static_cast<scalar_t>(gv * s);
    lgx[0] += static_cast<double>(gv) * static_cast<double>(x[j]);
    lg[0] += static_cast<double>(gv);
  }
  double agx = 0.0, ag = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    agx += lgx[l];
    ag += lg[l];
  }
  *sgx = agx;
  *sg = ag;
}

// Writes grad_x and grad_residual; fills sum_gx[c] = sum(g * x), sum_g[c] = sum(g).
template <typename scalar_t, typename opmath_t>
void backward_kernel(const scalar_t* gout, const scalar_t* out, const scalar_t* x,
                     const opmath_t* scale, scalar_t* grad_x, scalar_t* grad_res,
                     double* sum_gx, double* sum_g, const Geometry& g) {
  const int64_t C = g.C;
  if (g.rows_of_channels) {
    const int64_t rows = g.N * g.inner;
    const int64_t block_rows = std::max(ceil_div(kGrain, C), ceil_div(rows, kMaxBlocks));
    const int64_t nblocks = ceil_div(rows, block_rows);
    // Partial sums per block: [nblocks, C] each, zero-initialised.
    std::vector<double> part_gx(static_cast<size_t>(nblocks * C), 0.0);
    std::vector<double> part_g(static_cast<size_t>(nblocks * C), 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        backward_rows_of_channels(gout, out, x, scale, grad_x, grad_res,
                                  part_gx.data() + blk * C, part_g.data() + blk * C, C,
                                  blk * block_rows, std::min(rows, (blk + 1) * block_rows));
      }
    });
    // Merge blocks in a fixed order.
    for (int64_t c = 0; c < C; ++c) {
      sum_gx[c] = 0.0;
      sum_g[c] = 0.0;
    }
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      for (int64_t c = 0; c < C; ++c) {
        sum_gx[c] += part_gx[blk * C + c];
        sum_g[c] += part_g[blk * C + c];
      }
    }
  } else {
    const int64_t inner = g.inner;
    const int64_t rows = g.N * C;
    // One partial per (n, c) row, then summed over n in order.
    std::vector<double> row_gx(static_cast<size_t>(rows), 0.0);
    std::vector<double> row_g(static_cast<size_t>(rows), 0.0);
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / inner), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t off = row * inner;
        backward_channel_row(gout + off, out + off, x + off, scale[row % C], grad_x + off,
                             grad_res + off, inner, &row_gx[row], &row_g[row]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      sum_gx[c] = 0.0;
      sum_g[c] = 0.0;
    }
    for (int64_t n = 0; n < g.N; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        sum_gx[c] += row_gx[n * C + c];
        sum_g[c] += row_g[n * C + c];
      }
    }
  }
}

at::ScalarType opmath_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor scale_bias_add_relu_cpu(const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& bias, const at::Tensor& residual) {
  check_scale_bias_add_relu_inputs(x, scale, bias, residual);
  const Geometry g = geometry_of(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(g.format));
  if (out.numel() == 0) return out;

  const at::Tensor xc = x.contiguous(g.format);
  const at::Tensor rc = residual.contiguous(g.format);
  const at::ScalarType op_t = opmath_dtype(x.scalar_type());
  const at::Tensor s = scale.to(op_t).contiguous();
  const at::Tensor b = bias.to(op_t).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "sdkernels::scale_bias_add_relu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t, opmath_t>(
            xc.const_data_ptr<scalar_t>(), rc.const_data_ptr<scalar_t>(),
            s.const_data_ptr<opmath_t>(), b.const_data_ptr<opmath_t>(),
            out.mutable_data_ptr<scalar_t>(), g);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_bias_add_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x,
    const at::Tensor& scale) {
  check_scale_bias_add_relu_backward_inputs(grad_out, out, x, scale);
  const Geometry g = geometry_of(x);
  const auto opts = x.options().memory_format(g.format);
  at::Tensor grad_x = at::empty(x.sizes(), opts);
  at::Tensor grad_res = at::empty(x.sizes(), opts);
  at::Tensor sum_gx = at::zeros({g.C}, x.options().dtype(at::kDouble));
  at::Tensor sum_g = at::zeros({g.C}, x.options().dtype(at::kDouble));

  if (x.numel() > 0) {
    const at::Tensor goc = grad_out.contiguous(g.format);
    const at::Tensor oc = out.contiguous(g.format);
    const at::Tensor xc = x.contiguous(g.format);
    const at::Tensor s = scale.to(opmath_dtype(x.scalar_type())).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, x.scalar_type(),
        "sdkernels::scale_bias_add_relu_backward", [&] {
          using opmath_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t, opmath_t>(
              goc.const_data_ptr<scalar_t>(), oc.const_data_ptr<scalar_t>(),
              xc.const_data_ptr<scalar_t>(), s.const_data_ptr<opmath_t>(),
              grad_x.mutable_data_ptr<scalar_t>(), grad_res.mutable_data_ptr<scalar_t>(),
              sum_gx.mutable_data_ptr<double>(), sum_g.mutable_data_ptr<double>(), g);
        });
  }
  return {grad_x, sum_gx.to(scale.scalar_type()), sum_g.to(scale.scalar_type()), grad_res};
}

}  // namespace
}  // namespace sdkernels

TORCH_LIBRARY_IMPL(sdkernels, CPU, m) {
  m.impl("scale_bias_add_relu", &sdkernels::scale_bias_add_relu_cpu);
  m.impl("scale_bias_add_relu_backward", &sdkernels::scale_bias_add_relu_backward_cpu);
}
