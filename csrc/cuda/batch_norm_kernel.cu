// CUDA kernels of the training-mode BN ops (bn_stats, relu_bn_backward_reduce,
// bn_backward_apply). No torch headers (see batch_norm_kernel.cuh).
//
// Design (the drivers live in channel_kernels.cuh):
// * channels_last ([M, C] rows): blocks of (tx, ty) threads, tx over 16-byte column
//   vectors of a row (a power of two <= 32, so every warp reads whole rows or 512-byte
//   row segments: coalesced), ty over rows. Per-channel constants sit in registers for
//   the whole kernel; no index division.
// * NCHW ([N, C, inner]): reductions use one block per (channel, split) walking the
//   channel's N runs of `inner` elements with 16-byte vectors; elementwise kernels are a
//   flat grid-stride loop over vectors, channel = (q / (inner / V)) % C (32-bit index
//   arithmetic whenever it fits).
// * Reductions are two-stage: partial sums per (split, channel) with a shape-only split
//   that gives ~1024 blocks (fills 132 SMs several times over), then a finalize kernel
//   that sums the partials in a fixed order in double. Deterministic, no atomics. The
//   split and the vector width that fixes each thread's elements depend on shape and
//   dtype only: a misaligned input keeps them and reads each vector with scalar loads,
//   so it sums in exactly the order of an aligned copy (channel_plan.h).
// * bn_stats is numerically stable: it sums d = x - K and d^2 with a per-channel shift K
//   (the channel's first element, or 0 if that is not finite), the same for every
//   partial, so the partials merge by plain addition (Chan's merge with a common shift),
//   and forms var = S2 / M - (S1 / M)^2 in double. With K a sample of the channel, the
//   cancellation is that of data with mean ~ one standard deviation, whatever the
//   channel's actual offset.
#include "batch_norm_kernel.cuh"

#include <type_traits>

#include "channel_kernels.cuh"

namespace sdkernels {
namespace cuda {
namespace {

using detail::from_acc;
using detail::load_vec;
using detail::OpMath;
using detail::store_vec;
using detail::to_acc;
using detail::Vec;

constexpr int kStatsUnroll = 4;     // one input: 4 vectors in flight per thread
constexpr int kBackwardUnroll = 2;  // three inputs

// --- bn_stats -------------------------------------------------------------------------

// The shift: the channel's first value, or 0 when that is not finite (an inf/NaN shift
// would turn every d into NaN; with 0 the result is the inf/NaN F.batch_norm gives).
// `v - v == 0` holds exactly for finite v.
template <typename T>
__device__ __forceinline__ T finite_or_zero(T v) {
  return (v - v) == T(0) ? v : T(0);
}

// kAligned: x is 16-byte aligned (vector loads); else the same V elements are read with
// scalar loads, in the same order (channel_plan.h's reproducibility rule).
template <typename scalar_t, int V, bool kAligned>
struct StatsOp {
  using acc_t = typename OpMath<scalar_t>::type;
  struct Chan {
    acc_t shift;
  };
  struct Loaded {
    Vec<scalar_t, V> x;
  };
  const scalar_t* x;
  int64_t shift_stride;  // x[c * shift_stride] is channel c's first element

  __device__ __forceinline__ Chan channel(int64_t c) const {
    return Chan{finite_or_zero(static_cast<acc_t>(to_acc(x[c * shift_stride])))};
  }
  __device__ __forceinline__ Loaded load(int64_t i) const {
    return Loaded{load_vec<scalar_t, V, kAligned>(x + i)};
  }
  template <int NC>
  __device__ __forceinline__ void accumulate(int64_t, const Loaded& in, const Chan* ch,
                                             acc_t* a, acc_t* b) const {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const acc_t d = static_cast<acc_t>(to_acc(in.x.v[v])) - ch[NC == 1 ? 0 : v].shift;
      a[v] += d;
      b[v] += d * d;
    }
  }
};

template <typename scalar_t, typename acc_t, typename running_t>
struct StatsFin {
  const scalar_t* x;
  int64_t shift_stride;
  int64_t M;
  double momentum;
  double eps;
  acc_t* mean;
  acc_t* invstd;
  running_t* running_mean;  // both null or both non-null
  running_t* running_var;

