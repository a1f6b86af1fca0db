"""Give the residual blocks of an existing network real stochastic depth, and back.

Plain ResNet blocks become the fused ``sdkernels.BasicBlock``/``Bottleneck``; the other
residual families of timm and torchvision (SE/attention ResNets, ResNetV2, RegNet,
ConvNeXt, ViT/DeiT/BEiT/EVA, Swin, EfficientNet/MobileNet) keep their block objects and
get one gate per residual (``sdkernels.families``). Plain ResNet layouts (by child names, registration order and types, not by class, so any
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

from . import families
from .blocks import BasicBlock, Bottleneck, StochasticDepthBlock
from .families import ConvertedBlock
from .gates import GateGenerator
from .ops import has_hooks
from .residual import DROP_IMPLS, DROPPED_GRADS, MODES, SCALINGS, GatedResidual, _choice
from .schedule import check_prob, survival_probs

__all__ = ["convert", "revert", "residual_blocks", "gates_of"]

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
# The children a drop-in block takes over (with `relu` and the shortcut); others stay
# behind in `_sd_origin` for revert.
_DROP_IN_CHILDREN = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
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


def _hooks_left_behind(m: nn.Module, sc_attr: str) -> bool:
    """Whether a child that the drop-in block does not call (timm's act1/act2/act3, aa,
    drop_block) has hooks: then the block converts as a family, whose forward calls
    them, so that they run. (Its drop path is replaced by a gate either way.)"""
    calls = {*_DROP_IN_CHILDREN, "relu", sc_attr, "drop_path"}
    return any(has_hooks(list(c.modules())) for n, c in m._modules.items()
               if c is not None and n not in calls)


def _classify(m: nn.Module):
    """How ``m`` converts: ("converted", None), ("resnet", None) for the fused blocks,
    ("family", Family), ("skip", None) for a known block without a residual, ("error",
    why), or (None, None) for a module that is not a block (recurse into it)."""
    if isinstance(m, (StochasticDepthBlock, ConvertedBlock)):
        return "converted", None
    why = None
    if _looks_like_block(m):
        layout, _, detail = _match_layout(m)  # detail: the shortcut attribute, or why not
        if layout is not None and not _hooks_left_behind(m, detail):
            return "resnet", None
        why = (detail if layout is None else
               f"{layout}: a child its drop-in block does not call has hooks")
    fam, verdict = families.recognise(m)
    if fam is not None:
        return ("skip", None) if verdict == families.SKIP else ("family", fam)
    reasons = "; ".join(w for w in (why, verdict) if w)
    return ("error", reasons) if reasons else (None, None)


def _visit(model: nn.Module):
    """(qualified name, module, kind, family) of every block, in registration order.
    A block registered under two names (shared weights) is refused before anything
    changes: its forward runs twice a step, which one gate slot and one position in the
    schedule cannot describe."""
    found, where = [], {}

    def visit(prefix, m):
        for name, child in m._modules.items():
            if child is None:
                continue
            qual = f"{prefix}.{name}" if prefix else name
            kind, info = _classify(child)
            if kind == "error":
                raise ValueError(f"cannot convert residual block '{qual}' "
                                 f"({type(child).__name__}): {info}")
            if kind is None:
                visit(qual, child)
            elif kind != "skip":
                if id(child) in where:
                    raise ValueError(f"cannot convert residual block '{qual}': it is the same "
                                     f"module as '{where[id(child)]}' (a block registered "
                                     "twice, shared weights); convert gives each block one "
                                     "gate per residual and one place in the schedule")
                where[id(child)] = qual
                found.append((qual, child, kind, info))

    visit("", model)
    return found


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every residual block, in forward (registration) order.

    Raises ValueError naming the module for a block-like module whose layout is not
    supported exactly.
    """
    return [(q, m) for q, m, _, _ in _visit(model)]


def gates_of(block: nn.Module) -> list[GatedResidual]:
    """The gates of a converted block, in forward order (a ResNet block is its own)."""
    return block.sd_gates() if isinstance(block, ConvertedBlock) else [block]


def _to_stochastic(block: nn.Module) -> StochasticDepthBlock:
    layout, target, sc_attr = _match_layout(block)
    sd = target.__new__(target)
    nn.Module.__init__(sd)
    for n in _DROP_IN_CHILDREN:
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


def _original_drop_paths(block: nn.Module, kind: str, fam) -> list:
    """Per gate of ``block`` (converted or about to be), the drop-path module of the
    original model it stands for (None where there was none)."""
    if isinstance(block, ConvertedBlock):
        return block.sd_original_drop_paths()
    if kind == "family":
        return [block._modules.get(src, getattr(block, src, None))
                for src in (fam.sources or fam.slots)]
    origin = getattr(block, "_sd_origin", None)
    saved = origin[2] if origin is not None else block._modules
    return [saved.get("drop_path")]


