"""Real stochastic depth for the timm and torchvision residual families beyond the plain
ResNet blocks: SE/ECA/attention and anti-aliased ResNets, SelectiveKernel, ResNetV2,
RegNet, ConvNeXt, ViT/DeiT/BEiT/EVA, Swin, EfficientNet/MobileNet (design §2, §3).

A block is recognised by its layout (child names, the attributes its forward reads, and
the names its own forward's code uses, which must be ones the gated forward
reproduces), never by its class name, so a copy of a timm block in user code converts
too, and a look-alike with another forward is refused. Each family says where each of its residuals' gates sits (the
slot of its drop path: ``drop_path``, ``drop_path1``/``drop_path2``,
``stochastic_depth``; a new parameter-free slot where the block has none) and how its
forward runs with those residuals gated (:class:`sdkernels.residual.Residual`).

Conversion is in place and keeps the block object: its class becomes a subclass of its
own class and :class:`ConvertedBlock` (the pattern FSDP2's ``fully_shard`` uses), so
parameters, buffers, hooks, every method of the original class (Swin's
``set_input_size``, timm's feature extraction) and ``isinstance`` checks keep working,
and the state_dict keys are unchanged (a gate holds no state). :func:`revert_block`
restores the class and the original drop-path modules.

Layouts that these forwards cannot reproduce exactly (an active DropBlock, post-norm
blocks with layer scale, an unknown block carrying a drop path) raise a ValueError that
names the module (:func:`recognise`).
"""
from __future__ import annotations

import inspect
import itertools
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .ops import has_hooks
from .residual import Residual, ResidualGate, branch_has_batchnorm, decide

__all__ = ["Family", "FAMILIES", "ConvertedBlock", "recognise", "to_gated", "revert_block",
           "looks_residual", "drop_path_rate", "SKIP"]

#: :func:`recognise` result for a block of a known family that has no residual in this
#: instance (timm ``has_skip=False``, torchvision ``use_res_connect=False``, a RegNet block
#: without shortcut): its drop path is never applied, so it stays as it is.
SKIP = "not a residual"


# -- helpers the family forwards share ---------------------------------------------------

def _code_copy(fn: Callable, **kwdefaults) -> Callable:
    """``fn`` with a code object of its own (Dynamo keeps compiled entries per code
    object); ``kwdefaults`` replace keyword-only defaults."""
    new = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                             fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = {**(fn.__kwdefaults__ or {}), **kwdefaults} or None
    new.__qualname__ = fn.__qualname__
    return new


def _child(block, name):
    """A child module by name, or None (timm stores absent optional children as a plain
    None attribute, torchvision as None in ``_modules``)."""
    return getattr(block, name, None)


def _identity_or(m, keep_hooked: bool = True):
    """None for a module that passes its input through, else the module. One with hooks
    is kept (``keep_hooked``): the block's own forward calls it, so they must run."""
    if m is None:
        return None
    if isinstance(m, nn.Identity) or (type(m) is nn.Sequential and len(m) == 0):
        return m if keep_hooked and has_hooks([m]) else None
    return m


def _seq(block, names):
    """The children ``names`` of ``block`` applied in order (absent ones skipped)."""
    mods = [m for m in (_child(block, n) for n in names) if m is not None]

    def run(h):
        for m in mods:
            h = m(h)
        return h
    return run


def _params(block, names, param_names=()):
    """Parameters of the children ``names`` and the block's own ``param_names``: what a
    residual's branch uses, for DDP's zero gradients."""
    def params():
        for n in names:
            m = _child(block, n)
            if isinstance(m, nn.Module):
                yield from m.parameters()
        for n in param_names:
            p = block._parameters.get(n)
            if p is not None:
                yield p
    return params


def _gate(block, slot) -> ResidualGate:
    return block._modules[slot]


