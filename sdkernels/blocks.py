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
import torch.distributed as dist
from torch import nn

from . import layers, ops
from .gates import GateGenerator, default_generator, recomputing, survivors
from .ops import reference
from .schedule import check_prob

__all__ = ["StochasticDepthBlock", "BasicBlock", "Bottleneck", "MODES", "SCALINGS",
           "DROPPED_GRADS", "DROP_IMPLS"]

MODES = ("batch", "row")
SCALINGS = ("test", "train")
DROPPED_GRADS = ("auto", "zeros", "none")
DROP_IMPLS = ("skip", "mask")


def _choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: expected one of {allowed}")
    return value


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-drawn gate tensor on ``device``: a host->device copy, never a sync."""
    if device.type == "cpu":
        return t
    # From pinned memory a non_blocking copy neither blocks the host nor waits for the
    # stream (from pageable memory CUDA would). Pinning needs a real CUDA runtime: a dry
    # run on fake tensors has none, and only records the copy. empty + copy_ rather than
    # .to(): a CPU-only torch refuses .to("cuda") even for fake tensors.
    if device.type == "cuda" and torch.cuda.is_available():
        t = t.pin_memory()
    return torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t, non_blocking=True)


@torch.compiler.disable  # host work, like the draw itself (one graph break per block)
def _gate_of(block, gen, key, p, rows):
    """The block's gate for this forward; ``last_gate`` records the forward's gate, not a
    recomputation's (activation checkpointing replays the forward's gate anyway)."""
    g = gen.gate(key, p, rows)
    if not recomputing():
        block.last_gate = g
    return g


class _ZeroGradTie(torch.autograd.Function):
    """Identity on ``out`` that gives each of ``params`` a zero gradient.

    DDP with its defaults (no ``find_unused_parameters``) waits for a gradient of every
    parameter; a dropped block's parameters would never get one. Tying them to the
    block's output costs one small zeros tensor per parameter in backward, no compute.
    """

    @staticmethod
    def forward(ctx, out, *params):
        ctx.meta = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *[torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.meta])


def conv_bn_relu(owner: nn.Module, conv: nn.Module, bn: nn.Module, relu: nn.Module, x):
    """``relu(bn(conv(x)))`` of ``owner``'s stem through ``ops.conv_bn_relu`` (fused
    where the implementation allows, design §5); the folded eval weights are cached in
    ``owner._stem_fold_cache``."""
    cache = getattr(owner, "_stem_fold_cache", None)
    return ops.conv_bn_relu(x, ops.stem_plan(conv, bn, relu),
                            ops.FoldCache() if cache is None else cache)


class StochasticDepthBlock(nn.Module):
    """Base of the stochastic-depth residual blocks.

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
        self.survival_prob = survival_prob
        self.mode = mode
        self.scaling = scaling
        self.gate_generator = gate_generator
        self.dropped_grads = dropped_grads
        self.drop_impl = drop_impl
        self.last_gate = None
        self._gate_key = None  # position in the generator's step draw (GateGenerator.bind)
        self._sd_origin = None  # what revert() rebuilds; set by convert()
        self._fold_cache = ops.FoldCache()  # folded eval weights (design §5)

    def __setstate__(self, state):
        # whole-model pickles from before per-step gates and the fold cache object
        super().__setstate__(state)
        self.__dict__.setdefault("_gate_key", None)
        if "_fold_cache" not in self.__dict__:
            self._fold_cache = ops.FoldCache()

    # -- settable, validated attributes (users inspect and anneal them) ---------------
    @property
    def survival_prob(self) -> float:
        return self._survival_prob

    @survival_prob.setter
    def survival_prob(self, p):
        self._survival_prob = check_prob(p)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value):
        self._mode = _choice(value, MODES, "mode")

    @property
    def scaling(self) -> str:
        return self._scaling

    @scaling.setter
    def scaling(self, value):
        self._scaling = _choice(value, SCALINGS, "scaling")

    @property
    def dropped_grads(self) -> str:
        return self._dropped_grads

    @dropped_grads.setter
    def dropped_grads(self, value):
        self._dropped_grads = _choice(value, DROPPED_GRADS, "dropped_grads")

    @property
    def drop_impl(self) -> str:
        return self._drop_impl

    @drop_impl.setter
    def drop_impl(self, value):
        self._drop_impl = _choice(value, DROP_IMPLS, "drop_impl")

    @property
    def gate_generator(self) -> GateGenerator | None:
        return self._gate_generator

    @gate_generator.setter
    def gate_generator(self, g):
        if g is not None and not isinstance(g, GateGenerator):
            raise TypeError(f"gate_generator must be a sdkernels GateGenerator, got {type(g)}")
        self._gate_generator = g

    def extra_repr(self) -> str:
        return (f"survival_prob={self.survival_prob:.4g}, mode={self.mode!r}, "
                f"scaling={self.scaling!r}")

    # -- pieces -----------------------------------------------------------------------
    @property
    def shortcut_module(self):
        return getattr(self, self._shortcut_attr, None)

    def _shortcut(self, x):
        m = self.shortcut_module
        return x if m is None else m(x)

    def _generator(self) -> GateGenerator:
        return self._gate_generator or default_generator()

    def _want_zero_grads(self) -> bool:
        if self._dropped_grads == "zeros":
            return True
        if self._dropped_grads == "none":
            return False
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _dropped(self, x):
        m = self.shortcut_module
        out = x if layers.is_identity(m) else torch.relu(m(x))
        if torch.is_grad_enabled() and self._want_zero_grads():
            params = [p for mod in self._branch_modules() for p in mod.parameters()
                      if p.requires_grad]
            out = _ZeroGradTie.apply(out, *params)
        return out

    def branch_plan(self) -> ops.BranchPlan:
        """This block as the ops see it: stages, typed shortcut, mode (design §3)."""
        return ops.branch_plan(self._conv_bn_stages(), self.shortcut_module,
                               training=self.training, branch=self._branch,
                               last_norm=self._last_norm, parameters=self.parameters)

    def _active(self, x, gate_scale: float):
        return ops.residual_block(x, self.branch_plan(), gate_scale, self._fold_cache)

    def _active_rows(self, x, keep: torch.Tensor, gate_scale: float):
        # keep is a CPU bool tensor: the survivors are known on the host without a
        # device sync; only their indices are copied to the device.
        n_keep, idx = survivors(keep)
        if n_keep == 0:
            return self._dropped(x)
        if n_keep == x.shape[0]:
            return self._active(x, gate_scale)
        idx = _to_device(idx, x.device)
        m = self.shortcut_module
        sc = self._shortcut(x)
        t = ops.residual_block(x.index_select(0, idx), self.branch_plan(), gate_scale,
                               self._fold_cache,
                               None if layers.is_identity(m) else sc.index_select(0, idx))
        base = sc if layers.is_identity(m) else torch.relu(sc)
        return base.index_copy(0, idx, t.to(base.dtype))

    def _mask_forward(self, x, keep: torch.Tensor, gate_scale: float):
        # torchvision / timm: compute everything, then multiply by the mask.
        f = self._last_norm(self._branch(x))
        return torch.relu(self._shortcut(x) + reference.mask_multiply(f, keep, gate_scale))

    def forward(self, x):
        p = self._survival_prob
        if not self.training:
            return self._active(x, p if self._scaling == "test" else 1.0)
        s = 1.0 if self._scaling == "test" else 1.0 / p
        # design §2: the whole step's gates come from one draw, and a recomputation
        # (activation checkpointing) gets this block's gate of the forward again
        gen = self._generator()
        key = self._gate_key if self._gate_key is not None else ("block", id(self))
        if self._mode == "batch":
            gate = _gate_of(self, gen, key, p, None)
            if self._drop_impl == "mask":
                return self._mask_forward(x, torch.full((1,), gate, device=x.device), s)
            return self._active(x, s) if gate else self._dropped(x)
        keep = _gate_of(self, gen, key, p, x.shape[0])
        if self._drop_impl == "mask":
            return self._mask_forward(x, _to_device(keep, x.device), s)
        return self._active_rows(x, keep, s)

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
