"""Training forward/backward of a whole residual branch with BN, fused and recomputing.

What it fuses (design §5): a residual block's branch is a chain of stages
``conv -> BN (batch statistics) -> ReLU`` whose last stage ends in
``BN * s + residual -> ReLU`` instead. Convolutions run through ATen (oneDNN / cuDNN);
everything else runs as the sdkernels ops, one pass each:

    forward   y_i = conv_i(a_{i-1})                        (a_0 = block input)
              mean_i, invstd_i = bn_stats(y_i)             (+ running-stat update)
              a_i = scale_bias_relu(y_i, k_i, t_i)         (i < L)
              out = scale_bias_add_relu(y_L, s k_L, s t_L, residual)
    backward  sums = relu_bn_backward_reduce(g, out, y_L)  (also dy = grad of residual)
              gy_L = bn_backward_apply(...)
              a_{i-1} recomputed by scale_bias_relu, then conv backward (dgrad + wgrad),
              and the same reduce/apply pair for every earlier stage.

Saved for backward: the block input, the convolution outputs y_i, the output, and the
per-channel mean/invstd: never the BN outputs or the post-ReLU activations, which are
recomputed. The output is the next block's input, so it costs no extra memory.

Layout: 4-D inputs are computed in channels_last internally (oneDNN's and cuDNN's fast
layout); the output keeps the input's layout. Gradients for the input come back in
channels_last, which autograd accepts and the previous block consumes as is.

Two implementations of the one decomposition, each a device's (``ops.dispatch`` picks):
``residual_branch_train_cpu`` runs it as two compiled calls (``_CompiledBranchFn`` ->
``sdkernels::residual_branch_forward`` / ``_backward``, csrc/cpu/residual_branch.cpp),
which also keep the input gradient in x's layout and reuse backward buffers in place;
``residual_branch_train`` (``_ResidualBranchFn``) runs it op by op with a
:class:`Kernels` set: the extension's on CUDA, Triton's, or ``REFERENCE_KERNELS``, the
plain-PyTorch oracle of both in tests.

With the Triton kernels (``triton_kernels``) each convolution also emits its output's
BN statistics from its epilogue and applies the previous stage's scale-bias-ReLU while
loading its input, so a_i is never written in forward (design §5); backward is the same.

Limits: plain BatchNorm in training mode (batch statistics), convolutions without bias;
anything else runs the modules (``ops.dispatch``). Under
``torch.compile`` the blocks use the ATen path instead, which Inductor fuses itself.
Double backward is not supported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from ..backends import effective_device_type
from . import extension, reference
from .reference import layout_of as _layout

__all__ = ["ConvBN", "Kernels", "REFERENCE_KERNELS", "EXTENSION_KERNELS", "triton_kernels",
           "residual_branch_train", "residual_branch_train_cpu", "conv_bn_relu_train"]

_aten = torch.ops.aten


@dataclass(frozen=True)
class ConvBN:
    """One conv + BatchNorm stage of a residual branch, everything passed explicitly."""

    weight: torch.Tensor                    # conv weight [Cout, Cin/groups, kh, kw]
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    bn_weight: Optional[torch.Tensor]       # gamma (None: affine=False)
    bn_bias: Optional[torch.Tensor]         # beta
    running_mean: Optional[torch.Tensor]    # updated in place when given
    running_var: Optional[torch.Tensor]
    momentum: float
    eps: float


@dataclass(frozen=True)
class Kernels:
    """The elementwise/reduction ops the fused branch is built from (one backend)."""

    bn_stats: object
    scale_bias_relu: object
    scale_bias_add_relu: object
    relu_bn_backward_reduce: object
    bn_backward_apply: object
    # Optional conv with BN statistics in its epilogue and the previous stage's
    # scale-bias-ReLU in its prologue (Triton): (x, w, stride, padding, prologue) ->
    # (y, mean, biased var). When set, the forward never writes the activations a_i.
    conv_bn_stats: object = None


REFERENCE_KERNELS = Kernels(
    reference.bn_stats, reference.scale_bias_relu, reference.scale_bias_add_relu,
    reference.relu_bn_backward_reduce, reference.bn_backward_apply)

EXTENSION_KERNELS = Kernels(
    extension.bn_stats, extension.scale_bias_relu, extension.scale_bias_add_relu,
    extension.relu_bn_backward_reduce, extension.bn_backward_apply)


def triton_kernels() -> Kernels:
    """The extension's kernels with Triton's statistics-emitting convolution (imports
    triton, hence a function)."""
    from . import triton as tri
    return Kernels(*[getattr(EXTENSION_KERNELS, f) for f in (
        "bn_stats", "scale_bias_relu", "scale_bias_add_relu", "relu_bn_backward_reduce",
        "bn_backward_apply")], conv_bn_stats=tri.conv_bn_stats)


def _finalize_stats(y, mean, var, st: ConvBN):
    """invstd from the epilogue's statistics, and the running-stat update BN would do."""
    m = y.numel() // y.shape[1]
    invstd = torch.rsqrt(var + st.eps)
    if st.running_mean is not None and m > 0:
        unbiased = var * (m / (m - 1)) if m > 1 else var
        st.running_mean.mul_(1 - st.momentum).add_(mean.to(st.running_mean.dtype), alpha=st.momentum)
        st.running_var.mul_(1 - st.momentum).add_(unbiased.to(st.running_var.dtype), alpha=st.momentum)
    return mean, invstd


