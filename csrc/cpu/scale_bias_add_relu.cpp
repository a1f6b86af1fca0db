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

template <typename scalar_t, typename opmath_t>
void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                    const opmath_t* __restrict__ scale, const opmath_t* __restrict__ bias,
                    scalar_t* __restrict__ out, const Geometry& g) {
  const int64_t C = g.C;
  if (g.rows_of_channels) {
    const int64_t rows = g.N * g.inner;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / C), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const scalar_t* xr = x + row * C;
        const scalar_t* rr = res + row * C;
        scalar_t* orow = out + row * C;
        for (int64_t c = 0; c < C; ++c) {
          const opmath_t v = static_cast<opmath_t>(xr[c]) * scale[c] + bias[c] +
                             static_cast<opmath_t>(rr[c]);
          // `v < 0 ? 0 : v` keeps NaN, like torch.relu.
          orow[c] = static_cast<scalar_t>(v < opmath_t(0) ? opmath_t(0) : v);
        }
      }
    });
  } else {
    const int64_t inner = g.inner;
    const int64_t rows = g.N * C;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / inner), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t c = row % C;
        const opmath_t s = scale[c];
        const opmath_t bi = bias[c];
        const scalar_t* xr = x + row * inner;
        const scalar_t* rr = res + row * inner;
        scalar_t* orow = out + row * inner;
        for (int64_t j = 0; j < inner; ++j) {
          const opmath_t v =
              static_cast<opmath_t>(xr[j]) * s + bi + static_cast<opmath_t>(rr[j]);
          orow[j] = static_cast<scalar_t>(v < opmath_t(0) ? opmath_t(0) : v);
        }
      }
    });
  }
}

// Writes grad_x and grad_residual; fills sum_gx[c] = sum(g * x), sum_g[c] = sum(g).
template <typename scalar_t, typename opmath_t>
void backward_kernel(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ out,
                     const scalar_t* __restrict__ x, const opmath_t* __restrict__ scale,
                     scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_res,
                     double* __restrict__ sum_gx, double* __restrict__ sum_g,
                     const Geometry& g) {
  const int64_t C = g.C;
  if (g.rows_of_channels) {
    const int64_t rows = g.N * g.inner;
    const int64_t block_rows =
        std::max(ceil_div(kGrain, C), ceil_div(rows, kMaxBlocks));
    const int64_t nblocks = ceil_div(rows, block_rows);
    // Partial sums per block: [nblocks, C] each, zero-initialised.
    std::vector<double> part_gx(static_cast<size_t>(nblocks * C), 0.0);
    std::vector<double> part_g(static_cast<size_t>(nblocks * C), 0.0);
    at::parallel_for(0, nblocks, 1, [&](int64_t bb, int64_t be) {
      for (int64_t blk = bb; blk < be; ++blk) {
        double* __restrict__ pgx = part_gx.data() + blk * C;
        double* __restrict__ pg = part_g.data() + blk * C;
        const int64_t r_end = std::min(rows, (blk + 1) * block_rows);
        for (int64_t row = blk * block_rows; row < r_end; ++row) {
          const int64_t off = row * C;
          for (int64_t c = 0; c < C; ++c) {
            const bool pos = static_cast<opmath_t>(out[off + c]) > opmath_t(0);
            const opmath_t gv = pos ? static_cast<opmath_t>(gout[off + c]) : opmath_t(0);
            grad_res[off + c] = pos ? gout[off + c] : scalar_t(0);
            grad_x[off + c] = static_cast<scalar_t>(gv * scale[c]);
            pgx[c] += static_cast<double>(gv) * static_cast<double>(x[off + c]);
            pg[c] += static_cast<double>(gv);
          }
        }
      }
    });
    // Merge blocks in a fixed order.
    at::parallel_for(0, C, 256, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        double agx = 0.0, ag = 0.0;
        for (int64_t blk = 0; blk < nblocks; ++blk) {
          agx += part_gx[blk * C + c];
          ag += part_g[blk * C + c];
        }
        sum_gx[c] = agx;
        sum_g[c] = ag;
      }
    });
  } else {
    const int64_t inner = g.inner;
    const int64_t rows = g.N * C;
    // One partial per (n, c) row, then summed over n in order.
    std::vector<double> row_gx(static_cast<size_t>(rows), 0.0);
    std::vector<double> row_g(static_cast<size_t>(rows), 0.0);
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / inner), [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t c = row % C;
        const opmath_t s = scale[c];
        const int64_t off = row * inner;
        double lgx[kLanes] = {0.0};
        double lg[kLanes] = {0.0};
        int64_t j = 0;
        for (; j + kLanes <= inner; j += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const int64_t i = off + j + l;
            const bool pos = static_cast<opmath_t>(out[i]) > opmath_t(0);
            const opmath_t gv = pos ? static_cast<opmath_t>(gout[i]) : opmath_t(0);
            grad_res[i] = pos ? gout[i] : scalar_t(0);
            grad_x[i] = static_cast<scalar_t>(gv * s);
            lgx[l] += static_cast<double>(gv) * static_cast<double>(x[i]);
            lg[l] += static_cast<double>(gv);
          }
        }
        for (; j < inner; ++j) {
          const int64_t i = off + j;
          const bool pos = static_cast<opmath_t>(out[i]) > opmath_t(0);
          const opmath_t gv = pos ? static_cast<opmath_t>(gout[i]) : opmath_t(0);
          grad_res[i] = pos ? gout[i] : scalar_t(0);
          grad_x[i] = static_cast<scalar_t>(gv * s);
          lgx[0] += static_cast<double>(gv) * static_cast<double>(x[i]);
          lg[0] += static_cast<double>(gv);
        }
        double agx = 0.0, ag = 0.0;
        for (int l = 0; l < kLanes; ++l) {
          agx += lgx[l];
          ag += lg[l];
        }
        row_gx[row] = agx;
        row_g[row] = ag;
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