  __device__ __forceinline__ void finish(int64_t c, double s1, double s2) const {
    const double m = static_cast<double>(M);
    // The same shift as StatsOp::channel (computed in acc_t, then widened).
    const double shift = static_cast<double>(
        finite_or_zero(static_cast<acc_t>(to_acc(x[c * shift_stride]))));
    const double d = s1 / m;
    double var = s2 / m - d * d;
    var = var < 0.0 ? 0.0 : var;  // rounding can go below 0; NaN stays NaN
    const double mu = shift + d;
    mean[c] = static_cast<acc_t>(mu);
    invstd[c] = static_cast<acc_t>(1.0 / sqrt(var + eps));
    if (running_mean != nullptr) {
      const double unbiased = M > 1 ? var * (m / (m - 1.0)) : var;
      running_mean[c] = static_cast<running_t>(
          (1.0 - momentum) * static_cast<double>(running_mean[c]) + momentum * mu);
      running_var[c] = static_cast<running_t>(
          (1.0 - momentum) * static_cast<double>(running_var[c]) + momentum * unbiased);
    }
  }
};

// --- relu_bn_backward_reduce ------------------------------------------------------------

template <typename scalar_t, int V, bool kHasOut, bool kAligned>
struct BackwardReduceOp {
  using acc_t = typename OpMath<scalar_t>::type;
  struct Chan {
    acc_t mean;
  };
  struct Loaded {
    Vec<scalar_t, V> g;
    Vec<scalar_t, V> o;
    Vec<scalar_t, V> y;
  };
  const scalar_t* grad_out;
  const scalar_t* out;  // null unless kHasOut
  const scalar_t* y;
  const acc_t* mean;
  scalar_t* dy;  // may be null

  __device__ __forceinline__ Chan channel(int64_t c) const { return Chan{mean[c]}; }
  __device__ __forceinline__ Loaded load(int64_t i) const {
    Loaded in;
    in.g = load_vec<scalar_t, V, kAligned>(grad_out + i);
    if constexpr (kHasOut) in.o = load_vec<scalar_t, V, kAligned>(out + i);
    in.y = load_vec<scalar_t, V, kAligned>(y + i);
    return in;
  }
  template <int NC>
  __device__ __forceinline__ void accumulate(int64_t i, const Loaded& in, const Chan* ch,
                                             acc_t* a, acc_t* b) const {
    Vec<scalar_t, V> d;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      acc_t g = static_cast<acc_t>(to_acc(in.g.v[v]));
      d.v[v] = in.g.v[v];
      if constexpr (kHasOut) {
        if (!(static_cast<acc_t>(to_acc(in.o.v[v])) > acc_t(0))) {
          g = acc_t(0);
          d.v[v] = from_acc<scalar_t>(acc_t(0));
        }
      }
      a[v] += g;
      b[v] += g * (static_cast<acc_t>(to_acc(in.y.v[v])) - ch[NC == 1 ? 0 : v].mean);
    }
    if (dy != nullptr) store_vec<scalar_t, V, kAligned>(dy + i, d);
  }
};

template <typename acc_t>
struct BackwardReduceFin {
  const acc_t* invstd;
  acc_t* sum_dy;
  acc_t* sum_dy_xhat;

  __device__ __forceinline__ void finish(int64_t c, double s1, double s2) const {
    sum_dy[c] = static_cast<acc_t>(s1);
    sum_dy_xhat[c] = static_cast<acc_t>(s2 * static_cast<double>(invstd[c]));
  }
};

// --- bn_backward_apply ------------------------------------------------------------------

template <typename scalar_t, int V, bool kHasOut>
struct BackwardApplyOp {
  using acc_t = typename OpMath<scalar_t>::type;
  struct Chan {
    acc_t mean, invstd, k, mean_dy, mean_dy_xhat;
  };
  struct Loaded {
    Vec<scalar_t, V> g;
    Vec<scalar_t, V> o;
    Vec<scalar_t, V> y;
  };
  const scalar_t* grad_out;
  const scalar_t* out;  // null unless kHasOut
  const scalar_t* y;
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;  // may be null
  const acc_t* sum_dy;
  const acc_t* sum_dy_xhat;
  scalar_t* grad_y;
  // 1 / M (M = numel / C), rounded once on the host (as the CPU kernel's inv_m): a
  // multiply instead of an IEEE division per channel() call (NCHW calls it per vector;
  // the double division's slow-path subroutine call also cost a stack frame and spills).
  acc_t inv_m;