def _triton_stage_ok(st: ConvBN, w) -> bool:
    return (st.groups == 1 and tuple(st.dilation) == (1, 1) and w.dim() == 4
            and w.dtype in (torch.float32, torch.float16, torch.bfloat16))


def _fold(mean, invstd, gamma, beta, gate_scale: float):
    """Per-channel (scale, shift) of BN apply with the gate scale folded in."""
    scale = invstd if gamma is None else invstd * gamma.to(invstd.dtype)
    shift = -mean * scale if beta is None else beta.to(invstd.dtype) - mean * scale
    if gate_scale != 1.0:
        scale, shift = scale * gate_scale, shift * gate_scale
    return scale, shift


def _conv(x, st: ConvBN, w):
    return _aten.convolution(x, w, None, st.stride, st.padding, st.dilation, False,
                             (0, 0), st.groups)


class _ResidualBranchFn(torch.autograd.Function):
    # The sdkernels ops inside run below the Autograd dispatch key (this function is their
    # autograd), which skips their Python autograd wrappers: ~5 us per op call.
    @staticmethod
    def forward(ctx, x, residual, spec, *params):
        with torch._C._AutoDispatchBelowAutograd():
            return _ResidualBranchFn._forward(ctx, x, residual, spec, *params)

    @staticmethod
    @once_differentiable  # double backward raises instead of silently missing terms
    def backward(ctx, grad_out):
        with torch._C._AutoDispatchBelowAutograd():
            return _ResidualBranchFn._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, x, residual, spec, *params):
        stages, kernels, gate_scale, fmt = spec
        k = kernels
        xc = x.contiguous(memory_format=fmt)
        res = xc if residual is None else residual.contiguous(memory_format=fmt)
        ys, stats, h = [], [], xc
        last = len(stages) - 1
        pending = None  # (y, scale, shift) whose ReLU the next conv applies in its prologue
        for i, st in enumerate(stages):
            w, gamma, beta = params[3 * i: 3 * i + 3]
            # oneDNN's forward is faster with the weight in the activations' layout
            # (the copy is weight-sized); its backward is not sensitive to it.
            wc = w.contiguous(memory_format=fmt) if w.dim() == 4 else w
            if k.conv_bn_stats is not None and _triton_stage_ok(st, wc):
                src, pro = (xc, None) if pending is None else (pending[0], pending[1:])
                y, mean, var = k.conv_bn_stats(src, wc, st.stride, st.padding, pro)
                mean, invstd = _finalize_stats(y, mean, var, st)
            else:
                if pending is not None:
                    h = k.scale_bias_relu(*pending)
                y = _conv(h, st, wc)
                mean, invstd = k.bn_stats(y, st.running_mean, st.running_var, st.momentum,
                                          st.eps)
            pending = None
            scale, shift = _fold(mean, invstd, gamma, beta, gate_scale if i == last else 1.0)
            if i == last:
                h = k.scale_bias_add_relu(y, scale, shift, res)
            elif k.conv_bn_stats is not None:
                pending = (y, scale, shift)
            else:
                h = k.scale_bias_relu(y, scale, shift)
            ys.append(y)
            stats += [mean, invstd, scale, shift]
        out = h if _layout(x) == fmt else h.contiguous(
            memory_format=_layout(x))
        ctx.spec = spec
        ctx.identity = residual is None
        ctx.save_for_backward(x, out, *ys, *stats, *params)
        ctx.n = len(stages)
        return out

    @staticmethod
    def _backward(ctx, grad_out):
        stages, k, gate_scale, fmt = ctx.spec
        n = ctx.n
        saved = ctx.saved_tensors
        x, out = saved[0], saved[1]
        ys = saved[2: 2 + n]
        stats = saved[2 + n: 2 + 5 * n]
        params = saved[2 + 5 * n:]
        need = ctx.needs_input_grad  # (x, residual, spec, *params)
        g = grad_out.contiguous(memory_format=fmt)
        out_c = out.contiguous(memory_format=fmt)
        last = n - 1
        want_dy = ctx.identity or need[1]
        grads_params: list = [None] * (3 * n)
        act_mask, dy_res, gx = out_c, None, None
        for i in range(last, -1, -1):
            st = stages[i]
            w, gamma, beta = params[3 * i: 3 * i + 3]
            mean, invstd, scale, shift = stats[4 * i: 4 * i + 4]
            y = ys[i]
            s = gate_scale if i == last else 1.0
            sum_dy, sum_dy_xhat, dy = k.relu_bn_backward_reduce(
                g, act_mask, y, mean, invstd, want_dy if i == last else False)
            if i == last:
                dy_res = dy if want_dy else None
            eff_w = None if gamma is None else gamma.to(mean.dtype) * s
            if gamma is None and s != 1.0:
                eff_w = torch.full_like(mean, s)
            gy = k.bn_backward_apply(g, act_mask, y, mean, invstd, eff_w, sum_dy, sum_dy_xhat)
            if gamma is not None and need[3 + 3 * i + 1]:
                grads_params[3 * i + 1] = (sum_dy_xhat * s).to(gamma.dtype)
            if beta is not None and need[3 + 3 * i + 2]:
                grads_params[3 * i + 2] = (sum_dy * s).to(beta.dtype)
            if i > 0:
                pm, pi, psc, psh = stats[4 * (i - 1): 4 * i]
                h_in = k.scale_bias_relu(ys[i - 1], psc, psh)
            else:
                h_in = x.contiguous(memory_format=fmt)
            want_in = i > 0 or need[0]
            wc = w
            gh, gw, _ = _aten.convolution_backward(
                gy, h_in, wc, [0], st.stride, st.padding, st.dilation, False, (0, 0),
                st.groups, [want_in, bool(need[3 + 3 * i]), False])
            grads_params[3 * i] = gw
            if i > 0:
                g, act_mask = gh, h_in
            else:
                gx = gh
        grad_res = None
        if ctx.identity:
            if gx is None:
                gx = dy_res
            else:
                gx = gx.add_(dy_res)
        elif need[1]:
            grad_res = dy_res
        return (gx, grad_res, None, *grads_params)


