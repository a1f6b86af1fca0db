"""The one place an implementation is chosen (design §3).

:func:`implementation` looks up ``(backend, device type, phase)`` in ``_IMPLEMENTATIONS``;
the backend comes from :func:`sdkernels.backends.resolve_backend`, the device type from
:func:`sdkernels.backends.effective_device_type` (``meta`` stands for CUDA in a dry run).
A key that is not in the table (every ``reference`` key) runs the modules. The entry
says how a residual block, a stem and the module path's BN tail run on that key.

:func:`row_path` chooses how a row-mode residual of any branch runs: gathered
survivors, or the naive mask multiply beside it.

The fused entries apply to a call only when its plan is fusable (plain layers, no
hooks) and the call allows it (:func:`fused_applies`); otherwise the modules run, which
is always correct, so every fast path has the module path as its reference beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..backends import effective_device_type, resolve_backend
from . import extension, folded_eval, folding, fused_block, reference
from .plan import BranchPlan, StemPlan, bn_call_args, train_stages

__all__ = ["Implementation", "implementation", "fused_applies", "row_path", "residual_block",
           "conv_bn_relu", "residual_branch_train", "batch_norm_add_relu",
           "scale_bias_add_relu", "SHORTCUT"]

#: ``residual`` argument of :func:`residual_block`: apply the plan's shortcut to x.
SHORTCUT = object()


def _folded_bn_add_relu(y, residual, weight, bias, running_mean, running_var, *,
                        training: bool, momentum: float, eps: float, gate_scale: float = 1.0):
    """relu(residual + gate_scale * bn(y)) with running statistics, gamma, beta and the
    gate scale folded into one scale and shift for the extension's op (eval entries)."""
    if residual.dtype != y.dtype:  # autocast can hand a block an fp32 residual
        residual = residual.to(y.dtype)
    invstd = torch.rsqrt(running_var + eps)
    scale = invstd if weight is None else weight * invstd
    shift = -running_mean * scale if bias is None else bias - running_mean * scale
    if gate_scale != 1.0:
        scale, shift = scale * gate_scale, shift * gate_scale
    return extension.scale_bias_add_relu(y, scale, shift, residual)


@dataclass(frozen=True)
class Implementation:
    """How one (backend, device type, phase) runs; None fields run the modules.

    ``block``: training ``(x, residual | None, [ConvBN], gate_scale)``; eval
    ``(FoldedBlock, x)``. ``stem``: training ``(x, ConvBN)``; eval ``(FoldedConv, x)``.
    ``bn_tail``: relu(residual + s * bn(y)) after the modules' branch (the
    ``batch_norm_add_relu`` signature). ``scale_bias_add_relu``: the elementwise op.
    """

    block: Optional[Callable] = None
    stem: Optional[Callable] = None
    bn_tail: Callable = reference.batch_norm_add_relu
    scale_bias_add_relu: Callable = reference.scale_bias_add_relu


def _train_ops(kernels):
    return lambda x, residual, stages, s: fused_block.residual_branch_train(
        x, residual, stages, s, kernels)


def _train_triton(x, residual, stages, s):
    return fused_block.residual_branch_train(x, residual, stages, s,
                                             fused_block.triton_kernels())


def _stem_train_cpu(x, stage):
    return fused_block.conv_bn_relu_train(x, stage, fused_block.EXTENSION_KERNELS)


# Training entries keep ATen's BN + in-place add + ReLU as the modules' tail, exactly
# what a constant-depth block runs. Splitting BN into "normalise" + the fused
# scale-bias-add-ReLU op was measured slower on the 2-core CPU (ResNet-110 step, every
# block active: 1.12x the plain network against 1.01x): the op's backward re-reduces what
# BN's backward already reduces; the whole-branch function fuses them (design §5).
_EXT_TRAIN = dict(scale_bias_add_relu=extension.scale_bias_add_relu)
_EXT_EVAL = dict(bn_tail=_folded_bn_add_relu, scale_bias_add_relu=extension.scale_bias_add_relu)
# Triton brings convolutions only; its standalone elementwise op is the reference one.
_TRI_EVAL = dict(bn_tail=_folded_bn_add_relu)