  __device__ __forceinline__ Chan channel(int64_t c) const {
    Chan ch;
    ch.mean = mean[c];
    ch.invstd = invstd[c];
    ch.k = weight != nullptr ? weight[c] * ch.invstd : ch.invstd;
    ch.mean_dy = sum_dy[c] * inv_m;
    ch.mean_dy_xhat = sum_dy_xhat[c] * inv_m;
    return ch;
  }
  __device__ __forceinline__ Loaded load(int64_t i) const {
    Loaded in;
    in.g = load_vec<scalar_t, V>(grad_out + i);
    if constexpr (kHasOut) in.o = load_vec<scalar_t, V>(out + i);
    in.y = load_vec<scalar_t, V>(y + i);
    return in;
  }
  template <int NC>
  __device__ __forceinline__ void store(int64_t i, const Loaded& in, const Chan* ch) const {
    Vec<scalar_t, V> r;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const Chan& cc = ch[NC == 1 ? 0 : v];
      acc_t g = static_cast<acc_t>(to_acc(in.g.v[v]));
      if constexpr (kHasOut) {
        if (!(static_cast<acc_t>(to_acc(in.o.v[v])) > acc_t(0))) g = acc_t(0);
      }
      const acc_t xhat = (static_cast<acc_t>(to_acc(in.y.v[v])) - cc.mean) * cc.invstd;
      r.v[v] = from_acc<scalar_t>(cc.k * (g - cc.mean_dy - xhat * cc.mean_dy_xhat));
    }
    store_vec<scalar_t, V>(grad_y + i, r);
  }
};

template <typename scalar_t, typename acc_t, int V, bool kHasOut, bool kAligned>
cudaError_t run_backward_reduce(const scalar_t* grad_out, const scalar_t* out,
                                const scalar_t* y, const acc_t* mean, const acc_t* invstd,
                                scalar_t* dy, int64_t numel, int64_t C, int64_t inner,
                                bool channels_last, int64_t splits, acc_t* workspace,
                                acc_t* sum_dy, acc_t* sum_dy_xhat, cudaStream_t stream) {
  const BackwardReduceOp<scalar_t, V, kHasOut, kAligned> op{grad_out, out, y, mean, dy};
  const BackwardReduceFin<acc_t> fin{invstd, sum_dy, sum_dy_xhat};
  return detail::launch_channel_reduce<V, kBackwardUnroll>(op, fin, numel, C, inner,
                                                           channels_last, splits, workspace,
                                                           stream);
}

template <typename scalar_t, typename acc_t, int V, bool kHasOut>
cudaError_t run_backward_apply(const scalar_t* grad_out, const scalar_t* out,
                               const scalar_t* y, const acc_t* mean, const acc_t* invstd,
                               const acc_t* weight, const acc_t* sum_dy,
                               const acc_t* sum_dy_xhat, scalar_t* grad_y, int64_t numel,
                               int64_t C, int64_t inner, bool channels_last,
                               cudaStream_t stream) {
  const BackwardApplyOp<scalar_t, V, kHasOut> op{
      grad_out, out,         y,      mean, invstd, weight, sum_dy,
      sum_dy_xhat, grad_y, static_cast<acc_t>(1.0 / static_cast<double>(numel / C))};
  return detail::launch_elementwise<V, kBackwardUnroll>(op, numel, C, inner, channels_last,
                                                        stream);
}

}  // namespace

