"""Eval path: BN and p_l folded into the convolutions, cached per block.

In eval a residual block is ``relu(shortcut(x) + g * f(x))`` with fixed BN statistics
and a fixed gate scale g (p_l under ``scaling="test"``, 1 under ``"train"``). Each
conv + BN stage folds into one convolution with a bias::

    w' = w * gamma / sqrt(var + eps) * g        b' = (beta - mean * gamma / sqrt(var + eps)) * g

(g only on the last stage), so a BasicBlock becomes two convolutions with a bias+ReLU
and a bias+residual+ReLU epilogue (DESIGN 5). Projection shortcuts (1x1 conv + BN) fold
the same way.

Folded weights are cached on the block and rebuilt when any source tensor changes:
the cache key holds each conv weight's and BN tensor's identity and version counter
(in-place updates such as ``optimizer.step()`` or ``load_state_dict`` bump it), the
gate scale, dtype, device and layout. Writes through ``.data`` bypass version counters:
after those, call ``clear_cache(model)``, which drops every cache.

Executors, per device:
* CPU: ATen (oneDNN) convolutions without bias, each followed by the in-place epilogue
  op ``sdkernels::scale_bias_relu_`` (bias+ReLU, or bias + residual + ReLU) written into
  the convolution's own output; activations in channels_last. Measured on an AVX2 CPU,
  oneDNN's fused post-ops (``mkldnn._convolution_pointwise``) made the convolution itself
  7-70% slower than a plain one (bias+ReLU least, bias+add+ReLU most), and every fresh
  activation costs its page faults (1.4-2 ms per 4 MiB here), so one in-place pass wins.
* CUDA: cuDNN convolutions with the folded weights, then the extension's fused
  bias(+residual)+ReLU epilogue ops.
* Triton (``use_backend("triton")``): the whole block as implicit-GEMM convolutions
  with bias+ReLU and bias+residual+ReLU epilogues (``sdkernels.ops.triton.block_eval``).
* The reference: the same folded math in plain PyTorch (``block_eval_reference``).

Used only when no gradient is needed (``torch.no_grad()`` / ``inference_mode`` or no
parameter requiring grad): folding under autograd would need its own backward, so eval
with gradients runs the module path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backends import effective_device_type
from .layers import OptionAShortcut, is_identity

__all__ = ["fold_conv_bn", "FoldedConv", "FoldedBlock", "fold_block", "block_eval",
           "block_eval_reference", "clear_cache", "can_fold", "conv_bn_relu_eval"]

_CACHE_ATTR = "_sd_fold_cache"
_STEM_CACHE_ATTR = "_sd_stem_fold_cache"


def fold_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d, gate_scale: float = 1.0,
                 conv_bias: Optional[torch.Tensor] = None):
    """(weight', bias') of conv followed by eval-mode ``bn``, times ``gate_scale``.

    Computed in float64 and cast back, so folding adds no error of its own.
    """
    w = weight.detach().double()
    invstd = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    gamma = invstd if bn.weight is None else bn.weight.detach().double() * invstd
    mean = bn.running_mean.detach().double()
    if conv_bias is not None:
        mean = mean - conv_bias.detach().double()
    beta = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().double()
    scale = gamma * gate_scale
    w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b = (beta - mean * gamma) * gate_scale
    return w.to(weight.dtype), b.to(torch.float32 if weight.dtype != torch.float64 else torch.float64)


@dataclass
class FoldedConv:
    weight: torch.Tensor           # folded, in the compute dtype (channels_last for 4-D)
    bias: torch.Tensor             # folded, float32 (float64 for float64)
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    ones: Optional[torch.Tensor] = None     # unit scale of the in-place epilogue (CPU)

    def as_tuple(self):
        return (self.weight, self.bias, self.stride, self.padding)


@dataclass
class FoldedBlock:
    convs: list            # [FoldedConv]: every one but the last followed by ReLU
    shortcut: tuple        # ("identity",) | ("module", module) | ("projection", FoldedConv)


def _plain_bn(m) -> bool:
    return type(m) is nn.BatchNorm2d and m.running_mean is not None and m.running_var is not None


def _plain_conv(m) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _projection(m):
    """(conv, bn) when ``m`` is a torchvision-style projection Sequential(conv1x1, BN)."""
    if type(m) is nn.Sequential and len(m) == 2 and _plain_conv(m[0]) and _plain_bn(m[1]):
        return m[0], m[1]
    return None


def can_fold(block) -> bool:
    """True when the block's branch is plain Conv2d + BatchNorm2d stages."""
    stages = getattr(block, "_conv_bn_stages", None)
    if stages is None:
        return False
    return all(_plain_conv(c) and _plain_bn(b) for c, b in stages())