_IMPLEMENTATIONS: dict[tuple[str, str, str], Implementation] = {
    # CPU training: the compiled whole-branch ops (csrc/cpu/residual_branch.cpp)
    ("extension", "cpu", "train"): Implementation(
        fused_block.residual_branch_train_cpu, _stem_train_cpu, **_EXT_TRAIN),
    ("extension", "cpu", "eval"): Implementation(
        folded_eval.block_eval_cpu, folded_eval.stem_eval_cpu, **_EXT_EVAL),
    # CUDA: the same decomposition op by op (the stem's fused forms are CPU-only)
    ("extension", "cuda", "train"): Implementation(
        _train_ops(fused_block.EXTENSION_KERNELS), **_EXT_TRAIN),
    ("extension", "cuda", "eval"): Implementation(folded_eval.block_eval_extension, **_EXT_EVAL),
    # Triton on CUDA, or on CPU under the interpreter (tests)
    ("triton", "cuda", "train"): Implementation(_train_triton),
    ("triton", "cpu", "train"): Implementation(_train_triton),
    ("triton", "cuda", "eval"): Implementation(folded_eval.block_eval_triton, **_TRI_EVAL),
    ("triton", "cpu", "eval"): Implementation(folded_eval.block_eval_triton, **_TRI_EVAL),
}
_MODULES = Implementation()


def implementation(device, training: bool) -> Implementation:
    """The implementation for tensors on ``device`` in training or eval: the one choice."""
    key = (resolve_backend(device), effective_device_type(device),
           "train" if training else "eval")
    return _IMPLEMENTATIONS.get(key, _MODULES)


def row_path(kept: int, rows: int, *, min_rows: int, per_sample_branch: bool,
             gather_min_drop: float) -> tuple[str, str | None]:
    """How a row-mode residual runs with ``kept`` of ``rows`` samples surviving:
    ``("dropped" | "active" | "rows" | "mask", why)``. "rows" gathers the survivors
    (real skipping); "mask" computes every row and multiplies by the mask, the naive
    implementation, which is the reference beside the gather: ``why`` is "min_rows"
    when the branch cannot run on so few rows (BatchNorm over one sample), "few_dropped"
    when a per-sample branch drops too few rows to pay for the gather and scatter
    (the same result, cheaper; design §2)."""
    if kept == 0:
        return "dropped", None
    if kept == rows:
        return "active", None
    if kept < min_rows:
        return "mask", "min_rows"
    if per_sample_branch and rows - kept < gather_min_drop * rows:
        return "mask", "few_dropped"
    return "rows", None


def _fused(x: torch.Tensor, plan):
    """The fused function for this call (the entry's ``block`` or ``stem``), or None
    when the modules must run."""
    if not plan.fusable or x.dim() != 4 or x.shape[0] == 0 or torch.compiler.is_compiling():
        return None  # (under torch.compile Inductor fuses the module path itself)
    fn = getattr(implementation(x.device, plan.training), plan.kind)
    if fn is None:
        return None
    if plan.training:
        return fn if plan.bn_values(x) > 1 else None  # BN raises on one value per channel
    if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in plan.parameters())):
        return None  # folded weights and the in-place epilogues have no autograd
    return fn


def fused_applies(x: torch.Tensor, plan) -> bool:
    """Whether this call replaces the plan's modules by a fused implementation."""
    return _fused(x, plan) is not None


def _compute_input(x):
    """x in the dtype the convolutions run in (autocast's when on), channels_last."""
    dev = effective_device_type(x.device)  # autocast state of the device it stands for
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    return dev, x.to(dtype).contiguous(memory_format=torch.channels_last)


def residual_block(x: torch.Tensor, plan: BranchPlan, gate_scale: float,
                   cache: folding.FoldCache, residual=SHORTCUT) -> torch.Tensor:
    """relu(residual + gate_scale * branch(x)) of a block described by ``plan``.

    ``residual``: :data:`SHORTCUT` applies the plan's shortcut to x; a tensor or None
    (x itself) is a shortcut already applied (row mode passes the survivors' rows).
    Training uses batch statistics; eval folds BN and ``gate_scale`` into the
    convolutions, cached in ``cache`` (the block's).
    """
    fused = _fused(x, plan) if plan.training or residual is SHORTCUT else None
    if fused is not None and not plan.training:
        dev, xc = _compute_input(x)
        fb = folding.fold_branch(plan, float(gate_scale), xc.dtype, x.device, cache)
        with torch.autocast(dev, enabled=False):
            return fused(fb, xc)
    if residual is SHORTCUT:
        residual = plan.shortcut.residual(x)
    if fused is not None:
        return fused(x, residual, train_stages(plan), gate_scale)
    if plan.hooked:  # the block's own modules, as its forward calls them, hooks and all
        out = modules_add(x, plan, gate_scale, residual)
        return torch.relu(out) if plan.relu is None else plan.relu(out)
    y = plan.branch(x)
    return _norm_add_relu(plan.last_norm, y, x if residual is None else residual, gate_scale)