class _CompiledBranchFn(torch.autograd.Function):
    """The same branch as ``_ResidualBranchFn`` in two compiled calls (CPU extension).

    ``sdkernels::residual_branch_forward``/``_backward`` (csrc/cpu/residual_branch.cpp)
    run the identical decomposition without the per-op Python and dispatch cost, which on
    CIFAR-sized blocks was as large as the elementwise work itself.
    """

    @staticmethod
    def forward(ctx, x, residual, conv_args, bn_args, gate_scale, *params):
        n = len(params) // 3
        ws, gammas, betas = params[0::3], params[1::3], params[2::3]
        with torch._C._AutoDispatchBelowAutograd():
            rms, rvs, momentums, eps = bn_args
            out, saved = extension.residual_branch_forward(
                x, residual, ws, gammas, betas, rms, rvs, *conv_args, momentums, eps,
                gate_scale)
        ctx.conv_args, ctx.gate_scale = conv_args, gate_scale
        ctx.identity = residual is None
        ctx.present = [(g is not None, b is not None) for g, b in zip(gammas, betas)]
        ctx.save_for_backward(x, out, *saved, *[p for p in params if p is not None])
        ctx.n = n
        return out

    @staticmethod
    @once_differentiable  # double backward raises instead of silently missing terms
    def backward(ctx, grad_out):
        n = ctx.n
        saved = ctx.saved_tensors
        x, out, ys_stats, rest = saved[0], saved[1], saved[2: 2 + 3 * n], list(saved[2 + 3 * n:])
        ws, gammas, betas = [], [], []
        for has_g, has_b in ctx.present:
            ws.append(rest.pop(0))
            gammas.append(rest.pop(0) if has_g else None)
            betas.append(rest.pop(0) if has_b else None)
        need = ctx.needs_input_grad  # (x, residual, conv_args, bn_args, gate_scale, *params)
        mask = [bool(need[0]), bool(need[1])] + [bool(v) for v in need[5:]]
        with torch._C._AutoDispatchBelowAutograd():
            gx, gres, gws, ggs, gbs = extension.residual_branch_backward(
                grad_out, x, out, ys_stats, ws, gammas, betas, *ctx.conv_args,
                ctx.gate_scale, ctx.identity, mask)
        grads = []
        for i in range(n):
            grads += [gws[i] if mask[2 + 3 * i] else None,
                      ggs[i] if mask[3 + 3 * i] and gammas[i] is not None else None,
                      gbs[i] if mask[4 + 3 * i] and betas[i] is not None else None]
        return (gx if mask[0] else None, gres if mask[1] else None, None, None, None, *grads)


