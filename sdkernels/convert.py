"""Swap the residual blocks of an existing ResNet for stochastic-depth blocks, and back.

Recognised layouts (by child names, registration order and types, not by class, so any
module with the layout is handled):

* torchvision ``BasicBlock`` (conv1, bn1, relu, conv2, bn2, downsample) and
  ``Bottleneck`` (conv1, bn1, conv2, bn2, conv3, bn3, relu, downsample);
* timm ``BasicBlock`` / ``Bottleneck`` (act1/act2/act3, drop_block, aa, se, drop_path),
  when the extras are inactive (no SE, no anti-aliasing, no DropBlock) and the
  activations are ReLU; the existing ``drop_path`` is replaced by real stochastic depth;
* CIFAR-style ``BasicBlock`` (conv1, bn1, conv2, bn2, shortcut) as in the widely used
  CIFAR ResNet code, with option-A (parameter-free) or option-B shortcuts.

Modules are moved, not copied: parameters keep their identity, so an optimizer built
before ``convert(model)`` still updates the converted model, and ``revert`` gives back
the original classes with the same state_dict.
"""
from __future__ import annotations

import copy

from torch import nn

from .blocks import BasicBlock, Bottleneck, StochasticDepthBlock, _choice, DROPPED_GRADS, \
    DROP_IMPLS, MODES, SCALINGS
from .gates import GateGenerator
from .schedule import survival_probs

__all__ = ["convert", "revert", "residual_blocks"]

_CONV = nn.Conv2d