def modules_add(x: torch.Tensor, plan: BranchPlan, gate_scale: float, residual=None):
    """residual + gate_scale * last_norm(branch(x)), every step a module call (their
    hooks run), before the block's final ReLU; ``residual`` None: x itself."""
    z = plan.last_norm(plan.branch(x))
    return (z if gate_scale == 1.0 else z * gate_scale) + (x if residual is None else residual)


def _norm_add_relu(bn, y, residual, gate_scale: float):
    """relu(residual + gate_scale * bn(y)) after the modules' branch. Other norms
    (SyncBatchNorm, FrozenBatchNorm2d, GroupNorm, ...) are called as modules."""
    if type(bn) in (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, torch.nn.BatchNorm3d):
        bn._check_input_dim(y)
        use_batch_stats, rm, rv, momentum = bn_call_args(bn)
        return batch_norm_add_relu(y, residual, bn.weight, bn.bias, rm, rv,
                                   training=use_batch_stats, momentum=momentum, eps=bn.eps,
                                   gate_scale=gate_scale)
    z = bn(y)
    if gate_scale != 1.0:
        z = z * gate_scale
    return torch.relu(z + residual)


def conv_bn_relu(x: torch.Tensor, plan: StemPlan, cache: folding.FoldCache) -> torch.Tensor:
    """relu(bn(conv(x))) of a network's stem described by ``plan``.

    Fused (CPU extension): training recomputes the convolution in backward instead of
    saving its output; eval folds BN into the convolution (cached in ``cache``). Both
    return channels_last, so the blocks after it run without layout conversions.
    """
    fused = _fused(x, plan)
    if fused is None:
        return plan.relu(plan.bn(plan.conv(x)))
    if plan.training:
        return fused(x, train_stages(plan)[0])
    dev, xc = _compute_input(x)
    fc = folding.fold_stem(plan, xc.dtype, x.device, cache)
    with torch.autocast(dev, enabled=False):
        return fused(fc, xc)


def residual_branch_train(x, residual, stages, gate_scale: float, *,
                          backend: str | None = None):
    """relu(residual + gate_scale * branch(x)) in training, fused, from :class:`ConvBN`
    stages (see ``ops.fused_block``); ``residual=None`` is the identity shortcut.

    ``backend`` None: the active one. "reference" runs the same recomputing function on
    the plain-PyTorch ops: the oracle of the others in tests.
    """
    backend = backend or resolve_backend(x.device)
    if backend == "reference":
        return fused_block.residual_branch_train(x, residual, stages, gate_scale,
                                                 fused_block.REFERENCE_KERNELS)
    key = (backend, effective_device_type(x.device), "train")
    impl = _IMPLEMENTATIONS.get(key)
    if impl is None or impl.block is None:
        raise ValueError(f"no fused training implementation for {key}")
    return impl.block(x, residual, stages, gate_scale)


def batch_norm_add_relu(y, residual, weight, bias, running_mean, running_var, *,
                        training: bool, momentum: float, eps: float,
                        gate_scale: float = 1.0):
    """relu(residual + gate_scale * batch_norm(y)): the end of every residual block.

    ``training`` means "normalise with batch statistics" (and update the running ones
    when given), as in ``F.batch_norm``. ``gate_scale`` is s = 1 or 1/p_l in training,
    p_l or 1 in eval (design §2).
    """
    return implementation(y.device, training).bn_tail(
        y, residual, weight, bias, running_mean, running_var, training=training,
        momentum=momentum, eps=eps, gate_scale=gate_scale)


def scale_bias_add_relu(x, scale, bias, residual):
    """relu(x * scale[c] + bias[c] + residual) on the active backend."""
    return implementation(x.device, False).scale_bias_add_relu(x, scale, bias, residual)
