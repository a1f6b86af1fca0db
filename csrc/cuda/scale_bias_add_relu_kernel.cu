// CUDA kernels of sdkernels::scale_bias_add_relu and scale_bias_relu. No torch headers
// (see the .cuh). Both directions run on the drivers of channel_kernels.cuh (shared with
// batch_norm_kernel.cu):
// * forward (both ops, one Op with a kHasResidual flag): the layout-aware vectorised
//   elementwise driver (16-byte accesses, per-channel scale/bias in registers for
//   channels_last, 32-bit index arithmetic for NCHW);
// * backward: one pass of the two-stage channel-reduce driver whose Op also stores
//   grad_x and grad_residual. channels_last reduces coalesced rows of C (blocks of
//   (tx, ty) threads over column vectors x rows), NCHW one block per (channel, split)
//   over the channel's runs of `inner`; no per-element 64-bit division or modulo; the
//   split is shape-only and partials merge in a fixed order (deterministic, and equal
//   for aligned and misaligned inputs).
#include "scale_bias_add_relu_kernel.cuh"

#include <type_traits>

#include "channel_kernels.cuh"

namespace sdkernels {
namespace cuda {
namespace {

constexpr int kForwardUnroll = 4;   // one or two inputs: 4 vectors in flight per thread
constexpr int kBackwardUnroll = 2;  // three inputs

using detail::from_acc;
using detail::load_vec;
using detail::OpMath;
using detail::store_vec;
using detail::to_acc;
using detail::Vec;

// out = relu(x * scale[c] + bias[c] (+ residual)), math in acc_t.
template <typename scalar_t, typename param_t, int V, bool kHasResidual>
struct ScaleBiasReluOp {
  using acc_t = typename OpMath<scalar_t>::type;
  struct Chan {
    acc_t s, b;
  };
  struct Loaded {
    Vec<scalar_t, V> x;
    Vec<scalar_t, V> r;
  };
  const scalar_t* x;
  const param_t* scale;
  const param_t* bias;
  const scalar_t* residual;  // null unless kHasResidual
  scalar_t* out;

  __device__ __forceinline__ Chan channel(int64_t c) const {
    return Chan{static_cast<acc_t>(to_acc(scale[c])), static_cast<acc_t>(to_acc(bias[c]))};
  }
  __device__ __forceinline__ Loaded load(int64_t i) const {
    Loaded in;
    in.x = load_vec<scalar_t, V>(x + i);
    if constexpr (kHasResidual) in.r = load_vec<scalar_t, V>(residual + i);
    return in;
  }
  template <int NC>
  __device__ __forceinline__ void store(int64_t i, const Loaded& in, const Chan* ch) const {
    Vec<scalar_t, V> o;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const Chan& cc = ch[NC == 1 ? 0 : v];
      acc_t y = static_cast<acc_t>(to_acc(in.x.v[v])) * cc.s + cc.b;
      if constexpr (kHasResidual) y = y + static_cast<acc_t>(to_acc(in.r.v[v]));
      // `y < 0 ? 0 : y` keeps NaN, like torch.relu.
      o.v[v] = from_acc<scalar_t>(y < acc_t(0) ? acc_t(0) : y);
    }
    store_vec<scalar_t, V>(out + i, o);
  }
};

template <typename scalar_t, typename param_t, bool kHasResidual>
cudaError_t run_scale_bias_relu_forward(const scalar_t* x, const param_t* scale,
                                        const param_t* bias, const scalar_t* residual,
                                        scalar_t* out, int64_t numel, int64_t C,
                                        int64_t inner, bool channels_last,
                                        cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  if (x == nullptr || scale == nullptr || bias == nullptr || out == nullptr ||
      (kHasResidual && residual == nullptr))
    return cudaErrorInvalidValue;
  constexpr int VM = detail::max_vec<scalar_t>();
  const bool aligned = detail::aligned16(x) && detail::aligned16(residual) &&
                       detail::aligned16(out);
  if (VM > 1 &&
      detail::vec_width(sizeof(scalar_t), C, inner, channels_last, aligned) == VM) {
    const ScaleBiasReluOp<scalar_t, param_t, VM, kHasResidual> op{x, scale, bias, residual,
                                                                  out};
    return detail::launch_elementwise<VM, kForwardUnroll>(op, numel, C, inner, channels_last,
                                                          stream);
  }
  const ScaleBiasReluOp<scalar_t, param_t, 1, kHasResidual> op{x, scale, bias, residual, out};
  return detail::launch_elementwise<1, kForwardUnroll>(op, numel, C, inner, channels_last,
                                                       stream);
}

// Backward: g = out > 0 ? grad_out : 0; stores grad_residual = g and grad_x = g * s[c],
// accumulates a += g * x, b += g. kAligned: every pointer is 16-byte aligned (vector
// accesses); else the same V elements with scalar accesses, same summation order.
template <typename scalar_t, int V, bool kAligned>
struct BackwardOp {
  using acc_t = typename OpMath<scalar_t>::type;
  struct Chan {
    acc_t s;
  };
  struct Loaded {
    Vec<scalar_t, V> g;
    Vec<scalar_t, V> o;
    Vec<scalar_t, V> x;
  };
  const scalar_t* grad_out;
  const scalar_t* out;
  const scalar_t* x;
  const acc_t* scale;
  scalar_t* grad_x;
  scalar_t* grad_residual;

