"""The real timm / torchvision models of every residual family that ``sdkernels.families``
converts, shrunk for CPU tests, and the model-side facts the family tests check against.

Everything here reads the packages' own structure (their block classes, their drop-path
modules and rates, their ``has_skip`` / ``use_res_connect`` flags), never sdkernels'
recognition code, so the tests compare sdkernels against an independent account of the
model. Nothing is imported from timm / torchvision at import time: the CPU CI environment
has neither, and the test files skip there.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

DROP_RATE = 0.2  # drop-path rate the models are built with (schedule="keep" reads it)


@dataclass(frozen=True)
class Spec:
    """One family's test model.

    * ``build()``: the model (random init, float32), with its drop paths at DROP_RATE;
    * ``blocks``: (module, class name) of the package's residual block classes;
    * ``size``: input image side; ``batch``: input batch;
    * ``residual(block)``: whether a block of those classes has a residual in this
      instance (timm ``has_skip``, torchvision ``use_res_connect``...);
    * ``fused(block)``: whether such a block is a plain ResNet block that ``convert``
      replaces by the fused ``sdkernels.BasicBlock`` / ``Bottleneck`` (a new object)
      instead of converting it in place (resnetblur50's stride-1 blocks have no
      anti-aliasing, hence no extra at all);
    * ``row_batch``: the batch of the row-mode tests (see skresnet18);
    * ``gates``: residuals per block (2 for transformer blocks);
    * ``drop_slots``: per gate, the name of the block's drop-path child it stands for
      (None: the block has none, e.g. torchvision RegNet / ViT);
    * ``branch``: per gate, a child of the block that runs only inside that residual's
      branch (its forward hook counts the branch's calls and rows).
    """

    name: str
    build: Callable[[], nn.Module]
    blocks: tuple
    size: int = 64  # BN families: 2x2 at the last stage, so that one surviving row still normalises
    batch: int = 2
    residual: Callable[[nn.Module], bool] = lambda m: True
    fused: Callable[[nn.Module], bool] = lambda m: False
    row_batch: int = 4
    gates: int = 1
    drop_slots: tuple = ("drop_path",)
    branch: tuple = ("conv1",)


def _timm(arch, **kw):
    import timm

    kw.setdefault("drop_path_rate", DROP_RATE)
    return timm.create_model(arch, pretrained=False, num_classes=10, **kw)


def _tv(arch, **kw):
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, num_classes=10, **kw)


def _tv_vit_b_16():
    # the real vit_b_16 (hidden 768, 12 heads) at 32 px, its encoder cut to 2 layers
    m = _tv("vit_b_16", image_size=32)
    m.encoder.layers = m.encoder.layers[:2]
    return m


def _tv_efficientnet_v2_s():
    # the real efficientnet_v2_s with its stages cut to 2 blocks each (FusedMBConv and
    # MBConv, residual and not): the full 40 blocks in float64 cost seconds per forward
    m = _tv("efficientnet_v2_s", stochastic_depth_prob=DROP_RATE)
    for stage in m.features[1:-1]:
        del stage[2:]
    return m


def _has_skip(m):
    return bool(m.has_skip)


def _use_res(m):
    return bool(getattr(m, "use_res_connect", True))


def _timm_regnet_residual(m):
    return m.downsample is not None


def _timm_plain_resnet_block(m):
    extras = [getattr(m, n, None) for n in ("aa", "se", "drop_block")]
    acts = [getattr(m, n) for n in ("act1", "act2", "act3") if hasattr(m, n)]
    return (all(e is None or isinstance(e, nn.Identity) for e in extras)
            and all(type(a) is nn.ReLU for a in acts))


_R = "timm.models.resnet"
_E = "timm.models._efficientnet_blocks"
_TIMM_EFFICIENTNET_BLOCKS = ((_E, "InvertedResidual"), (_E, "DepthwiseSeparableConv"),
                             (_E, "ConvBnAct"), (_E, "EdgeResidual"))
_TRANSFORMER = dict(gates=2, drop_slots=("drop_path1", "drop_path2"), branch=("attn", "mlp"))

SPECS = [
    # timm ResNets with SE / ECA / attention / anti-aliasing, cut to layers=(1, 2, 1, 1):
    # a downsampling block in each of the 4 stages and one identity-shortcut block.
    # Blocks without any extra (resnetblur50's stride-1 blocks: no anti-aliasing) become
    # the fused sdkernels blocks (``fused``; their own tests are in test_convert.py)
    Spec("timm.seresnet50", lambda: _timm("seresnet50", layers=(1, 2, 1, 1)),
         ((_R, "Bottleneck"),), fused=_timm_plain_resnet_block),
    Spec("timm.ecaresnet50d", lambda: _timm("ecaresnet50d", layers=(1, 2, 1, 1)),
         ((_R, "Bottleneck"),), fused=_timm_plain_resnet_block),
    Spec("timm.resnetrs50", lambda: _timm("resnetrs50", layers=(1, 2, 1, 1)),
         ((_R, "Bottleneck"),), fused=_timm_plain_resnet_block),
    Spec("timm.resnetblur50", lambda: _timm("resnetblur50", layers=(1, 2, 1, 1)),
         ((_R, "Bottleneck"),), fused=_timm_plain_resnet_block),
    # SelectiveKernel attention normalises pooled [rows, C, 1, 1] features with a
    # BatchNorm: in row mode one surviving row cannot train (test_families.py
    # test_row_mode_one_survivor_selective_kernel); with 16 rows that draw is rare (p = 0.5:
    # 16 / 2**16 per residual and step) and the seeds the tests use avoid it
    Spec("timm.skresnet18", lambda: _timm("skresnet18"),
         (("timm.models.sknet", "SelectiveKernelBasic"),), row_batch=16),
    Spec("timm.resnetv2_50", lambda: _timm("resnetv2_50", layers=(1, 2, 1, 1)),
         (("timm.models.resnetv2", "PreActBottleneck"),)),
    Spec("timm.resnetv2_50_no_preact",
         lambda: _timm("resnetv2_50", layers=(1, 2, 1, 1), preact=False),
         (("timm.models.resnetv2", "Bottleneck"),)),
    Spec("timm.resnetv2_18", lambda: _timm("resnetv2_18"),
         (("timm.models.resnetv2", "PreActBasic"),)),
    Spec("timm.regnetx_002", lambda: _timm("regnetx_002"),
         (("timm.models.regnet", "Bottleneck"), ("timm.models.regnet", "PreBottleneck")),
         residual=_timm_regnet_residual),
    Spec("timm.regnety_008", lambda: _timm("regnety_008"),
         (("timm.models.regnet", "Bottleneck"), ("timm.models.regnet", "PreBottleneck")),
         residual=_timm_regnet_residual),
    Spec("timm.convnext_atto", lambda: _timm("convnext_atto"),
         (("timm.models.convnext", "ConvNeXtBlock"),), size=32, branch=("conv_dw",)),
    Spec("timm.vit_tiny", lambda: _timm("vit_tiny_patch16_224", depth=2, img_size=32),
         (("timm.models.vision_transformer", "Block"),), size=32, **_TRANSFORMER),
    Spec("timm.deit_tiny", lambda: _timm("deit_tiny_patch16_224", depth=2, img_size=32),
         (("timm.models.vision_transformer", "Block"),), size=32, **_TRANSFORMER),
    Spec("timm.vit_tiny_respost", lambda: _vit_respost(),
         (("timm.models.vision_transformer", "ResPostBlock"),), size=32, **_TRANSFORMER),
    Spec("timm.beit_base", lambda: _timm("beit_base_patch16_224", depth=2, img_size=32),
         (("timm.models.beit", "Block"),), size=32, **_TRANSFORMER),
    Spec("timm.eva02_tiny", lambda: _timm("eva02_tiny_patch14_224", depth=2, img_size=28),
         (("timm.models.eva", "EvaBlock"),), size=28, **_TRANSFORMER),
    Spec("timm.swin_tiny", lambda: _timm("swin_tiny_patch4_window7_224", img_size=56,
                                         depths=(2, 2, 2, 2)),
         (("timm.models.swin_transformer", "SwinTransformerBlock"),), size=56,
         **_TRANSFORMER),
    Spec("timm.efficientnet_b0", lambda: _timm("efficientnet_b0"),
         _TIMM_EFFICIENTNET_BLOCKS,
         residual=_has_skip, branch=("conv_dw",)),
    Spec("timm.mobilenetv3_small_100", lambda: _timm("mobilenetv3_small_100"),
         _TIMM_EFFICIENTNET_BLOCKS,
         residual=_has_skip, branch=("conv_dw",)),
    Spec("torchvision.convnext_tiny",
         lambda: _tv("convnext_tiny", stochastic_depth_prob=DROP_RATE),
         (("torchvision.models.convnext", "CNBlock"),), size=32, drop_slots=("stochastic_depth",),
         branch=("block",)),
    Spec("torchvision.swin_t", lambda: _tv("swin_t"),
         (("torchvision.models.swin_transformer", "SwinTransformerBlock"),), size=32, gates=2,
         drop_slots=("stochastic_depth", "stochastic_depth"), branch=("attn", "mlp")),
    Spec("torchvision.swin_v2_t", lambda: _tv("swin_v2_t"),
         (("torchvision.models.swin_transformer", "SwinTransformerBlockV2"),), size=32, gates=2,
         drop_slots=("stochastic_depth", "stochastic_depth"), branch=("attn", "mlp")),
    Spec("torchvision.vit_b_16", _tv_vit_b_16,
         (("torchvision.models.vision_transformer", "EncoderBlock"),), size=32, gates=2,
         drop_slots=(None, None), branch=("self_attention", "mlp")),
    Spec("torchvision.efficientnet_b0",
         lambda: _tv("efficientnet_b0", stochastic_depth_prob=DROP_RATE),
         (("torchvision.models.efficientnet", "MBConv"),), residual=_use_res,
         drop_slots=("stochastic_depth",), branch=("block",)),
    Spec("torchvision.efficientnet_v2_s", _tv_efficientnet_v2_s,
         (("torchvision.models.efficientnet", "MBConv"),
          ("torchvision.models.efficientnet", "FusedMBConv")), residual=_use_res,
         drop_slots=("stochastic_depth",), branch=("block",)),
    Spec("torchvision.regnet_y_400mf", lambda: _tv("regnet_y_400mf"),
         (("torchvision.models.regnet", "ResBottleneckBlock"),), drop_slots=(None,),
         branch=("f",)),
]
BY_NAME = {s.name: s for s in SPECS}


def _vit_respost():
    # timm's post-norm ViT block (norm after the attention / MLP), no layer scale
    from timm.models.vision_transformer import ResPostBlock

    return _timm("vit_tiny_patch16_224", depth=2, img_size=32, block_fn=ResPostBlock)


def package_of(spec: Spec) -> str:
    return spec.name.split(".")[0]


def block_classes(spec: Spec) -> tuple:
    return tuple(getattr(importlib.import_module(mod), cls) for mod, cls in spec.blocks)


def package_blocks(spec: Spec, model: nn.Module) -> dict:
    """qualified name -> block, for every block of the family's classes that has a
    residual in this instance (the package's own account)."""
    classes = block_classes(spec)
    return {q: m for q, m in model.named_modules()
            if type(m) in classes and spec.residual(m)}


def fused_blocks(spec: Spec, model: nn.Module) -> dict:
    """The residual blocks that become fused sdkernels ResNet blocks."""
    return {q: m for q, m in package_blocks(spec, model).items() if spec.fused(m)}


def non_residual_blocks(spec: Spec, model: nn.Module) -> dict:
    classes = block_classes(spec)
    return {q: m for q, m in model.named_modules()
            if type(m) in classes and not spec.residual(m)}


def drop_path_types() -> tuple:
    """The packages' drop-path module classes (those that are installed)."""
    out = []
    try:
        from timm.layers import DropPath
        out.append(DropPath)
    except ImportError:
        pass
    try:
        from torchvision.ops import StochasticDepth
        out.append(StochasticDepth)
    except ImportError:
        pass
    return tuple(out)


def drop_rate(m) -> float:
    """A package drop-path module's rate (0 for None / nn.Identity)."""
    if m is None or isinstance(m, nn.Identity):
        return 0.0
    if hasattr(m, "drop_prob"):  # timm DropPath
        return float(m.drop_prob)
    return float(m.p)  # torchvision StochasticDepth


def drop_mode(m):
    if m is None or isinstance(m, nn.Identity):
        return None
    return getattr(m, "mode", "row")  # timm DropPath: per sample


def quiet(model: nn.Module) -> nn.Module:
    """Every Dropout of ``model`` at p = 0 (model-level randomness off)."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    return model


def no_drop_paths(model: nn.Module) -> nn.Module:
    """Every package drop path of ``model`` at rate 0 (the deterministic reference)."""
    for m in model.modules():
        if isinstance(m, drop_path_types()):
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
            else:
                m.p = 0.0
    return model


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter and normalisation statistic moved off its initial value, so that
    no residual branch contributes nothing (zero-initialised last BN of timm ResNets,
    layer scales of 1e-6, zero heads) and an error anywhere shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            spread = float(p.std()) if p.numel() > 1 else 0.0
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if spread > 1e-3:
                p.add_(noise * 0.2 * spread)
            else:  # constant at init (norm weights/biases, layer scales, zero heads)
                p.add_(noise * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
    return model


def make(spec: Spec, dtype=torch.float64, seed: int = 0) -> nn.Module:
    """The spec's model: built with torch seed ``seed``, perturbed, dropout off, in
    ``dtype`` (drop paths as built)."""
    torch.manual_seed(seed)
    m = quiet(perturb(spec.build(), seed))
    return m.to(dtype)


def inputs(spec: Spec, step: int = 0, dtype=torch.float64, batch: int | None = None):
    g = torch.Generator().manual_seed(100 + step)
    n = spec.batch if batch is None else batch
    x = torch.randn(n, 3, spec.size, spec.size, generator=g, dtype=dtype)
    return x, torch.randint(0, 10, (n,), generator=g)


def reference_copy(model: nn.Module) -> nn.Module:
    """A deep copy with the package drop paths off: the deterministic original."""
    return no_drop_paths(copy.deepcopy(model))


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def small_timm(arch: str) -> nn.Module:
    """A float64 timm ViT (4 blocks, 32 px) or ConvNeXt-Atto for the DDP, compile and
    checkpointing tests, its layer scales raised to 0.5 so that the branches matter
    (timm initialises them to 1e-6); float64, so that two runs agree to rounding."""
    import timm

    torch.manual_seed(0)
    if arch == "vit":
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                              depth=4, img_size=32)
    else:
        m = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("gamma"):
                    p.fill_(0.5)
    return m.double()