def drop_path_rate(m) -> tuple[float, Optional[str], bool]:
    """(drop rate, per-sample mode or None, scales by 1/keep) of a drop-path module:
    timm ``DropPath`` (per sample, ``scale_by_keep``), torchvision ``StochasticDepth``
    (``p``, ``mode``, always scales); anything else drops nothing."""
    if m is None or isinstance(m, nn.Identity):
        return 0.0, None, True
    if hasattr(m, "drop_prob"):
        return float(m.drop_prob), "row", bool(getattr(m, "scale_by_keep", True))
    if hasattr(m, "p") and getattr(m, "mode", None) in ("row", "batch"):
        return float(m.p), m.mode, True
    raise ValueError(f"unknown drop-path module {type(m).__name__}: neither timm's DropPath "
                     "(drop_prob) nor torchvision's StochasticDepth (p, mode)")


def _is_drop_path(m) -> bool:
    return isinstance(m, nn.Module) and (
        (hasattr(m, "drop_prob") and hasattr(m, "scale_by_keep"))
        or (hasattr(m, "p") and getattr(m, "mode", None) in ("row", "batch")))


# -- the families ------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """One layout: ``check(block)`` says whether a block has it (None: no; ``SKIP``; ""
    exact; else why it cannot be made exact), ``slots`` where each residual's gate sits
    in forward order, ``forward(block, x, *args, **kwargs)`` the gated forward,
    ``names``/``args`` what the block's own forward may read and take (the gated forward
    reproduces those forwards; a block whose forward reads anything else, such as
    window partitioning or a second input, has another forward and is refused), and
    ``sources`` the slot whose original drop path each gate stands for (default: its
    own; torchvision's Swin applies one drop-path module to both residuals), ``key``
    the stable id a converted block stores (``name`` is for messages and may change)."""

    name: str
    slots: tuple
    check: Callable
    forward: Callable
    names: frozenset  # what the blocks' own forward may read (its code's co_names)
    args: frozenset = frozenset()  # extra forward arguments it may take after x
    sources: tuple = ()  # per slot, the original slot whose drop path it inherits
    key: str = ""  # stable id stored in converted blocks (and their pickles)

    def __post_init__(self):
        if not self.key:
            raise ValueError(f"family {self.name!r} needs a key")


def _children(m) -> set:
    return {n for n, c in m._modules.items() if c is not None}


def _has_layout(m, required, optional=()) -> bool:
    names = _children(m)
    return set(required) <= names and names <= set(required) | set(optional)


# timm ResNet blocks with SE/ECA/attention, anti-aliasing, any activation (the plain ReLU
# ones without extras go to the fused sdkernels.BasicBlock/Bottleneck instead).
_TIMM_BASIC = ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se")
_TIMM_BOTTLENECK = ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa",
                    "conv3", "bn3", "se")


def _check_timm_resnet(m):
    bottleneck = "conv3" in m._modules
    branch = _TIMM_BOTTLENECK if bottleneck else _TIMM_BASIC
    post = "act3" if bottleneck else "act2"
    if not _has_layout(m, ("conv1", "bn1", "act1", "conv2", "bn2", post),
                       set(branch) | {post, "downsample", "drop_path"}):
        return None
    db = _child(m, "drop_block")
    if db is not None and float(getattr(db, "drop_prob", 0.0)) > 0:
        return (f"an active drop_block ({type(db).__name__}, drop_prob={db.drop_prob}) "
                "draws its own random mask; build the model with drop_block_rate=0")
    return ""


def _fwd_timm_resnet(block, x):
    bottleneck = "conv3" in block._modules
    names = _TIMM_BOTTLENECK if bottleneck else _TIMM_BASIC
    g = _gate(block, "drop_path")
    return g(x, decide(g, x), Residual(
        _seq(block, names), _identity_or(_child(block, "downsample")),
        block.act3 if bottleneck else block.act2, params=_params(block, names)))


def _check_sk(m):
    return "" if _has_layout(m, ("conv1", "conv2", "act"),
                             ("conv3", "se", "downsample", "drop_path")) else None


def _fwd_sk(block, x):
    names = ("conv1", "conv2", "conv3", "se")
    g = _gate(block, "drop_path")
    return g(x, decide(g, x), Residual(
        _seq(block, names), _identity_or(_child(block, "downsample")), block.act,
        params=_params(block, names)))


_PREACT = ("conv1", "norm2", "conv2", "norm3", "conv3")


def _check_preact(m):
    return "" if _has_layout(m, ("norm1", "conv1", "norm2", "conv2"),
                             ("norm3", "conv3", "downsample", "drop_path")) else None


def _fwd_preact(block, x):
    # timm ResNetV2: the shortcut is x, or downsample(norm1(x)) when there is one
    ds = _child(block, "downsample")
    g = _gate(block, "drop_path")
    return g(x, decide(g, x), Residual(
        _seq(block, _PREACT), _identity_or(ds), None, pre=block.norm1,
        pre_shortcut=ds is not None, params=_params(block, ("norm1",) + _PREACT)))


_V2_BOTTLENECK = ("conv1", "norm1", "conv2", "norm2", "conv3", "norm3")


def _check_v2_bottleneck(m):
    return "" if _has_layout(m, _V2_BOTTLENECK + ("act3",), ("downsample", "drop_path")) else None


def _fwd_v2_bottleneck(block, x):
    g = _gate(block, "drop_path")
    return g(x, decide(g, x), Residual(
        _seq(block, _V2_BOTTLENECK), _identity_or(_child(block, "downsample")), block.act3,
        params=_params(block, _V2_BOTTLENECK)))


_REGNET = ("conv1", "conv2", "se", "conv3")


def _check_regnet(m):
    if not _has_layout(m, _REGNET + ("act3",), ("downsample", "drop_path")):
        return None
    # timm RegNet: "no shortcut if downsample is None" (an identity one is nn.Identity)
    return SKIP if _child(m, "downsample") is None else ""


def _fwd_regnet(block, x):
    g = _gate(block, "drop_path")
    return g(x, decide(g, x), Residual(
        _seq(block, _REGNET), _identity_or(block.downsample), block.act3,
        params=_params(block, _REGNET)))


_REGNET_PRE = ("conv1", "norm2", "conv2", "se", "norm3", "conv3")


def _check_regnet_pre(m):
    if not _has_layout(m, ("norm1",) + _REGNET_PRE, ("downsample", "drop_path")):
        return None
    return SKIP if _child(m, "downsample") is None else ""


def _fwd_regnet_pre(block, x):
    # x = norm1(x) feeds both the branch and the shortcut
    g = _gate(block, "drop_path")
    return g(x, decide(g, x), Residual(
        _seq(block, _REGNET_PRE), _identity_or(block.downsample), None, pre=block.norm1,
        pre_shortcut=True, params=_params(block, ("norm1",) + _REGNET_PRE)))


def _check_convnext(m):
    if not _has_layout(m, ("conv_dw", "norm", "mlp", "shortcut"), ("drop_path",)):
        return None
    if not (hasattr(m, "use_conv_mlp") and hasattr(m, "gamma")):
        return "ConvNeXt-like block without the use_conv_mlp / gamma attributes its forward reads"
    return ""


def _fwd_convnext(block, x):
    def branch(h):
        h = block.conv_dw(h)
        if block.use_conv_mlp:
            h = block.mlp(block.norm(h))
        else:
            h = block.mlp(block.norm(h.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        if block.gamma is not None:
            h = h.mul(block.gamma.reshape(1, -1, 1, 1))
        return h
    g = _gate(block, "drop_path")
    return g(x, decide(g, x), Residual(
        branch, _identity_or(block.shortcut), None,
        params=_params(block, ("conv_dw", "norm", "mlp"), ("gamma",))))


# Transformer blocks: timm ViT/DeiT (ls1/ls2), BEiT/EVA (gamma_1/gamma_2), Swin (a
# ``_attn`` method over windows, (B, H, W, C) input), torchvision Swin (one drop path
# module for both residuals); pre-norm, or post-norm (attention registered before its
# norm, or Swin V2's cosine attention with ``logit_scale``).

# extra forward arguments that carry one row per sample (gathered in row mode), by the
# number of dimensions they have then: attention masks [N, heads, L, S], per-sample ROPE
# [N, heads or 1, L, D] (timm's shared ROPE is [L, D], per head [heads, L, D])
_ROW_ARGS = {"attn_mask": 4, "rope": 4}


def _post_norm(m) -> bool:
    order = list(m._modules)
    attn = m._modules["attn"]
    return order.index("attn") < order.index("norm1") or hasattr(attn, "logit_scale")


def _layer_scales(m, keep_hooked: bool = True):
    """The two residuals' layer scales: ls1/ls2 modules, gamma_1/gamma_2 parameters."""
    out = []
    for ls, gamma in (("ls1", "gamma_1"), ("ls2", "gamma_2")):
        mod = _identity_or(_child(m, ls), keep_hooked)
        out.append(mod if mod is not None else getattr(m, gamma, None))
    return out


def _check_transformer(m, slots=("drop_path1", "drop_path2")):
    if not _has_layout(m, ("norm1", "attn", "norm2", "mlp") + tuple(
            s for s in slots if s in m._modules), ("ls1", "ls2") + tuple(slots)):
        return None
    if not set(slots) & set(m._modules):
        return None
    if _post_norm(m) and any(s is not None for s in _layer_scales(m, keep_hooked=False)):
        return "post-norm transformer block with layer scale: order of norm and scale unknown"
    for n in ("gamma_1", "gamma_2"):
        g = getattr(m, n, None)
        if g is not None and not isinstance(g, torch.Tensor):
            return f"{n} is not a tensor"
    return ""


def _check_tv_swin(m):
    return _check_transformer(m, ("stochastic_depth",))


_EXTRA_NAMES: dict = {}


def _extra_names(cls) -> tuple:
    """Names of ``cls.forward``'s arguments after x, to name positional extras (a plain
    dict cache: Dynamo traces it without the warning functools.lru_cache draws)."""
    names = _EXTRA_NAMES.get(cls)
    if names is None:
        names = _EXTRA_NAMES[cls] = tuple(list(inspect.signature(cls.forward).parameters)[2:])
    return names


def _scaled(ls, t):
    if ls is None:
        return t
    return ls(t) if isinstance(ls, nn.Module) else ls * t


def _fwd_transformer(block, x, *args, slots=("drop_path1", "drop_path2"), **kwargs):
    kw = dict(zip(_extra_names(block._sd_base), args))
    kw.update(kwargs)
    n = x.shape[0]
    row = [k for k, v in kw.items() if isinstance(v, torch.Tensor)
           and v.dim() == _ROW_ARGS.get(k) and v.shape[0] == n]
    windows = hasattr(block, "_attn")  # timm Swin: window attention on (B, H, W, C)

    def attn(h, *row_vals):
        if windows:
            return block._attn(h)
        return block.attn(h, **{**kw, **dict(zip(row, row_vals))})

    ls1, ls2 = _layer_scales(block)
    if _post_norm(block):
        f1 = lambda h, *r: block.norm1(attn(h, *r))  # noqa: E731
        f2 = lambda h: block.norm2(block.mlp(h))  # noqa: E731
    else:
        f1 = lambda h, *r: _scaled(ls1, attn(block.norm1(h), *r))  # noqa: E731
        f2 = lambda h: _scaled(ls2, block.mlp(block.norm2(h)))  # noqa: E731
    shape = x.shape
    g = _gate(block, slots[0])
    x = g(x, decide(g, x), Residual(
        f1, row_args=[kw[k] for k in row],
        params=_params(block, ("norm1", "attn", "ls1"), ("gamma_1",))))
    if windows and x.dim() == 4:
        x = x.reshape(shape[0], -1, shape[-1])
    g = _gate(block, slots[1])
    x = g(x, decide(g, x), Residual(
        f2, params=_params(block, ("norm2", "mlp", "ls2"), ("gamma_2",))))
    return x.reshape(shape) if windows and len(shape) == 4 else x


# torchvision Swin: the transformer forward with its own slot names, as a copy rather
# than a wrapper calling it, so that its draws resume in code objects of its own
_fwd_tv_swin = _code_copy(_fwd_transformer, slots=("stochastic_depth", "stochastic_depth2"))


def _check_tv_vit(m):
    if not _has_layout(m, ("ln_1", "self_attention", "dropout", "ln_2", "mlp")):
        return None
    if not isinstance(m.self_attention, nn.MultiheadAttention):
        return "self_attention is not an nn.MultiheadAttention"
    return ""


def _fwd_tv_vit(block, x):
    torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")

    def attn(h):
        a = block.ln_1(h)
        return block.dropout(block.self_attention(a, a, a, need_weights=False)[0])
    g = _gate(block, "drop_path1")
    x = g(x, decide(g, x), Residual(
        attn, params=_params(block, ("ln_1", "self_attention"))))
    g = _gate(block, "drop_path2")
    return g(x, decide(g, x), Residual(
        lambda h: block.mlp(block.ln_2(h)), params=_params(block, ("ln_2", "mlp"))))


# EfficientNet / MobileNet blocks (timm): a residual only where has_skip is set
_IR = ("conv_s2d", "bn_s2d", "conv_pw", "bn1", "conv_dw", "bn2", "aa", "se", "conv_pwl", "bn3")
_DS = ("conv_s2d", "bn_s2d", "conv_dw", "bn1", "aa", "se", "conv_pw", "bn2")
_EDGE = ("conv_exp", "bn1", "aa", "se", "conv_pwl", "bn2")
_CBA = ("conv", "bn1", "aa")


def _check_skip_block(required, names):
    def check(m):
        if "drop_path" not in m._modules or not _has_layout(
                m, required, set(names) | {"drop_path"}):
            return None
        if not hasattr(m, "has_skip"):
            return "no has_skip attribute"
        return "" if m.has_skip else SKIP
    return check


def _fwd_skip_block(names):
    def forward(block, x):
        g = _gate(block, "drop_path")
        return g(x, decide(g, x), Residual(_seq(block, names), params=_params(block, names)))
    return forward


def _check_tv_block(m):
    if _children(m) != {"block", "stochastic_depth"}:
        return None
    if "layer_scale" in m._parameters:
        return ""
    if not hasattr(m, "use_res_connect"):
        return "no use_res_connect attribute"
    return "" if m.use_res_connect else SKIP


def _fwd_tv_block(block, x):
    # torchvision CNBlock (layer_scale * block(x)) and MBConv / FusedMBConv (block(x))
    ls = block._parameters.get("layer_scale")
    branch = block.block if ls is None else (lambda h: ls * block.block(h))
    g = _gate(block, "stochastic_depth")
    return g(x, decide(g, x), Residual(
        branch, params=_params(block, ("block",), ("layer_scale",))))


def _check_tv_regnet(m):
    return "" if _has_layout(m, ("f", "activation"), ("proj",)) else None


def _fwd_tv_regnet(block, x):
    g = _gate(block, "drop_path")
    return g(x, decide(g, x), Residual(
        block.f, _identity_or(_child(block, "proj")), block.activation,
        params=_params(block, ("f",))))


# What each family's blocks read in their own forward (co_names of timm 1.0 and
# torchvision 0.29's forwards; tests/test_families.py checks them against the packages).
_N_TIMM_RESNET = frozenset({"aa", "act1", "act2", "act3", "bn1", "bn2", "bn3", "conv1", "conv2",
                            "conv3", "downsample", "drop_block", "drop_path", "se"})
_N_SK = frozenset({"act", "conv1", "conv2", "conv3", "downsample", "drop_path", "se"})
_N_PREACT = frozenset({"conv1", "conv2", "conv3", "downsample", "drop_path", "norm1", "norm2",
                       "norm3"})
_N_V2 = _N_PREACT | {"act3"}
_N_REGNET = frozenset({"act3", "conv1", "conv2", "conv3", "downsample", "drop_path", "se"})
_N_REGNET_PRE = _N_PREACT | {"se"}
_N_CONVNEXT = frozenset({"conv_dw", "drop_path", "gamma", "mlp", "mul", "norm", "permute",
                         "reshape", "shortcut", "use_conv_mlp"})
_N_TRANSFORMER = frozenset({"_attn", "attn", "drop_path1", "drop_path2", "gamma_1", "gamma_2",
                            "ls1", "ls2", "mlp", "norm1", "norm2", "reshape", "shape",
                            "stochastic_depth"})
_A_TRANSFORMER = frozenset({"attn_mask", "is_causal", "rope", "shared_rel_pos_bias"})
_N_TV_VIT = frozenset({"_assert", "dim", "dropout", "ln_1", "ln_2", "mlp", "self_attention",
                       "shape", "torch"})
_N_IR = frozenset({"aa", "bn1", "bn2", "bn3", "bn_s2d", "conv", "conv_dw", "conv_exp", "conv_pw",
                   "conv_pwl", "conv_s2d", "drop_path", "has_skip", "se"})
_N_TV_BLOCK = frozenset({"block", "layer_scale", "stochastic_depth", "use_res_connect"})
_N_TV_REGNET = frozenset({"activation", "f", "proj"})

FAMILIES = (
    Family("timm ResNet block (SE/attention/anti-aliasing)", ("drop_path",),
           _check_timm_resnet, _fwd_timm_resnet, _N_TIMM_RESNET, key="timm.resnet"),
    Family("timm SelectiveKernel block", ("drop_path",), _check_sk, _fwd_sk, _N_SK,
           key="timm.selective_kernel"),
    Family("timm ResNetV2 pre-activation block", ("drop_path",), _check_preact, _fwd_preact,
           _N_PREACT, key="timm.resnetv2_preact"),
    Family("timm ResNetV2 bottleneck", ("drop_path",), _check_v2_bottleneck,
           _fwd_v2_bottleneck, _N_V2, key="timm.resnetv2_bottleneck"),
    Family("timm RegNet block", ("drop_path",), _check_regnet, _fwd_regnet, _N_REGNET,
           key="timm.regnet"),
    Family("timm RegNet pre-activation block", ("drop_path",), _check_regnet_pre,
           _fwd_regnet_pre, _N_REGNET_PRE, key="timm.regnet_preact"),
    Family("timm ConvNeXt block", ("drop_path",), _check_convnext, _fwd_convnext, _N_CONVNEXT,
           key="timm.convnext"),
    Family("transformer block (timm ViT/DeiT/BEiT/EVA/Swin)", ("drop_path1", "drop_path2"),
           _check_transformer, _fwd_transformer, _N_TRANSFORMER, _A_TRANSFORMER,
           key="transformer"),
    Family("torchvision Swin block", ("stochastic_depth", "stochastic_depth2"),
           _check_tv_swin, _fwd_tv_swin, _N_TRANSFORMER,
           sources=("stochastic_depth", "stochastic_depth"), key="torchvision.swin"),
    Family("torchvision ViT encoder block", ("drop_path1", "drop_path2"), _check_tv_vit,
           _fwd_tv_vit, _N_TV_VIT, key="torchvision.vit"),
    Family("timm inverted residual", ("drop_path",),
           _check_skip_block(("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3"), _IR),
           _fwd_skip_block(_IR), _N_IR, key="timm.inverted_residual"),
    Family("timm depthwise-separable block", ("drop_path",),
           _check_skip_block(("conv_dw", "bn1", "conv_pw", "bn2"), _DS), _fwd_skip_block(_DS),
           _N_IR, key="timm.depthwise_separable"),
    Family("timm edge residual", ("drop_path",),
           _check_skip_block(("conv_exp", "bn1", "conv_pwl", "bn2"), _EDGE),
           _fwd_skip_block(_EDGE), _N_IR, key="timm.edge_residual"),
    Family("timm ConvBnAct", ("drop_path",), _check_skip_block(("conv", "bn1"), _CBA),
           _fwd_skip_block(_CBA), _N_IR, key="timm.conv_bn_act"),
    Family("torchvision ConvNeXt / EfficientNet block", ("stochastic_depth",),
           _check_tv_block, _fwd_tv_block, _N_TV_BLOCK, key="torchvision.block"),
    Family("torchvision RegNet block", ("drop_path",), _check_tv_regnet, _fwd_tv_regnet,
           _N_TV_REGNET, key="torchvision.regnet"),
)
_BY_KEY = {f.key: f for f in FAMILIES}
if len(_BY_KEY) != len(FAMILIES):
    raise RuntimeError("sdkernels.families: two families share a key")

# Converted blocks pickled before families had keys stored the family's display name as
# it was then; frozen here, so that rewording a name never breaks an old pickle.
_LEGACY_NAMES = {
    "timm ResNet block (SE/attention/anti-aliasing)": "timm.resnet",
    "timm SelectiveKernel block": "timm.selective_kernel",
    "timm ResNetV2 pre-activation block": "timm.resnetv2_preact",
    "timm ResNetV2 bottleneck": "timm.resnetv2_bottleneck",
    "timm RegNet block": "timm.regnet",
    "timm RegNet pre-activation block": "timm.regnet_preact",
    "timm ConvNeXt block": "timm.convnext",
    "transformer block (timm ViT/DeiT/BEiT/EVA/Swin)": "transformer",
    "torchvision Swin block": "torchvision.swin",
    "torchvision ViT encoder block": "torchvision.vit",
    "timm inverted residual": "timm.inverted_residual",
    "timm depthwise-separable block": "timm.depthwise_separable",
    "timm edge residual": "timm.edge_residual",
    "timm ConvBnAct": "timm.conv_bn_act",
    "torchvision ConvNeXt / EfficientNet block": "torchvision.block",
    "torchvision RegNet block": "torchvision.regnet",
}


def _family(key: str) -> Family:
    fam = _BY_KEY.get(key)
    if fam is None:
        raise ValueError(f"a converted block names family {key!r}, which this sdkernels "
                         f"does not have (known: {sorted(_BY_KEY)})")
    return fam


def _other_forward(m: nn.Module, fam: Family) -> str:
    """"" when ``m``'s own forward reads and takes only what ``fam``'s gated forward
    reproduces, else why not (a look-alike with the same children and another forward:
    windowed attention, a class-token update, a second input)."""
    code = getattr(getattr(type(m), "forward", None), "__code__", None)
    if code is None:
        return "its forward is not Python code to check"
    extra = sorted(set(code.co_names) - fam.names)
    args = sorted(set(code.co_varnames[2:code.co_argcount + code.co_kwonlyargcount])
                  - fam.args)
    if extra or args:
        return (f"its forward reads {extra + args}, which the gated forward of this layout "
                "does not reproduce")
    return ""


def looks_residual(m: nn.Module) -> bool:
    """Whether ``m`` carries a drop path (a timm ``DropPath``, a torchvision
    ``StochasticDepth``, or a child slot named like one): a residual block that must
    convert exactly or be refused."""
    return isinstance(m, ConvertedBlock) or any(
        _is_drop_path(c) or n.startswith(("drop_path", "stochastic_depth"))
        for n, c in m._modules.items())


def recognise(m: nn.Module):
    """(family, "") for a block of a known family; (family, SKIP) for one that has no
    residual in this instance; (None, why) for a residual-looking block that no family
    reproduces exactly; (None, None) for anything else."""
    reasons = []
    for fam in FAMILIES:
        verdict = fam.check(m)
        if verdict == "":
            verdict = _other_forward(m, fam)
        if verdict is None:
            continue
        if verdict in ("", SKIP):
            return fam, verdict
        reasons.append(f"{fam.name}: {verdict}")
    if reasons:
        return None, "; ".join(reasons)
    if looks_residual(m):
        return None, (f"children {list(_children(m))} match no known residual-block "
                      "layout (see sdkernels.families)")
    return None, None


# -- the class swap ---------------------------------------------------------------------

# Per-shape copies of the family forwards, for torch.compile. Dynamo keeps compiled code
# per code object and guards it on the shapes of the parameters it reads (static to it).
# Each residual's host-side draw is a graph break, so the code after it (the branch and
# the add) is a frame of the family forward's own; shared by all blocks of a family, it
# would compile once per block shape, gate path and input layout, and a ConvNeXt's 4
# stages x 3 row-mode paths pass dynamo's default recompile_limit of 8, after which the
# frame runs eagerly. Blocks of one shape share one copy with a code object of its own,
# so each copy's frames see one shape (functions nested in it, the branches, are inlined
# into those frames). Eager cost: none (the same code). The key is taken at conversion
# and unpickling: shapes changed later (pruning) only share compiled code differently.
_FORWARDS: dict = {}


def _forward_for(block: nn.Module) -> Callable:
    """The family forward's copy for blocks of ``block``'s family and tensor shapes."""
    key = (block._sd_family,) + tuple(
        (n, tuple(t.shape))
        for n, t in itertools.chain(block.named_parameters(), block.named_buffers()))
    fn = _FORWARDS.get(key)
    if fn is None:
        fn = _FORWARDS[key] = _code_copy(_family(block._sd_family).forward)
    return fn


class ConvertedBlock:
    """Mixin of converted blocks: ``forward`` runs the family's gated forward (its copy
    for this block's shapes, set on conversion and on unpickling); the rest of the class
    is the block's own."""

    def forward(self, *args, **kwargs):
        fwd = self.__dict__.get("_sd_forward")
        if fwd is None:  # a pickle naming a family this version lacks: _family raises
            fwd = _forward_for(self)
        return fwd(self, *args, **kwargs)

    def sd_gates(self) -> list:
        """The gates of this block's residuals, in forward order."""
        return [self._modules[s] for s in _family(self._sd_family).slots]

    def sd_original_drop_paths(self) -> list:
        """Per gate, the drop-path module it replaced (None where there was none)."""
        fam = _family(self._sd_family)
        return [self._sd_saved.get(src) for src in (fam.sources or fam.slots)]

    def __reduce_ex__(self, protocol):
        # the generated class is not importable; pickle and deepcopy rebuild it from the
        # original class
        state = self.__dict__.copy()
        state.pop("_sd_forward", None)  # a function copy: not picklable, found again
        return _new_gated, (self._sd_base,), state

    def __setstate__(self, state):
        fam = state.get("_sd_family")
        if fam in _LEGACY_NAMES:
            state = dict(state, _sd_family=_LEGACY_NAMES[fam])
        super().__setstate__(state)
        if state.get("_sd_family") in _BY_KEY:  # else it loads, reverts, and forward raises
            self._sd_forward = _forward_for(self)


_CLASSES: dict = {}


def _gated_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Gated{base.__name__}", (ConvertedBlock, base), {
            "__module__": __name__, "__qualname__": f"Gated{base.__qualname__}"})
        _CLASSES[base] = cls
    return cls