  __device__ __forceinline__ Chan channel(int64_t c) const { return Chan{scale[c]}; }
  __device__ __forceinline__ Loaded load(int64_t i) const {
    Loaded in;
    in.g = load_vec<scalar_t, V, kAligned>(grad_out + i);
    in.o = load_vec<scalar_t, V, kAligned>(out + i);
    in.x = load_vec<scalar_t, V, kAligned>(x + i);
    return in;
  }
  template <int NC>
  __device__ __forceinline__ void accumulate(int64_t i, const Loaded& in, const Chan* ch,
                                             acc_t* a, acc_t* b) const {
    Vec<scalar_t, V> gx, gr;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      // `out > 0` is false for NaN out: like the reference (grad where out > 0).
      const bool pos = static_cast<acc_t>(to_acc(in.o.v[v])) > acc_t(0);
      const acc_t g = pos ? static_cast<acc_t>(to_acc(in.g.v[v])) : acc_t(0);
      gr.v[v] = from_acc<scalar_t>(g);  // exact: g is grad_out's value or 0
      gx.v[v] = from_acc<scalar_t>(g * ch[NC == 1 ? 0 : v].s);
      a[v] += g * static_cast<acc_t>(to_acc(in.x.v[v]));
      b[v] += g;
    }
    store_vec<scalar_t, V, kAligned>(grad_x + i, gx);
    store_vec<scalar_t, V, kAligned>(grad_residual + i, gr);
  }
};

template <typename acc_t>
struct BackwardFin {
  acc_t* grad_scale;
  acc_t* grad_bias;

  __device__ __forceinline__ void finish(int64_t c, double s_gx, double s_g) const {
    grad_scale[c] = static_cast<acc_t>(s_gx);
    grad_bias[c] = static_cast<acc_t>(s_g);
  }
};

template <typename scalar_t, typename acc_t, int V, bool kAligned>
cudaError_t run_backward(const scalar_t* grad_out, const scalar_t* out, const scalar_t* x,
                         const acc_t* scale, scalar_t* grad_x, scalar_t* grad_residual,
                         int64_t numel, int64_t C, int64_t inner, bool channels_last,
                         int64_t splits, acc_t* workspace, acc_t* grad_scale,
                         acc_t* grad_bias, cudaStream_t stream) {
  const BackwardOp<scalar_t, V, kAligned> op{grad_out, out, x, scale, grad_x, grad_residual};
  const BackwardFin<acc_t> fin{grad_scale, grad_bias};
  return detail::launch_channel_reduce<V, kBackwardUnroll>(op, fin, numel, C, inner,
                                                           channels_last, splits, workspace,
                                                           stream);
}

}  // namespace

template <typename scalar_t, typename param_t>
cudaError_t launch_scale_bias_add_relu_forward(
    const scalar_t* x, const param_t* scale, const param_t* bias, const scalar_t* residual,
    scalar_t* out, int64_t numel, int64_t C, int64_t inner, bool channels_last,
    cudaStream_t stream) {
  return run_scale_bias_relu_forward<scalar_t, param_t, true>(
      x, scale, bias, residual, out, numel, C, inner, channels_last, stream);
}