def _kept(qual, block, kind, fam, mode, scaling) -> list[tuple[float, str, str]]:
    """schedule="keep": per gate (survival probability, mode, scaling) from the drop
    path it replaces; a block built by sdkernels keeps its own settings."""
    if isinstance(block, StochasticDepthBlock) and block._sd_origin is None:
        return [(block.survival_prob, mode or block.mode, scaling or block.scaling)]
    out = []
    for m in _original_drop_paths(block, kind, fam):
        try:
            rate, own_mode, by_keep = families.drop_path_rate(m)
        except ValueError as e:
            raise ValueError(f"convert(schedule='keep'): '{qual}': {e}") from e
        if rate > 0 and not by_keep and scaling is None:
            raise ValueError(f"convert(schedule='keep'): the drop path of '{qual}' does not "
                             "scale by 1/keep (scale_by_keep=False), which neither "
                             "scaling='test' nor 'train' reproduces; pass scaling= explicitly")
        p = check_prob(1.0 - rate, f"survival probability of '{qual}' (1 - drop rate)")
        out.append((p, mode or own_mode or "row", scaling or "train"))
    return out


def convert(model: nn.Module, p_last: float = 0.5, schedule="linear", mode: str | None = None,
            scaling: str | None = None, inplace: bool = True, seed: int | None = None, *,
            dropped_grads: str = "auto", drop_impl: str = "skip") -> nn.Module:
    """Give every residual block of ``model`` real stochastic depth, weights kept.

    Blocks are numbered l = 1..L in forward order and get p_l from ``schedule``
    (``"linear"``, ``"uniform"`` or a list of L probabilities); a block with several
    residuals (a transformer block's attention and MLP) gives each of them its p_l.
    ``schedule="keep"`` keeps the model's own drop-path rates (timm ``drop_path_rate``,
    torchvision ``stochastic_depth_prob``), and by default their per-sample mode and
    inverted scaling (``mode="row"``, ``scaling="train"``); otherwise the defaults are
    ``mode="batch"`` and ``scaling="test"`` (the paper). All gates share one new gate
    generator seeded by ``seed``. Converting an already converted model re-applies the
    schedule and options. ``inplace=False`` converts a deep copy.
    """
    keep = isinstance(schedule, str) and schedule == "keep"
    if mode is not None:
        _choice(mode, MODES, "mode")
    if scaling is not None:
        _choice(scaling, SCALINGS, "scaling")
    _choice(dropped_grads, DROPPED_GRADS, "dropped_grads")
    _choice(drop_impl, DROP_IMPLS, "drop_impl")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if _looks_like_block(model) or _classify(model)[0] not in (None, "error"):
        raise ValueError(f"convert: pass the network that holds the blocks, not a block "
                         f"({type(model).__name__})")
    found = _visit(model)
    if not found:
        raise ValueError(f"convert: no residual blocks found in {type(model).__name__}")
    if keep:
        settings = [_kept(q, m, k, f, mode, scaling) for q, m, k, f in found]
    else:
        probs = survival_probs(len(found), p_last, schedule)
        settings = [[(p, mode or "batch", scaling or "test")] * len(gates_of_kind(m, k, f))
                    for p, (q, m, k, f) in zip(probs, found)]
    if not inplace:
        model = copy.deepcopy(model)
        found = _visit(model)
    gen = GateGenerator(seed)
    for (qual, block, kind, fam), per_gate in zip(found, settings):
        if kind == "resnet":
            block = _to_stochastic(block)
            _set_child(model, qual, block)
        elif kind == "family":
            families.to_gated(block, fam)
        for g, (p, m, s) in zip(gates_of(block), per_gate):
            g.survival_prob, g.mode, g.scaling = p, m, s
            g.dropped_grads, g.drop_impl = dropped_grads, drop_impl
            g.gate_generator = gen
    gen.bind(g for g in model.modules() if isinstance(g, GatedResidual)
             and g.gate_generator is gen)
    return model


def gates_of_kind(block, kind, fam) -> list:
    """The gates a block will have once converted (one per residual)."""
    if kind == "family":
        return list(fam.slots)
    return gates_of(block) if kind == "converted" else [block]


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
    if isinstance(model, ConvertedBlock):
        return families.revert_block(model if inplace else copy.deepcopy(model))
    if not inplace:
        model = copy.deepcopy(model)
    found = [(q, m) for q, m in model.named_modules()
             if isinstance(m, (StochasticDepthBlock, ConvertedBlock))]
    for qual, block in found:
        if isinstance(block, ConvertedBlock):
            families.revert_block(block)
        else:
            _set_child(model, qual, block.to_plain())
    return model