template <typename scalar_t, typename acc_t, typename running_t>
cudaError_t launch_bn_stats(const scalar_t* x, int64_t numel, int64_t C, int64_t inner,
                            bool channels_last, const ChannelReducePlan& plan,
                            acc_t* workspace, double momentum, double eps, acc_t* mean,
                            acc_t* invstd, running_t* running_mean, running_t* running_var,
                            cudaStream_t stream) {
  static_assert(std::is_same_v<acc_t, typename OpMath<scalar_t>::type>,
                "acc_t must be double for double and float otherwise");
  if (numel <= 0) return cudaSuccess;
  if (C <= 0 || inner <= 0 || x == nullptr || mean == nullptr || invstd == nullptr ||
      (running_mean == nullptr) != (running_var == nullptr))
    return cudaErrorInvalidValue;
  const bool cl = detail::effective_channels_last(C, inner, channels_last);
  const int64_t shift_stride = cl ? 1 : inner;
  const StatsFin<scalar_t, acc_t, running_t> fin{x,    shift_stride, numel / C,
                                                 momentum, eps,      mean,
                                                 invstd,   running_mean, running_var};
  // The plan must be the shape-only one (same summation order for every alignment).
  if (plan.vec != detail::reduce_vec_width(static_cast<int>(sizeof(scalar_t)), C, inner,
                                           channels_last))
    return cudaErrorInvalidValue;
  constexpr int VM = detail::max_vec<scalar_t>();
  if (plan.vec == VM && VM > 1) {
    if (detail::aligned16(x)) {
      return detail::launch_channel_reduce<VM, kStatsUnroll>(
          StatsOp<scalar_t, VM, true>{x, shift_stride}, fin, numel, C, inner, channels_last,
          plan.splits, workspace, stream);
    }
    return detail::launch_channel_reduce<VM, kStatsUnroll>(
        StatsOp<scalar_t, VM, false>{x, shift_stride}, fin, numel, C, inner, channels_last,
        plan.splits, workspace, stream);
  }
  if (plan.vec == 1) {
    return detail::launch_channel_reduce<1, kStatsUnroll>(
        StatsOp<scalar_t, 1, true>{x, shift_stride}, fin, numel, C, inner, channels_last,
        plan.splits, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_relu_bn_backward_reduce(
    const scalar_t* grad_out, const scalar_t* out, const scalar_t* y, const acc_t* mean,
    const acc_t* invstd, scalar_t* dy, int64_t numel, int64_t C, int64_t inner,
    bool channels_last, const ChannelReducePlan& plan, acc_t* workspace, acc_t* sum_dy,
    acc_t* sum_dy_xhat, cudaStream_t stream) {
  static_assert(std::is_same_v<acc_t, typename OpMath<scalar_t>::type>,
                "acc_t must be double for double and float otherwise");
  if (numel <= 0) return cudaSuccess;
  if (C <= 0 || inner <= 0 || grad_out == nullptr || y == nullptr || mean == nullptr ||
      invstd == nullptr || sum_dy == nullptr || sum_dy_xhat == nullptr)
    return cudaErrorInvalidValue;
  if (plan.vec != detail::reduce_vec_width(static_cast<int>(sizeof(scalar_t)), C, inner,
                                           channels_last))
    return cudaErrorInvalidValue;
  constexpr int VM = detail::max_vec<scalar_t>();
  const int64_t s = plan.splits;
  if (plan.vec == VM && VM > 1) {
    // Same V (same order) either way; misaligned pointers only switch to scalar accesses.
    const bool aligned = detail::aligned16(grad_out) && detail::aligned16(out) &&
                         detail::aligned16(y) && detail::aligned16(dy);
    if (aligned) {
      return out != nullptr
                 ? run_backward_reduce<scalar_t, acc_t, VM, true, true>(
                       grad_out, out, y, mean, invstd, dy, numel, C, inner, channels_last, s,
                       workspace, sum_dy, sum_dy_xhat, stream)
                 : run_backward_reduce<scalar_t, acc_t, VM, false, true>(
                       grad_out, out, y, mean, invstd, dy, numel, C, inner, channels_last, s,
                       workspace, sum_dy, sum_dy_xhat, stream);
    }
    return out != nullptr
               ? run_backward_reduce<scalar_t, acc_t, VM, true, false>(
                     grad_out, out, y, mean, invstd, dy, numel, C, inner, channels_last, s,
                     workspace, sum_dy, sum_dy_xhat, stream)
               : run_backward_reduce<scalar_t, acc_t, VM, false, false>(
                     grad_out, out, y, mean, invstd, dy, numel, C, inner, channels_last, s,
                     workspace, sum_dy, sum_dy_xhat, stream);
  }
  if (plan.vec == 1) {
    return out != nullptr
               ? run_backward_reduce<scalar_t, acc_t, 1, true, true>(
                     grad_out, out, y, mean, invstd, dy, numel, C, inner, channels_last, s,
                     workspace, sum_dy, sum_dy_xhat, stream)
               : run_backward_reduce<scalar_t, acc_t, 1, false, true>(
                     grad_out, out, y, mean, invstd, dy, numel, C, inner, channels_last, s,
                     workspace, sum_dy, sum_dy_xhat, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_bn_backward_apply(
    const scalar_t* grad_out, const scalar_t* out, const scalar_t* y, const acc_t* mean,
    const acc_t* invstd, const acc_t* weight, const acc_t* sum_dy, const acc_t* sum_dy_xhat,
    scalar_t* grad_y, int64_t numel, int64_t C, int64_t inner, bool channels_last,
    cudaStream_t stream) {
  static_assert(std::is_same_v<acc_t, typename OpMath<scalar_t>::type>,
                "acc_t must be double for double and float otherwise");
  if (numel <= 0) return cudaSuccess;
  if (C <= 0 || inner <= 0 || grad_out == nullptr || y == nullptr || mean == nullptr ||
      invstd == nullptr || sum_dy == nullptr || sum_dy_xhat == nullptr || grad_y == nullptr)
    return cudaErrorInvalidValue;
  constexpr int VM = detail::max_vec<scalar_t>();
  const bool aligned = detail::aligned16(grad_out) && detail::aligned16(out) &&
                       detail::aligned16(y) && detail::aligned16(grad_y);
  if (detail::vec_width(sizeof(scalar_t), C, inner, channels_last, aligned) == VM && VM > 1) {
    return out != nullptr
               ? run_backward_apply<scalar_t, acc_t, VM, true>(
                     grad_out, out, y, mean, invstd, weight, sum_dy, sum_dy_xhat, grad_y,
                     numel, C, inner, channels_last, stream)
               : run_backward_apply<scalar_t, acc_t, VM, false>(
                     grad_out, out, y, mean, invstd, weight, sum_dy, sum_dy_xhat, grad_y,
                     numel, C, inner, channels_last, stream);
  }
  return out != nullptr
             ? run_backward_apply<scalar_t, acc_t, 1, true>(
                   grad_out, out, y, mean, invstd, weight, sum_dy, sum_dy_xhat, grad_y,
                   numel, C, inner, channels_last, stream)
             : run_backward_apply<scalar_t, acc_t, 1, false>(
                   grad_out, out, y, mean, invstd, weight, sum_dy, sum_dy_xhat, grad_y,
                   numel, C, inner, channels_last, stream);
}

// Explicit instantiations.
#define SDK_INSTANTIATE_STATS(T, A, R)                                                    \
  template cudaError_t launch_bn_stats<T, A, R>(                                          \
      const T*, int64_t, int64_t, int64_t, bool, const ChannelReducePlan&, A*, double,    \
      double, A*, A*, R*, R*, cudaStream_t);

SDK_INSTANTIATE_STATS(float, float, float)
SDK_INSTANTIATE_STATS(__half, float, float)
SDK_INSTANTIATE_STATS(__nv_bfloat16, float, float)
SDK_INSTANTIATE_STATS(double, double, double)
SDK_INSTANTIATE_STATS(double, double, float)
#undef SDK_INSTANTIATE_STATS

#define SDK_INSTANTIATE_BACKWARD(T, A)                                                    \
  template cudaError_t launch_relu_bn_backward_reduce<T, A>(                              \
      const T*, const T*, const T*, const A*, const A*, T*, int64_t, int64_t, int64_t,    \
      bool, const ChannelReducePlan&, A*, A*, A*, cudaStream_t);                          \
  template cudaError_t launch_bn_backward_apply<T, A>(                                    \
      const T*, const T*, const T*, const A*, const A*, const A*, const A*, const A*, T*, \
      int64_t, int64_t, int64_t, bool, cudaStream_t);

SDK_INSTANTIATE_BACKWARD(float, float)
SDK_INSTANTIATE_BACKWARD(double, double)
SDK_INSTANTIATE_BACKWARD(__half, float)
SDK_INSTANTIATE_BACKWARD(__nv_bfloat16, float)
#undef SDK_INSTANTIATE_BACKWARD

}  // namespace cuda
}  // namespace sdkernels
