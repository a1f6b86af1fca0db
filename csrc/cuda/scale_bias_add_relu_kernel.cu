// CUDA kernels of sdkernels::scale_bias_add_relu and scale_bias_relu. No torch headers
// (see the .cuh).
// Forward (both ops, one kernel with a kHasResidual flag): the layout-aware vectorised
// elementwise driver of channel_kernels.cuh (16-byte accesses, per-channel scale/bias in
// registers for channels_last). Backward: grid-stride elementwise kernels and a
// deterministic per-channel reduction (grid (C, splits), fixed-order tree in shared
// memory, partials summed by the host).
#include "scale_bias_add_relu_kernel.cuh"

#include <algorithm>

#include "channel_kernels.cuh"

namespace sdkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;          // elementwise kernels
constexpr int kReduceThreads = 256;    // power of two (tree reduction)
constexpr int64_t kMaxBlocks = 1 << 16;
constexpr int64_t kMaxSplits = 128;
constexpr int64_t kElemsPerReduceThread = 16;
constexpr int kForwardUnroll = 4;

using detail::OpMath;
using detail::Vec;
// Explicit conversions (nvcc flags disable the implicit __half/__nv_bfloat16 ones).
__device__ __forceinline__ float to_opmath(float v) { return detail::to_acc(v); }
__device__ __forceinline__ double to_opmath(double v) { return detail::to_acc(v); }
__device__ __forceinline__ float to_opmath(__half v) { return detail::to_acc(v); }
__device__ __forceinline__ float to_opmath(__nv_bfloat16 v) { return detail::to_acc(v); }
template <typename T>
__device__ __forceinline__ T from_opmath(typename OpMath<T>::type v) {
  return detail::from_acc<T>(v);
}

__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t inner,
                                              bool channels_last) {
  return channels_last ? i % C : (i / inner) % C;
}

int64_t elementwise_blocks(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, kMaxBlocks));
}

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
    return Chan{static_cast<acc_t>(to_opmath(scale[c])), static_cast<acc_t>(to_opmath(bias[c]))};
  }
  __device__ __forceinline__ Loaded load(int64_t i) const {
    Loaded in;
    in.x = detail::load_vec<scalar_t, V>(x + i);
    if constexpr (kHasResidual) in.r = detail::load_vec<scalar_t, V>(residual + i);
    return in;
  }
  template <int NC>
  __device__ __forceinline__ void store(int64_t i, const Loaded& in, const Chan* ch) const {
    Vec<scalar_t, V> o;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const Chan& cc = ch[NC == 1 ? 0 : v];
      acc_t y = to_opmath(in.x.v[v]) * cc.s + cc.b;
      if constexpr (kHasResidual) y = y + to_opmath(in.r.v[v]);
      // `y < 0 ? 0 : y` keeps NaN, like torch.relu.
      o.v[v] = from_opmath<scalar_t>(y < acc_t(0) ? acc_t(0) : y);
    }
    detail::store_vec<scalar_t, V>(out + i, o);
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

template <typename scalar_t, typename param_t>
__global__ void scale_bias_add_relu_backward_elementwise_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
    const param_t* __restrict__ scale, scalar_t* __restrict__ grad_x,
    scalar_t* __restrict__ grad_residual, int64_t numel, int64_t C, int64_t inner,
    bool channels_last) {
  using acc_t = typename OpMath<scalar_t>::type;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const int64_t c = channel_of(i, C, inner, channels_last);
    const bool pos = to_opmath(out[i]) > acc_t(0);
    const acc_t g = pos ? to_opmath(grad_out[i]) : acc_t(0);
    grad_residual[i] = from_opmath<scalar_t>(g);
    grad_x[i] = from_opmath<scalar_t>(g * static_cast<acc_t>(to_opmath(scale[c])));
  }
}