template <typename scalar_t, typename param_t>
cudaError_t launch_scale_bias_relu_forward(const scalar_t* x, const param_t* scale,
                                           const param_t* bias, scalar_t* out, int64_t numel,
                                           int64_t C, int64_t inner, bool channels_last,
                                           cudaStream_t stream) {
  return run_scale_bias_relu_forward<scalar_t, param_t, false>(
      x, scale, bias, nullptr, out, numel, C, inner, channels_last, stream);
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_scale_bias_add_relu_backward(
    const scalar_t* grad_out, const scalar_t* out, const scalar_t* x, const acc_t* scale,
    scalar_t* grad_x, scalar_t* grad_residual, int64_t numel, int64_t C, int64_t inner,
    bool channels_last, const ChannelReducePlan& plan, acc_t* workspace, acc_t* grad_scale,
    acc_t* grad_bias, cudaStream_t stream) {
  static_assert(std::is_same_v<acc_t, typename OpMath<scalar_t>::type>,
                "acc_t must be double for double and float otherwise");
  if (numel <= 0) return cudaSuccess;
  if (C <= 0 || inner <= 0 || grad_out == nullptr || out == nullptr || x == nullptr ||
      scale == nullptr || grad_x == nullptr || grad_residual == nullptr ||
      workspace == nullptr || grad_scale == nullptr || grad_bias == nullptr)
    return cudaErrorInvalidValue;
  // The plan must be the shape-only one (same summation order for every alignment).
  if (plan.vec != detail::reduce_vec_width(static_cast<int>(sizeof(scalar_t)), C, inner,
                                           channels_last))
    return cudaErrorInvalidValue;
  constexpr int VM = detail::max_vec<scalar_t>();
  const int64_t s = plan.splits;
  if (plan.vec == VM && VM > 1) {
    const bool aligned = detail::aligned16(grad_out) && detail::aligned16(out) &&
                         detail::aligned16(x) && detail::aligned16(grad_x) &&
                         detail::aligned16(grad_residual);
    return aligned ? run_backward<scalar_t, acc_t, VM, true>(
                         grad_out, out, x, scale, grad_x, grad_residual, numel, C, inner,
                         channels_last, s, workspace, grad_scale, grad_bias, stream)
                   : run_backward<scalar_t, acc_t, VM, false>(
                         grad_out, out, x, scale, grad_x, grad_residual, numel, C, inner,
                         channels_last, s, workspace, grad_scale, grad_bias, stream);
  }
  if (plan.vec == 1) {
    return run_backward<scalar_t, acc_t, 1, true>(grad_out, out, x, scale, grad_x,
                                                  grad_residual, numel, C, inner,
                                                  channels_last, s, workspace, grad_scale,
                                                  grad_bias, stream);
  }
  return cudaErrorInvalidValue;
}

// Explicit instantiations: (x dtype, scale/bias dtype).
#define SDK_INSTANTIATE_FORWARD(T, P)                                                     \
  template cudaError_t launch_scale_bias_add_relu_forward<T, P>(                          \
      const T*, const P*, const P*, const T*, T*, int64_t, int64_t, int64_t, bool,        \
      cudaStream_t);                                                                      \
  template cudaError_t launch_scale_bias_relu_forward<T, P>(                              \
      const T*, const P*, const P*, T*, int64_t, int64_t, int64_t, bool, cudaStream_t);

SDK_INSTANTIATE_FORWARD(float, float)
SDK_INSTANTIATE_FORWARD(double, double)
SDK_INSTANTIATE_FORWARD(double, float)
SDK_INSTANTIATE_FORWARD(__half, __half)
SDK_INSTANTIATE_FORWARD(__half, float)
SDK_INSTANTIATE_FORWARD(__nv_bfloat16, __nv_bfloat16)
SDK_INSTANTIATE_FORWARD(__nv_bfloat16, float)
#undef SDK_INSTANTIATE_FORWARD

// (x dtype, accumulator dtype).
#define SDK_INSTANTIATE_BACKWARD(T, A)                                                    \
  template cudaError_t launch_scale_bias_add_relu_backward<T, A>(                         \
      const T*, const T*, const T*, const A*, T*, T*, int64_t, int64_t, int64_t, bool,    \
      const ChannelReducePlan&, A*, A*, A*, cudaStream_t);

SDK_INSTANTIATE_BACKWARD(float, float)
SDK_INSTANTIATE_BACKWARD(double, double)
SDK_INSTANTIATE_BACKWARD(__half, float)
SDK_INSTANTIATE_BACKWARD(__nv_bfloat16, float)
#undef SDK_INSTANTIATE_BACKWARD

}  // namespace cuda
}  // namespace sdkernels