def _key(block, gate_scale, dtype, device):
    stages = list(block._conv_bn_stages())
    proj = _projection(block.shortcut_module) if block.shortcut_module is not None else None
    if proj is not None:
        stages.append(proj)
    return _stages_key(stages, gate_scale, dtype, device)


def _stages_key(stages, gate_scale, dtype, device):
    """Identity and version of every tensor folding reads, plus the fold's settings."""
    parts = [gate_scale, dtype, device]
    for conv, bn in stages:
        parts.append(bn.eps)
        for t in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            # the storage (not data_ptr, which fake tensors refuse) changes when a
            # parameter's .data is replaced
            parts.append(None if t is None else (id(t), t.untyped_storage()._cdata,
                                                 t._version))
    return tuple(parts)


def _fold_one(conv: nn.Conv2d, bn, gate_scale, dtype) -> FoldedConv:
    w, b = fold_conv_bn(conv.weight, bn, gate_scale, conv.bias)
    w = w.to(dtype).contiguous(memory_format=torch.channels_last)
    if dtype == torch.float64:
        b = b.double()
    return FoldedConv(w, b, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
                      conv.groups, torch.ones_like(b))


def fold_block(block, gate_scale: float, dtype: torch.dtype,
               device: torch.device) -> FoldedBlock:
    """The block's folded eval form, from its cache when nothing changed."""
    return _cached(block, _CACHE_ATTR, _key(block, gate_scale, dtype, device),
                   lambda: _fold_block(block, gate_scale, dtype))


def _cached(owner: nn.Module, attr: str, key, build):
    """owner's cached value under ``attr`` when its key matches, else ``build()`` (stored)."""
    cached = owner.__dict__.get(attr)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        owner.__dict__[attr] = cached
    return cached[1]


def _fold_block(block, gate_scale: float, dtype: torch.dtype) -> FoldedBlock:
    stages = block._conv_bn_stages()
    convs = [_fold_one(c, b, gate_scale if i == len(stages) - 1 else 1.0, dtype)
             for i, (c, b) in enumerate(stages)]
    m = block.shortcut_module
    if is_identity(m):
        shortcut = ("identity",)
    elif _projection(m) is not None:
        pc, pb = _projection(m)
        shortcut = ("projection", _fold_one(pc, pb, 1.0, dtype))
    else:
        shortcut = ("module", m)
    return FoldedBlock(convs, shortcut)


def clear_cache(model: nn.Module) -> None:
    """Drop every block's (and stem's) cached folded weights; rebuilt on the next call."""
    for m in model.modules():
        m.__dict__.pop(_CACHE_ATTR, None)
        m.__dict__.pop(_STEM_CACHE_ATTR, None)


# ---------------------------------------------------------------------------------------
# Executors

def _conv(x, c: FoldedConv, bias=True):
    return F.conv2d(x, c.weight, c.bias.to(x.dtype) if bias else None, c.stride, c.padding,
                    c.dilation, c.groups)


def _residual(fb: FoldedBlock, x, conv_fn):
    kind = fb.shortcut[0]
    if kind == "identity":
        return x
    if kind == "projection":
        return conv_fn(x, fb.shortcut[1])
    return fb.shortcut[1](x)