// grid = (C, splits), block = kReduceThreads. Block (c, s) reduces the elements
// p = s * kReduceThreads + tid, p += splits * kReduceThreads of channel c, p in
// [0, numel / C), then writes one partial per (c, s).
template <typename scalar_t, typename acc_t>
__global__ void scale_bias_add_relu_backward_reduce_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
    const scalar_t* __restrict__ x, acc_t* __restrict__ partial_gx,
    acc_t* __restrict__ partial_g, int64_t per_channel, int64_t C, int64_t inner,
    bool channels_last) {
  __shared__ acc_t sh_gx[kReduceThreads];
  __shared__ acc_t sh_g[kReduceThreads];
  const int64_t c = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t splits = gridDim.y;
  const int tid = threadIdx.x;

  acc_t sum_gx = acc_t(0);
  acc_t sum_g = acc_t(0);
  for (int64_t p = split * kReduceThreads + tid; p < per_channel;
       p += splits * kReduceThreads) {
    const int64_t i = channels_last ? p * C + c : ((p / inner) * C + c) * inner + p % inner;
    const bool pos = static_cast<acc_t>(to_opmath(out[i])) > acc_t(0);
    const acc_t g = pos ? static_cast<acc_t>(to_opmath(grad_out[i])) : acc_t(0);
    sum_gx += g * static_cast<acc_t>(to_opmath(x[i]));
    sum_g += g;
  }
  sh_gx[tid] = sum_gx;
  sh_g[tid] = sum_g;
  __syncthreads();
  for (int offset = kReduceThreads / 2; offset > 0; offset >>= 1) {
    if (tid < offset) {
      sh_gx[tid] += sh_gx[tid + offset];
      sh_g[tid] += sh_g[tid + offset];
    }
    __syncthreads();
  }
  if (tid == 0) {
    partial_gx[c * splits + split] = sh_gx[0];
    partial_g[c * splits + split] = sh_g[0];
  }
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

template <typename scalar_t, typename param_t>
cudaError_t launch_scale_bias_add_relu_backward_elementwise(
    const scalar_t* grad_out, const scalar_t* out, const param_t* scale, scalar_t* grad_x,
    scalar_t* grad_residual, int64_t numel, int64_t C, int64_t inner, bool channels_last,
    cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  scale_bias_add_relu_backward_elementwise_kernel<scalar_t, param_t>
      <<<static_cast<unsigned int>(elementwise_blocks(numel)), kThreads, 0, stream>>>(
          grad_out, out, scale, grad_x, grad_residual, numel, C, inner, channels_last);
  return cudaGetLastError();
}

int64_t scale_bias_add_relu_reduce_splits(int64_t numel, int64_t C) {
  if (numel <= 0 || C <= 0) return 1;
  const int64_t per_channel = numel / C;
  const int64_t want =
      (per_channel + kReduceThreads * kElemsPerReduceThread - 1) /
      (kReduceThreads * kElemsPerReduceThread);
  return std::max<int64_t>(1, std::min<int64_t>(want, kMaxSplits));
}

template <typename scalar_t, typename acc_t>
cudaError_t launch_scale_bias_add_relu_backward_reduce(
    const scalar_t* grad_out, const scalar_t* out, const scalar_t* x, acc_t* partial_gx,
    acc_t* partial_g, int64_t numel, int64_t C, int64_t inner, bool channels_last,
    int64_t splits, cudaStream_t stream) {
  if (numel <= 0 || C <= 0) return cudaSuccess;
  if (splits < 1 || splits > 65535 || C > 2147483647LL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(C), static_cast<unsigned int>(splits));
  scale_bias_add_relu_backward_reduce_kernel<scalar_t, acc_t>
      <<<grid, kReduceThreads, 0, stream>>>(grad_out, out, x, partial_gx, partial_g,
                                            numel / C, C, inner, channels_last);
  return cudaGetLastError();
}

// Explicit instantiations: (x dtype, scale/bias dtype).
#define SDK_INSTANTIATE_ELEMENTWISE(T, P)                                                 \
  template cudaError_t launch_scale_bias_add_relu_forward<T, P>(                          \
      const T*, const P*, const P*, const T*, T*, int64_t, int64_t, int64_t, bool,        \
      cudaStream_t);                                                                      \
  template cudaError_t launch_scale_bias_relu_forward<T, P>(                              \
      const T*, const P*, const P*, T*, int64_t, int64_t, int64_t, bool, cudaStream_t);   \
  template cudaError_t launch_scale_bias_add_relu_backward_elementwise<T, P>(             \
      const T*, const T*, const P*, T*, T*, int64_t, int64_t, int64_t, bool, cudaStream_t);

SDK_INSTANTIATE_ELEMENTWISE(float, float)
SDK_INSTANTIATE_ELEMENTWISE(double, double)
SDK_INSTANTIATE_ELEMENTWISE(double, float)
SDK_INSTANTIATE_ELEMENTWISE(__half, __half)
SDK_INSTANTIATE_ELEMENTWISE(__half, float)
SDK_INSTANTIATE_ELEMENTWISE(__nv_bfloat16, __nv_bfloat16)
SDK_INSTANTIATE_ELEMENTWISE(__nv_bfloat16, float)
#undef SDK_INSTANTIATE_ELEMENTWISE

// (x dtype, accumulator dtype).
#define SDK_INSTANTIATE_REDUCE(T, A)                                                      \
  template cudaError_t launch_scale_bias_add_relu_backward_reduce<T, A>(                  \
      const T*, const T*, const T*, A*, A*, int64_t, int64_t, int64_t, bool, int64_t,     \
      cudaStream_t);

SDK_INSTANTIATE_REDUCE(float, float)
SDK_INSTANTIATE_REDUCE(double, double)
SDK_INSTANTIATE_REDUCE(__half, float)
SDK_INSTANTIATE_REDUCE(__nv_bfloat16, float)
#undef SDK_INSTANTIATE_REDUCE

}  // namespace cuda
}  // namespace sdkernels
