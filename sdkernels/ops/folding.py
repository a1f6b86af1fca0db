"""Eval folding: BN and p_l folded into the convolutions, cached per module.

In eval a residual block is ``relu(shortcut(x) + g * f(x))`` with fixed BN statistics
and a fixed gate scale g (p_l under ``scaling="test"``, 1 under ``"train"``). Each
conv + BN stage folds into one convolution with a bias::

    w' = w * gamma / sqrt(var + eps) * g        b' = (beta - mean * gamma / sqrt(var + eps)) * g

(g only on the last stage), so a BasicBlock becomes two convolutions with a bias+ReLU
and a bias+residual+ReLU epilogue (design §5). Projection shortcuts (1x1 conv + BN)
fold the same way. ``ops.folded_eval`` runs the folded forms.

Each block (and stem) owns a :class:`FoldCache`. Its key holds each conv weight's and
BN tensor's identity, storage and version counter (in-place updates such as
``optimizer.step()`` or ``load_state_dict`` bump it), the gate scale, dtype and
device. Writes through ``.data`` bypass version counters: after those, call
:func:`clear_cache`, which empties every cache of a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .plan import Projection

__all__ = ["FoldCache", "FoldedConv", "FoldedBlock", "fold_conv_bn", "fold_branch",
           "fold_stem", "clear_cache"]


class FoldCache:
    """One module's folded eval weights and the key they were folded under."""

    def __init__(self):
        self._key = None
        self.value = None

    def get(self, key, build):
        """The cached value when ``key`` matches, else ``build()`` (kept)."""
        if self.value is None or self._key != key:
            with torch.no_grad():
                self.value = build()
            self._key = key
        return self.value

    def clear(self) -> None:
        self._key = self.value = None

    # Copies of a model (deepcopy, pickling a whole model) start empty: the key names
    # the original's tensors, so a copied entry could never match.
    def __reduce__(self):
        return (FoldCache, ())

    def __repr__(self):
        return f"FoldCache({'empty' if self.value is None else 'filled'})"


def clear_cache(model: nn.Module) -> None:
    """Empty every fold cache of ``model``'s modules; rebuilt on the next eval call."""
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, FoldCache):
                v.clear()


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
    ones: Optional[torch.Tensor] = None     # unit scale of the epilogue ops

    def as_tuple(self):
        return (self.weight, self.bias, self.stride, self.padding)


@dataclass
class FoldedBlock:
    convs: list                    # [FoldedConv]: every one but the last followed by ReLU
    shortcut: object               # the plan's shortcut (ops.plan)
    projection: Optional[FoldedConv] = None   # folded, when the shortcut is a Projection


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


def _fold_branch(plan, gate_scale: float, dtype: torch.dtype) -> FoldedBlock:
    last = len(plan.stages) - 1
    convs = [_fold_one(c, b, gate_scale if i == last else 1.0, dtype)
             for i, (c, b) in enumerate(plan.stages)]
    sc = plan.shortcut
    proj = _fold_one(sc.conv, sc.bn, 1.0, dtype) if isinstance(sc, Projection) else None
    return FoldedBlock(convs, sc, proj)


def fold_branch(plan, gate_scale: float, dtype: torch.dtype, device: torch.device,
                cache: Optional[FoldCache] = None) -> FoldedBlock:
    """The block's folded eval form, from ``cache`` when nothing changed."""
    if cache is None:
        cache = FoldCache()
    stages = list(plan.stages)
    if isinstance(plan.shortcut, Projection):
        stages.append((plan.shortcut.conv, plan.shortcut.bn))
    return cache.get(_stages_key(stages, gate_scale, dtype, device),
                     lambda: _fold_branch(plan, gate_scale, dtype))


def fold_stem(plan, dtype: torch.dtype, device: torch.device,
              cache: Optional[FoldCache] = None) -> FoldedConv:
    """The stem's conv with its BN folded in, from ``cache`` when nothing changed."""
    if cache is None:
        cache = FoldCache()
    return cache.get(_stages_key(plan.stages, 1.0, dtype, device),
                     lambda: _fold_one(plan.conv, plan.bn, 1.0, dtype))