def block_eval_reference(fb: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
    """The folded block in plain PyTorch: the oracle of the fused executors."""
    h = x
    for c in fb.convs[:-1]:
        h = torch.relu(_conv(h, c))
    r = _residual(fb, x, _conv)
    return torch.relu(_conv(h, fb.convs[-1]) + r)


def _epilogue_(y: torch.Tensor, c: FoldedConv, residual=None) -> torch.Tensor:
    """relu(y + bias (+ residual)) written into y (the CPU executor's epilogue)."""
    torch.ops.sdkernels.scale_bias_relu_(y, c.ones, c.bias, residual)
    return y


def _block_eval_cpu(fb: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
    h = x
    for c in fb.convs[:-1]:
        h = _epilogue_(_conv(h, c, bias=False), c)
    kind = fb.shortcut[0]
    if kind == "identity":
        r = x
    elif kind == "projection":
        r = _conv(x, fb.shortcut[1])
    else:
        r = fb.shortcut[1](x)
    last = fb.convs[-1]
    return _epilogue_(_conv(h, last, bias=False), last,
                      r.to(h.dtype).contiguous(memory_format=torch.channels_last))


def _block_eval_extension(fb: FoldedBlock, x: torch.Tensor) -> torch.Tensor:
    ext = torch.ops.sdkernels
    h = x
    for c in fb.convs[:-1]:
        y = _conv(h, c, bias=False)
        h = ext.scale_bias_relu(y, _ones(c.bias), c.bias)
    r = _residual(fb, x, _conv).to(x.dtype).contiguous(memory_format=torch.channels_last)
    last = fb.convs[-1]
    y = _conv(h, last, bias=False)
    return ext.scale_bias_add_relu(y, _ones(last.bias), last.bias, r)


def _ones(b: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(b)


def block_eval(block, x: torch.Tensor, gate_scale: float, backend: str) -> torch.Tensor:
    """relu(shortcut(x) + gate_scale * f(x)) in eval, folded; output in channels_last."""
    dtype = x.dtype
    dev = effective_device_type(x.device)  # meta stands for cuda in a dry run
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    xc = x.to(dtype).contiguous(memory_format=torch.channels_last)
    fb = fold_block(block, float(gate_scale), dtype, x.device)
    with torch.autocast(dev, enabled=False):
        if x.device.type == "cpu" and backend == "extension":
            out = _block_eval_cpu(fb, xc)
        elif backend == "triton" and _triton_shortcut(block, fb) is not None and all(
                c.groups == 1 and c.dilation == (1, 1) for c in fb.convs) and dtype in (
                torch.float32, torch.float16, torch.bfloat16):
            from .ops import triton as tri
            out = tri.block_eval(xc, [c.as_tuple() for c in fb.convs], _triton_shortcut(block, fb))
        elif backend in ("extension", "triton"):
            out = _block_eval_extension(fb, xc)
        else:
            out = block_eval_reference(fb, xc)
    # The output stays channels_last even for an NCHW input: converting back in every
    # block cost ~30% of a ResNet-110 eval forward on CPU, and the next block (or any
    # torch op) takes channels_last as it is. Values are the same either way.
    return out


def conv_bn_relu_eval(owner: nn.Module, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                      x: torch.Tensor) -> torch.Tensor:
    """relu(bn(conv(x))) in eval with BN folded into the convolution (a network's stem).

    The folded convolution is cached on ``owner`` like a block's; on CPU it runs as the
    blocks' do (plain convolution, in-place bias+ReLU). The output is channels_last, as
    the blocks' eval outputs are.
    """
    dtype = x.dtype
    dev = effective_device_type(x.device)  # meta stands for cuda in a dry run
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    xc = x.to(dtype).contiguous(memory_format=torch.channels_last)
    fc = _cached(owner, _STEM_CACHE_ATTR, _stages_key([(conv, bn)], 1.0, dtype, x.device),
                 lambda: _fold_one(conv, bn, 1.0, dtype))
    with torch.autocast(dev, enabled=False):
        if x.device.type == "cpu":
            return _epilogue_(_conv(xc, fc, bias=False), fc)
        return torch.relu(_conv(xc, fc))


def _triton_shortcut(block, fb: FoldedBlock):
    kind = fb.shortcut[0]
    if kind == "identity":
        return ("identity",)
    if kind == "projection":
        return ("projection", fb.shortcut[1].as_tuple())
    m = fb.shortcut[1]
    if type(m) is OptionAShortcut:
        return ("option_a", m.stride, m.out_planes)
    return None  # another shortcut module: the extension executor runs the block
