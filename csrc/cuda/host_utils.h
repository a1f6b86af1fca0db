// Helpers of the torch-facing CUDA host files (csrc/cuda/*_cuda.cpp): launch-error check,
// at:: -> CUDA scalar types, the layout a kernel walks, raw pointers. Host C++ only.
//
// Only c10/cuda headers are used (CUDAGuard.h, CUDAStream.h; at::cuda::getCurrentCUDAStream
// resolves to c10::cuda's): ATen/cuda/CUDAContext.h would also pull in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which these files do not need.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// Checks the cudaError_t a launcher returns (it reports cudaGetLastError()).
#define SDKERNELS_CUDA_CHECK(op, expr)                                              \
  do {                                                                              \
    const cudaError_t sdk_err_ = (expr);                                            \
    TORCH_CHECK(sdk_err_ == cudaSuccess, op, ": CUDA kernel launch failed: ",       \
                cudaGetErrorString(sdk_err_));                                      \
  } while (0)

namespace sdkernels {
namespace cuda_host {

// at:: scalar type -> the CUDA type the launchers are instantiated for.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

struct Geometry {
  int64_t numel = 0;
  int64_t C = 0;
  int64_t inner = 1;  // prod(shape[2:])
  bool channels_last = false;  // memory is [N * inner, C]
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
};

// The layout of x.contiguous(format) with format = x.suggest_memory_format():
// channels_last / channels_last_3d are rows of C, anything else [N, C, inner].
inline Geometry geometry_of(const at::Tensor& x) {
  Geometry g;
  g.numel = x.numel();
  g.C = x.size(1);
  for (int64_t d = 2; d < x.dim(); ++d) g.inner *= x.size(d);
  g.format = x.suggest_memory_format();
  g.channels_last = g.format != at::MemoryFormat::Contiguous;
  return g;
}

template <typename T>
const typename CudaType<T>::type* cptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaType<T>::type*>(t.const_data_ptr<T>());
}
template <typename T>
typename CudaType<T>::type* mptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaType<T>::type*>(t.mutable_data_ptr<T>());
}

// The statistics dtype: float64 for float64 activations, float32 otherwise.
inline at::ScalarType stats_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The CUDA kernels only run for CUDA tensors (the shared checks put every other input
// on x's device).
inline void check_on_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": expected ", name, " on a CUDA device, got ", t.device());
}

}  // namespace cuda_host
}  // namespace sdkernels