def _compiled_branch_applies(stages: Sequence[ConvBN]) -> bool:
    """Whether the compiled whole-branch ops take these stages: one running-stat mode for
    all stages (one list argument), 4-D weights, and a library that has the ops."""
    tracked = {st.running_mean is not None for st in stages}
    return (len(tracked) == 1 and all(st.weight.dim() == 4 for st in stages)
            and extension.has_branch_ops())


def _compiled_branch(x, residual, stages, params, gate_scale):
    conv_args = ([v for st in stages for v in st.stride], [v for st in stages for v in st.padding],
                 [v for st in stages for v in st.dilation], [st.groups for st in stages])
    track = stages[0].running_mean is not None
    bn_args = ([st.running_mean for st in stages] if track else [],
               [st.running_var for st in stages] if track else [],
               [float(st.momentum) for st in stages], [float(st.eps) for st in stages])
    return _CompiledBranchFn.apply(x, residual, conv_args, bn_args, float(gate_scale), *params)


def _autocast_inputs(x, residual, stages):
    """(device type, x, residual, params) in the dtype the convolutions run in: the
    autocast dtype when autocast is on, as eager would, else x's."""
    if x.dim() != 4:
        raise ValueError(f"residual_branch_train: expected a 4-D input, got {x.dim()}-D")
    dev = effective_device_type(x.device)  # autocast state of the device it stands for
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
        x = x.to(cdt)
        residual = None if residual is None else residual.to(cdt)
        ws = [st.weight.to(cdt) for st in stages]
    else:
        if residual is not None and residual.dtype != x.dtype:
            residual = residual.to(x.dtype)
        ws = [st.weight for st in stages]
    params = []
    for st, w in zip(stages, ws):
        params += [w, st.bn_weight, st.bn_bias]
    return dev, x, residual, params


def residual_branch_train(x: torch.Tensor, residual: Optional[torch.Tensor],
                          stages: Sequence[ConvBN], gate_scale: float,
                          kernels: Kernels) -> torch.Tensor:
    """relu(residual + gate_scale * branch(x)) in training mode, fused and recomputing,
    op by op with ``kernels``.

    ``residual=None`` means the identity shortcut (residual is ``x`` itself): its
    gradient is added to the input gradient without another pass. ``stages`` are the
    conv+BN stages of the branch in order (BasicBlock: 2, Bottleneck: 3); every stage
    but the last is followed by a ReLU, the last by the residual add and the ReLU.
    Under autocast the convolutions run in the autocast dtype, as eager would.
    """
    dev, x, residual, params = _autocast_inputs(x, residual, stages)
    with torch.autocast(dev, enabled=False):
        spec = (tuple(stages), kernels, float(gate_scale), torch.channels_last)
        return _ResidualBranchFn.apply(x, residual, spec, *params)