def _new_gated(base):
    cls = _gated_class(base)
    return cls.__new__(cls)


def to_gated(block: nn.Module, family: Family) -> nn.Module:
    """Convert ``block`` of ``family`` in place; its gates start at survival 1. Each
    gate takes its drop path's place in the registration order (new slots go last)."""
    mods = block._modules
    saved = {s: mods[s] for s in family.slots if s in mods}
    # timm keeps an absent drop path as a plain None attribute
    attrs = {s: block.__dict__.pop(s) for s in family.slots if s in block.__dict__}
    block._sd_order = list(mods)
    gates = {s: ResidualGate().train(block.training) for s in family.slots}
    # the shortcut's BatchNorm runs on every row; the branch's on the survivors
    bn = branch_has_batchnorm(c for n, c in mods.items()
                              if n not in ("downsample", "shortcut", "proj"))
    for g in gates.values():
        g.min_rows, g.per_sample_branch = (2, False) if bn else (1, True)
    items = [(n, gates.pop(n) if n in gates else m) for n, m in mods.items()]
    mods.clear()
    mods.update(items + list(gates.items()))
    block._sd_base = type(block)
    block._sd_family = family.key
    block._sd_saved = saved
    block._sd_attrs = attrs
    block.__class__ = _gated_class(block._sd_base)
    block._sd_forward = _forward_for(block)
    return block


def revert_block(block: ConvertedBlock) -> nn.Module:
    """Undo :func:`to_gated` in place: the original class and drop-path modules."""
    mods = dict(block._modules)
    for m in block._sd_saved.values():  # model.train()/eval() did not reach them
        if isinstance(m, nn.Module):
            m.train(block.training)
    mods.update(block._sd_saved)
    block._modules.clear()
    block._modules.update((n, mods[n]) for n in block._sd_order if n in mods)
    block.__dict__.update(block._sd_attrs)
    block.__class__ = block._sd_base
    for a in ("_sd_base", "_sd_family", "_sd_saved", "_sd_attrs", "_sd_order", "_sd_forward"):
        block.__dict__.pop(a, None)
    return block


