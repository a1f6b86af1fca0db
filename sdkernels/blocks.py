"""Drop-in residual blocks whose dropped work is really skipped.

``BasicBlock`` and ``Bottleneck`` take torchvision's constructor arguments and keep its
parameter names and state_dict keys, plus keyword-only ``survival_prob``, ``mode`` and
``scaling`` (design §2):

* training, ``mode="batch"``: one gate b ~ Bernoulli(p) per forward. b = 1:
  ``relu(shortcut(x) + s * f(x))``; b = 0: ``relu(shortcut(x))`` and nothing of the
  residual branch f runs (no convolution, no BN statistics or running-stat update, no
  autograd node). With an identity shortcut the input itself is returned.
* training, ``mode="row"``: one gate per sample; f runs on the surviving samples only
  (gathered), so its BN statistics are the survivors'.
* ``scaling="test"`` (the paper): s = 1 in training, eval computes
  ``relu(shortcut(x) + p * f(x))``. ``scaling="train"`` (torchvision/timm): s = 1/p in
  training, eval computes ``relu(shortcut(x) + f(x))``.

The naive stochastic depth that torchvision and timm implement (compute f, multiply by
the mask) is available as ``drop_impl="mask"``: it is the baseline of the benchmarks.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from . import layers, ops
from .gates import GateGenerator
from .ops import reference
from .residual import (DROP_IMPLS, DROPPED_GRADS, MODES, SCALINGS, GatedResidual,
                       branch_has_batchnorm, copy_rows, decide, gather_rows)

__all__ = ["StochasticDepthBlock", "BasicBlock", "Bottleneck", "MODES", "SCALINGS",
           "DROPPED_GRADS", "DROP_IMPLS"]


def conv_bn_relu(owner: nn.Module, conv: nn.Module, bn: nn.Module, relu: nn.Module, x):
    """``relu(bn(conv(x)))`` of ``owner``'s stem through ``ops.conv_bn_relu`` (fused
    where the implementation allows, design §5); the folded eval weights are cached in
    ``owner._stem_fold_cache``."""
    cache = getattr(owner, "_stem_fold_cache", None)
    return ops.conv_bn_relu(x, ops.stem_plan(conv, bn, relu),
                            ops.FoldCache() if cache is None else cache)


class StochasticDepthBlock(GatedResidual):
    """Base of the drop-in ResNet blocks: the generic rule (``sdkernels.residual``) whose
    branch is Conv-BN-ReLU-Conv-BN(-ReLU-Conv-BN) and whose active path is fused.

    Subclasses define ``_branch(x)`` (the residual branch up to, not including, its last
    norm), ``_last_norm`` (that norm), ``_conv_bn_stages`` (the branch's conv + norm
    pairs, for :meth:`branch_plan`) and ``_branch_modules`` (for zero gradients). Blocks
    hold state and gates only: ``ops.residual_block`` decides how an active block runs.
    The shortcut module lives under ``downsample`` (torchvision/timm) or another
    attribute named by ``_shortcut_attr`` (``shortcut`` in common CIFAR code), so that
    state_dict keys stay those of the block it replaces.
    """

    _shortcut_attr = "downsample"

    def _init_sd(self, survival_prob, mode, scaling, gate_generator, dropped_grads, drop_impl):
        self._init_gate(survival_prob, mode, scaling, gate_generator, dropped_grads, drop_impl)
        # row mode: BatchNorm over one survivor is degenerate (and an error on 1x1 maps),
        # so a single survivor is masked, as in every other BatchNorm branch
        self.min_rows = 2 if branch_has_batchnorm(self._branch_modules()) else 1
        self._sd_origin = None  # what revert() rebuilds; set by convert()
        self._fold_cache = ops.FoldCache()  # folded eval weights (design §5)

    def __setstate__(self, state):
        # whole-model pickles from before the fold cache object
        super().__setstate__(state)
        # before 89b2d18 a ResNet block stored the generic default 1 even with BatchNorm
        if self._min_rows < 2 and branch_has_batchnorm(self._branch_modules()):
            self._min_rows = 2
        if "_fold_cache" not in self.__dict__:
            self._fold_cache = ops.FoldCache()

    # -- pieces -----------------------------------------------------------------------
    @property
    def shortcut_module(self):
        return getattr(self, self._shortcut_attr, None)

    def _shortcut(self, x):
        m = self.shortcut_module
        return x if m is None else m(x)

    def _branch_params(self):
        return [p for mod in self._branch_modules() for p in mod.parameters()]

    def _dropped(self, x, r=None):
        m = self.shortcut_module
        out = x if layers.is_identity(m) else m(x)
        # The block's ReLU after the add, as a module only where a hook must see it (on a
        # copy: it is in place in torchvision, and `out` is the input or the shortcut's
        # own output). Checked inline: under torch.compile this frame may run eagerly (an
        # identity drop traces nothing), and a function called from it would be compiled
        # as a frame of its own.
        relu = self._modules.get("relu")
        if relu is not None and (relu._forward_hooks or relu._forward_pre_hooks
                                 or relu._backward_hooks or relu._backward_pre_hooks):
            out = relu(out.clone())
        elif out is not x:
            out = torch.relu(out)  # block inputs are post-ReLU: relu(x) is x (design §2)
        return self._tie_zero_grads(out, self._branch_params)

    def _relu_hooked(self) -> bool:
        relu = self._modules.get("relu")
        return relu is not None and ops.has_hooks([relu])

    def _final_relu(self, t):
        """relu(t) for a fresh ``t``: the block's ReLU module where a hook must see the
        call, else functional."""
        return self._modules["relu"](t) if self._relu_hooked() else torch.relu(t)

    def branch_plan(self) -> ops.BranchPlan:
        """This block as the ops see it: stages, typed shortcut, mode (design §3)."""
        return ops.branch_plan(self._conv_bn_stages(), self.shortcut_module,
                               training=self.training, branch=self._branch,
                               last_norm=self._last_norm, parameters=self.parameters,
                               relu=self._modules.get("relu"))

    # gate_scale None (the generic rule's "no multiply") is 1 for the ops
    def _active(self, x, r, gate_scale):
        return ops.residual_block(x, self.branch_plan(), 1.0 if gate_scale is None else gate_scale,
                                  self._fold_cache)

    def _active_rows(self, x, r, idx: torch.Tensor, gate_scale):
        gate_scale = 1.0 if gate_scale is None else gate_scale
        m = self.shortcut_module
        sc = self._shortcut(x)
        if self._relu_hooked():
            # the hook sees the block's output once, all rows: add, then one ReLU call
            t = ops.modules_add(gather_rows(x, idx), self.branch_plan(), gate_scale,
                                None if layers.is_identity(m) else gather_rows(sc, idx))
            return self._modules["relu"](copy_rows(sc, idx, t.to(sc.dtype)))
        t = ops.residual_block(gather_rows(x, idx), self.branch_plan(), gate_scale,
                               self._fold_cache,
                               None if layers.is_identity(m) else gather_rows(sc, idx))
        base = sc if layers.is_identity(m) else torch.relu(sc)
        return copy_rows(base, idx, t.to(base.dtype))

    def _mask_forward(self, x, r, keep: torch.Tensor, gate_scale):
        # torchvision / timm: compute everything, then multiply by the mask.
        f = self._last_norm(self._branch(x))
        s = 1.0 if gate_scale is None else gate_scale
        return self._final_relu(self._shortcut(x) + reference.mask_multiply(f, keep, s))

    def forward(self, x):
        # the fused overrides above need no Residual description
        return self.gated(x, None, decide(self, x))

    # -- revert -----------------------------------------------------------------------
    def to_plain(self) -> nn.Module:
        """A plain residual block with the same modules (shared, not copied)."""
        origin = self._sd_origin
        if origin is None:
            cls = layers.Bottleneck if isinstance(self, Bottleneck) else layers.BasicBlock
            order = list(self._modules)
            plain = cls.__new__(cls)
            nn.Module.__init__(plain)
            plain.stride = getattr(self, "stride", 1)
            modules = self._modules
        else:
            cls, attrs, saved, order = origin
            plain = cls.__new__(cls)
            plain.__dict__.update(dict(attrs))
            plain._parameters = OrderedDict()
            plain._buffers = OrderedDict()
            modules = dict(saved)
            modules.update(self._modules)
        plain._parameters.update(self._parameters)
        plain._buffers.update(self._buffers)
        plain._modules = OrderedDict((n, modules[n]) for n in order if n in modules)
        if origin is None and "downsample" not in plain._modules:
            plain.downsample = None  # torchvision's forward reads it
        plain.train(self.training)
        return plain


class BasicBlock(StochasticDepthBlock):
    """torchvision's BasicBlock (Conv3x3-BN-ReLU-Conv3x3-BN + shortcut) with stochastic depth."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None,
                 *, survival_prob: float = 1.0, mode: str = "batch", scaling: str = "test",
                 gate_generator: GateGenerator | None = None, dropped_grads: str = "auto",
                 drop_impl: str = "skip"):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_sd(survival_prob, mode, scaling, gate_generator, dropped_grads, drop_impl)

    @property
    def _last_norm(self):
        return self.bn2

    def _branch_modules(self):
        return (self.conv1, self.bn1, self.conv2, self.bn2)

    def _conv_bn_stages(self):
        return ((self.conv1, self.bn1), (self.conv2, self.bn2))

    def _branch(self, x):
        return self.conv2(self.relu(self.bn1(self.conv1(x))))


class Bottleneck(StochasticDepthBlock):
    """torchvision's Bottleneck (1x1-BN-ReLU-3x3-BN-ReLU-1x1-BN + shortcut) with stochastic depth."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1, norm_layer=None,
                 *, survival_prob: float = 1.0, mode: str = "batch", scaling: str = "test",
                 gate_generator: GateGenerator | None = None, dropped_grads: str = "auto",
                 drop_impl: str = "skip"):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, groups=groups, bias=False,
                               dilation=dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_sd(survival_prob, mode, scaling, gate_generator, dropped_grads, drop_impl)

    @property
    def _last_norm(self):
        return self.bn3

    def _branch_modules(self):
        return (self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3)

    def _conv_bn_stages(self):
        return ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))

    def _branch(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.conv3(y)