def residual_branch_train_cpu(x: torch.Tensor, residual: Optional[torch.Tensor],
                              stages: Sequence[ConvBN], gate_scale: float) -> torch.Tensor:
    """:func:`residual_branch_train` on CPU through the compiled whole-branch ops; stages
    those ops do not take (mixed running-stat tracking) run op by op on the extension."""
    if not _compiled_branch_applies(stages):
        return residual_branch_train(x, residual, stages, gate_scale, EXTENSION_KERNELS)
    dev, x, residual, params = _autocast_inputs(x, residual, stages)
    with torch.autocast(dev, enabled=False):
        return _compiled_branch(x, residual, stages, params, gate_scale)


class _ConvBNReLUFn(torch.autograd.Function):
    """relu(BN(conv(x))) in training, saving x, the output and the statistics only.

    The convolution output is recomputed in backward instead of saved. This is meant for
    a network's stem: with 3 input channels its convolution costs a few percent of one
    residual block's, while its output is a full activation; the stem's output is the
    first block's input, which that block keeps anyway, so the stem then adds no
    activation-sized tensor of its own to what the step keeps for backward.
    """

    @staticmethod
    def forward(ctx, x, spec, w, gamma, beta):
        st, k = spec
        with torch._C._AutoDispatchBelowAutograd():
            xc = x.contiguous(memory_format=torch.channels_last)
            y = _conv(xc, st, w)
            mean, invstd = k.bn_stats(y, st.running_mean, st.running_var, st.momentum, st.eps)
            scale, shift = _fold(mean, invstd, gamma, beta, 1.0)
            out = k.scale_bias_relu(y, scale, shift)
        ctx.spec = spec
        ctx.save_for_backward(x, out, mean, invstd, w, gamma, beta)
        return out

    @staticmethod
    @once_differentiable  # double backward raises instead of silently missing terms
    def backward(ctx, g):
        st, k = ctx.spec
        x, out, mean, invstd, w, gamma, beta = ctx.saved_tensors
        need = ctx.needs_input_grad  # (x, spec, w, gamma, beta)
        with torch._C._AutoDispatchBelowAutograd():
            xc = x.contiguous(memory_format=torch.channels_last)
            y = _conv(xc, st, w)  # recomputed
            g = g.contiguous(memory_format=torch.channels_last)
            sum_dy, sum_dy_xhat, _ = k.relu_bn_backward_reduce(g, out, y, mean, invstd, False)
            eff_w = None if gamma is None else gamma.to(mean.dtype)
            gy = k.bn_backward_apply(g, out, y, mean, invstd, eff_w, sum_dy, sum_dy_xhat)
            gx, gw, _ = _aten.convolution_backward(
                gy, xc, w, [0], st.stride, st.padding, st.dilation, False, (0, 0), st.groups,
                [bool(need[0]), bool(need[2]), False])
        return (None if gx is None else gx.contiguous(memory_format=_layout(x)), None,
                None if gw is None else gw.contiguous(memory_format=_layout(w)),
                sum_dy_xhat.to(gamma.dtype) if gamma is not None and need[3] else None,
                sum_dy.to(beta.dtype) if beta is not None and need[4] else None)


def conv_bn_relu_train(x: torch.Tensor, stage: ConvBN, kernels: Kernels) -> torch.Tensor:
    """relu(BN(conv(x))) in training (batch statistics), output in channels_last.

    The convolution is recomputed in backward (see ``_ConvBNReLUFn``); the output is
    channels_last whatever x's layout, so the blocks that follow run without layout
    conversions. Under autocast the convolution runs in the autocast dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"conv_bn_relu_train: expected a 4-D input, got {x.dim()}-D")
    dev = effective_device_type(x.device)  # autocast state of the device it stands for
    w = stage.weight
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
        x, w = x.to(cdt), w.to(cdt)
    with torch.autocast(dev, enabled=False):
        return _ConvBNReLUFn.apply(x, (stage, kernels), w, stage.bn_weight, stage.bn_bias)
