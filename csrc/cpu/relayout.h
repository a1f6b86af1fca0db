// Layout conversion shared by the CPU kernels (csrc/cpu/relayout.cpp).
#pragma once

#include <ATen/ATen.h>

namespace sdkernels {
namespace cpu {

// x itself when it is already contiguous in `fmt`; otherwise a copy in `fmt`, made by a
// tiled transpose for 4-D NCHW <-> channels_last CPU tensors and by ATen otherwise.
at::Tensor to_memory_format(const at::Tensor& x, at::MemoryFormat fmt);

}  // namespace cpu
}  // namespace sdkernels
