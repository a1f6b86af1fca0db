"""Executors of the folded eval forms (``ops.folding``), one per device.

* CPU (extension): ATen (oneDNN) convolutions without bias, each followed by the
  in-place epilogue op ``scale_bias_relu_`` (bias+ReLU, or bias + residual + ReLU)
  written into the convolution's own output; activations in channels_last. Measured on
  an AVX2 CPU, oneDNN's fused post-ops (``mkldnn._convolution_pointwise``) made the
  convolution itself 7-70% slower than a plain one (bias+ReLU least, bias+add+ReLU
  most), and every fresh activation costs its page faults (1.4-2 ms per 4 MiB here), so
  one in-place pass wins.
* CUDA (extension): cuDNN convolutions with the folded weights, then the extension's
  fused bias(+residual)+ReLU epilogue ops.
* Triton: the whole block as implicit-GEMM convolutions with bias+ReLU and
  bias+residual+ReLU epilogues (``sdkernels.ops.triton.block_eval``).
* The reference: the same folded math in plain PyTorch (``block_eval_reference``), the
  oracle of the others.

Outputs stay channels_last even for an NCHW input: converting back in every block cost
~30% of a ResNet-110 eval forward on CPU, and the next block (or any torch op) takes
channels_last as it is. Values are the same either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import extension
from .folding import FoldedBlock, FoldedConv
from .plan import Identity, OptionA

__all__ = ["block_eval_reference", "block_eval_cpu", "block_eval_extension",
           "block_eval_triton", "stem_eval_cpu"]


def _conv(x, c: FoldedConv, bias=True):
    return F.conv2d(x, c.weight, c.bias.to(x.dtype) if bias else None, c.stride, c.padding,
                    c.dilation, c.groups)


def _residual(fb: FoldedBlock, x):
    if isinstance(fb.shortcut, Identity):
        return x
    if fb.projection is not None:
        return _conv(x, fb.projection)
    return fb.shortcut.module(x)


def block_eval_reference(fb: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
    """The folded block in plain PyTorch: the oracle of the fused executors."""
    h = x
    for c in fb.convs[:-1]:
        h = torch.relu(_conv(h, c))
    return torch.relu(_conv(h, fb.convs[-1]) + _residual(fb, x))


def block_eval_cpu(fb: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
    h = x
    for c in fb.convs[:-1]:
        h = extension.scale_bias_relu_(_conv(h, c, bias=False), c.ones, c.bias)
    r = _residual(fb, x)
    last = fb.convs[-1]
    return extension.scale_bias_relu_(_conv(h, last, bias=False), last.ones, last.bias,
                                      r.to(h.dtype).contiguous(memory_format=torch.channels_last))


def block_eval_extension(fb: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
    h = x
    for c in fb.convs[:-1]:
        h = extension.scale_bias_relu(_conv(h, c, bias=False), c.ones, c.bias)
    r = _residual(fb, x).to(x.dtype).contiguous(memory_format=torch.channels_last)
    last = fb.convs[-1]
    return extension.scale_bias_add_relu(_conv(h, last, bias=False), last.ones, last.bias, r)


def _triton_shortcut(fb: FoldedBlock):
    if isinstance(fb.shortcut, Identity):
        return ("identity",)
    if fb.projection is not None:
        return ("projection", fb.projection.as_tuple())
    if isinstance(fb.shortcut, OptionA):
        return ("option_a", fb.shortcut.module.stride, fb.shortcut.module.out_planes)
    return None


def block_eval_triton(fb: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
    """The Triton block kernel where it takes the block (its shortcut kinds, plain
    convolutions, float32/16 and bfloat16); the extension's executor otherwise."""
    sc = _triton_shortcut(fb)
    if sc is None or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not all(
            c.groups == 1 and c.dilation == (1, 1) for c in fb.convs):
        return block_eval_extension(fb, x)
    from . import triton as tri
    return tri.block_eval(x, [c.as_tuple() for c in fb.convs], sc)


def stem_eval_cpu(fc: FoldedConv, x: torch.Tensor) -> torch.Tensor:
    """relu(conv'(x) + bias') of a folded stem, the epilogue in place (as the blocks')."""
    return extension.scale_bias_relu_(_conv(x, fc, bias=False), fc.ones, fc.bias)
