"""What a residual block or a stem is, described once per call for the dispatch.

A module describes itself as a plan (design §3): its conv + BN stages and a typed
shortcut, plus whether its modules can be replaced by a fused implementation at all
(plain ``Conv2d`` / ``BatchNorm2d``, no hooks). ``ops.dispatch`` reads only plans;
modules make no backend decision. Plans are built on every forward, because hooks,
train/eval mode and submodules can change between calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..layers import OptionAShortcut, is_identity
from .fused_block import ConvBN

__all__ = ["Identity", "OptionA", "Projection", "ModuleShortcut", "BranchPlan", "StemPlan",
           "branch_plan", "stem_plan", "train_stages", "bn_call_args", "has_hooks"]


# -- shortcuts ------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """The input itself."""

    module: Optional[nn.Module] = None

    def residual(self, x):
        return None  # the fused paths add x without materialising a second copy


@dataclass(frozen=True)
class OptionA:
    """Subsample by ``stride`` and append zero channels (no parameters)."""

    module: OptionAShortcut

    def residual(self, x):
        return self.module(x)


@dataclass(frozen=True)
class Projection:
    """1x1 conv + BatchNorm with running statistics: folds into a conv in eval."""

    module: nn.Sequential

    @property
    def conv(self) -> nn.Conv2d:
        return self.module[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self.module[1]

    def residual(self, x):
        return self.module(x)


@dataclass(frozen=True)
class ModuleShortcut:
    """Any other shortcut: its module runs."""

    module: nn.Module

    def residual(self, x):
        return self.module(x)


def _plain_conv(m) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def _fusable_conv(m) -> bool:
    return _plain_conv(m) and m.bias is None


def _bn_with_running_stats(m) -> bool:
    return type(m) is nn.BatchNorm2d and m.running_mean is not None and m.running_var is not None


def shortcut_of(m):
    """The typed shortcut of a block's shortcut module."""
    if is_identity(m):
        return Identity(m)
    if type(m) is OptionAShortcut:
        return OptionA(m)
    if (type(m) is nn.Sequential and len(m) == 2 and _plain_conv(m[0])
            and _bn_with_running_stats(m[1])):
        return Projection(m)
    return ModuleShortcut(m)


def has_hooks(modules) -> bool:
    """Hooks on the modules (or global ones) must run: the fused paths call no
    submodule, so with hooks present the modules run instead."""
    from torch.nn.modules import module as _m
    if (_m._global_forward_hooks or _m._global_forward_pre_hooks
            or _m._global_backward_hooks or _m._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in modules)


# -- plans ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BranchPlan:
    """A residual block: ``relu(shortcut(x) + s * last_norm(branch(x)))``."""

    stages: tuple                # ((conv, bn), ...) in forward order
    shortcut: object             # Identity | OptionA | Projection | ModuleShortcut
    training: bool               # the block's mode: train or eval implementation
    fusable: bool                # the modules may be replaced (plain layers, no hooks)
    branch: Callable             # the modules' branch up to its last norm (module path)
    last_norm: nn.Module
    parameters: Callable         # the block's parameters (eval folding has no autograd)
    relu: object = None          # the block's ReLU module (None: torch.relu)
    hooked: bool = False         # a module of the block has hooks: the module path calls
                                 # last_norm, shortcut and relu as modules, so they run

    kind = "block"

    def bn_values(self, x) -> int:
        """Values per channel the first BN sees in training (BN rejects one)."""
        return x.shape[0] * x.shape[2] * x.shape[3]


@dataclass(frozen=True)
class StemPlan:
    """A network's stem: ``relu(bn(conv(x)))``; train or eval follows ``bn``'s mode."""

    conv: nn.Module
    bn: nn.Module
    relu: nn.Module
    training: bool
    fusable: bool

    kind = "stem"

    @property
    def stages(self) -> tuple:
        return ((self.conv, self.bn),)

    def parameters(self):
        return (*self.conv.parameters(), *self.bn.parameters())

    def bn_values(self, x) -> int:
        c = self.conv
        spatial = [(x.shape[2 + d] + 2 * c.padding[d] - c.dilation[d]
                    * (c.kernel_size[d] - 1) - 1) // c.stride[d] + 1 for d in range(2)]
        return x.shape[0] * spatial[0] * spatial[1]


def branch_plan(stages, shortcut_module, *, training: bool, branch: Callable,
                last_norm: nn.Module, parameters: Callable, relu=None) -> BranchPlan:
    """The plan of a residual block from its modules (what ``blocks`` calls)."""
    stages = tuple(stages)
    # every module the block's forward would call: a hook on any of them (the final
    # ReLU, the projection shortcut folded in eval) must run
    mods = [m for st in stages for m in st] + ([relu] if isinstance(relu, nn.Module) else [])
    if isinstance(shortcut_module, nn.Module):
        mods += list(shortcut_module.modules())
    hooked = has_hooks(mods)
    fusable = all(_fusable_conv(c) for c, _ in stages) and not hooked
    if fusable and training:
        fusable = all(type(b) is nn.BatchNorm2d and b.training for _, b in stages)
    elif fusable:
        fusable = all(_bn_with_running_stats(b) and not b.training for _, b in stages)
    return BranchPlan(stages, shortcut_of(shortcut_module), training, fusable, branch,
                      last_norm, parameters, relu, hooked)


def stem_plan(conv, bn, relu) -> StemPlan:
    """The plan of a conv-BN-ReLU stem from its modules."""
    fusable = (_fusable_conv(conv) and type(bn) is nn.BatchNorm2d
               and isinstance(relu, nn.ReLU) and not has_hooks([conv, bn, relu]))
    if fusable and not bn.training:
        fusable = bn.running_mean is not None and bn.running_var is not None
    return StemPlan(conv, bn, relu, bn.training, fusable)


# -- stages for the training functions ------------------------------------------------
def bn_call_args(bn: nn.Module):
    """(use_batch_stats, running_mean, running_var, momentum) of a BatchNorm call.

    Mirrors ``nn.modules.batchnorm._BatchNorm.forward`` (momentum=None cumulative
    average, num_batches_tracked, track_running_stats=False) so that a converted model
    updates its buffers exactly as the original does; counts the batch like it does.
    """
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return (use_batch_stats, bn.running_mean if track else None,
            bn.running_var if track else None, momentum)


def train_stages(plan) -> list:
    """The plan's stages as :class:`ConvBN` records for one training call (counts the
    batch in each BN, as the module would)."""
    out = []
    for conv, bn in plan.stages:
        _, rm, rv, momentum = bn_call_args(bn)
        out.append(ConvBN(conv.weight, tuple(conv.stride), tuple(conv.padding),
                          tuple(conv.dilation), conv.groups, bn.weight, bn.bias, rm, rv,
                          momentum, bn.eps))
    return out