# name -> (required children in registration order, optional children, target class,
#          shortcut attribute)
_LAYOUTS = {
    "torchvision BasicBlock": (("conv1", "bn1", "relu", "conv2", "bn2"), ("downsample",),
                               BasicBlock, "downsample"),
    "torchvision Bottleneck": (("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"),
                               ("downsample",), Bottleneck, "downsample"),
    "timm BasicBlock": (("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "act2"),
                        ("se", "downsample", "drop_path"), BasicBlock, "downsample"),
    "timm Bottleneck": (("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa",
                         "conv3", "bn3", "act3"), ("se", "downsample", "drop_path"),
                        Bottleneck, "downsample"),
    "CIFAR BasicBlock": (("conv1", "bn1", "conv2", "bn2", "shortcut"), (), BasicBlock,
                         "shortcut"),
}
# Children a timm block may carry that must be inactive for the plain semantics.
_MUST_BE_INACTIVE = ("drop_block", "aa", "se")
_ACTIVATIONS = ("relu", "act1", "act2", "act3")


def _looks_like_block(m: nn.Module) -> bool:
    if isinstance(m, StochasticDepthBlock):
        return True
    names = set(m._modules)
    return type(m).__name__ in ("BasicBlock", "Bottleneck") or {"conv1", "bn1", "conv2", "bn2"} <= names


def _match_layout(m: nn.Module):
    """(layout name, target class, shortcut attr) or a reason why none fits."""
    present = [n for n, c in m._modules.items()]
    reasons = []
    for name, (required, optional, target, sc_attr) in _LAYOUTS.items():
        allowed = set(required) | set(optional)
        if set(required) - set(present) or set(present) - allowed:
            continue
        order = [n for n in present if n in required]
        if order != list(required):
            reasons.append(f"{name}: children registered in another order ({order})")
            continue
        bad = [n for n in ("conv1", "conv2", "conv3") if n in required and not isinstance(m._modules[n], _CONV)]
        bad += [n for n in _ACTIVATIONS if n in present and not isinstance(m._modules[n], nn.ReLU)]
        bad += [n for n in _MUST_BE_INACTIVE if n in present and m._modules[n] is not None
                and not isinstance(m._modules[n], nn.Identity)]
        if bad:
            reasons.append(f"{name}: unsupported {', '.join(bad)}")
            continue
        return name, target, sc_attr
    why = "; ".join(reasons) or f"children {present} match no known residual-block layout"
    return None, None, why


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every residual block, in forward (registration) order.

    Raises ValueError naming the module for a block-like module whose layout is not
    supported.
    """
    found = []

    def visit(prefix, m):
        for name, child in m._modules.items():
            if child is None:
                continue
            qual = f"{prefix}.{name}" if prefix else name
            if _looks_like_block(child):
                if not isinstance(child, StochasticDepthBlock):
                    layout, _, why = _match_layout(child)
                    if layout is None:
                        raise ValueError(f"cannot convert residual block '{qual}' "
                                         f"({type(child).__name__}): {why}")
                found.append((qual, child))
            else:
                visit(qual, child)

    visit("", model)
    return found


def _to_stochastic(block: nn.Module) -> StochasticDepthBlock:
    layout, target, sc_attr = _match_layout(block)
    sd = target.__new__(target)
    nn.Module.__init__(sd)
    keep = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
    for n in keep:
        if n in block._modules:
            setattr(sd, n, block._modules[n])
    sd.relu = block._modules["relu"] if "relu" in block._modules else nn.ReLU(inplace=True)
    if sc_attr != "downsample":
        sd._shortcut_attr = sc_attr  # keeps the state_dict keys (e.g. shortcut.0.weight)
    setattr(sd, sc_attr, block._modules.get(sc_attr))
    sd._parameters.update(block._parameters)
    sd._buffers.update(block._buffers)
    sd.stride = getattr(block, "stride", 1)
    sd._init_sd(1.0, "batch", "test", None, "auto", "skip")
    sd.train(block.training)  # a model converted in eval mode must stay in eval mode
    for k, v in block.__dict__.items():  # user hooks keep working on the swapped block
        if "hook" in k and isinstance(v, dict):
            sd.__dict__[k] = v.copy()
    attrs = {k: v for k, v in block.__dict__.items()
             if k not in ("_modules", "_parameters", "_buffers")}
    saved = {n: c for n, c in block._modules.items() if n not in sd._modules}
    sd._sd_origin = (type(block), attrs, saved, list(block._modules))
    return sd


def _set_child(model: nn.Module, qual: str, new: nn.Module) -> None:
    parent_name, _, name = qual.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[name] = new


def convert(model: nn.Module, p_last: float = 0.5, schedule="linear", mode: str = "batch",
            scaling: str = "test", inplace: bool = True, seed: int | None = None, *,
            dropped_grads: str = "auto", drop_impl: str = "skip") -> nn.Module:
    """Give every residual block of ``model`` stochastic depth, weights kept.

    Blocks are numbered l = 1..L in forward order and get p_l from ``schedule``
    (``"linear"``, ``"uniform"`` or a list of L probabilities). All blocks share one new
    gate generator seeded by ``seed``. Converting an already converted model re-applies
    the schedule and options to its blocks. ``inplace=False`` converts a deep copy.
    """
    _choice(mode, MODES, "mode")
    _choice(scaling, SCALINGS, "scaling")
    _choice(dropped_grads, DROPPED_GRADS, "dropped_grads")
    _choice(drop_impl, DROP_IMPLS, "drop_impl")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if _looks_like_block(model):
        raise ValueError(f"convert: pass the network that holds the blocks, not a block "
                         f"({type(model).__name__})")
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(f"convert: no residual blocks found in {type(model).__name__}")
    probs = survival_probs(len(blocks), p_last, schedule)
    if not inplace:
        model = copy.deepcopy(model)
        blocks = residual_blocks(model)
    gen = GateGenerator(seed)
    for (qual, block), p in zip(blocks, probs):
        sd = block if isinstance(block, StochasticDepthBlock) else _to_stochastic(block)
        sd.survival_prob = p
        sd.mode, sd.scaling = mode, scaling
        sd.dropped_grads, sd.drop_impl = dropped_grads, drop_impl
        sd.gate_generator = gen
        if sd is not block:
            _set_child(model, qual, sd)
    gen.bind(b for b in model.modules() if isinstance(b, StochasticDepthBlock)
             and b.gate_generator is gen)
    return model


def revert(model: nn.Module, inplace: bool = True) -> nn.Module:
    """Replace every stochastic-depth block by a plain one; the state_dict is unchanged.

    Converted blocks come back as their original class; blocks built directly as
    ``sdkernels.BasicBlock``/``Bottleneck`` come back as the torchvision-compatible
    ``sdkernels.models.resnet`` blocks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, StochasticDepthBlock):
        return (model if inplace else copy.deepcopy(model)).to_plain()
    if not inplace:
        model = copy.deepcopy(model)
    found = [(q, m) for q, m in model.named_modules() if isinstance(m, StochasticDepthBlock)]
    for qual, block in found:
        _set_child(model, qual, block.to_plain())
    return model
