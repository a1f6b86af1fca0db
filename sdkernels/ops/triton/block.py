"""Residual blocks built from the fused Triton conv (:mod:`.conv`).

* :func:`block_eval`: a whole residual block in eval mode, BN and p_l already folded
  into the conv weights and biases (design §5): every conv but the last runs with a
  bias + ReLU epilogue, the last with bias + residual + ReLU; the shortcut (identity,
  option A or a 1x1 projection) is read inside that last epilogue. No separate
  elementwise pass: a BasicBlock is 2 kernel launches (3 with a projection), a
  Bottleneck 3 (4).
* :func:`conv_bn_stats`: the training-forward building block: conv (optionally with the
  previous BN's scale-shift-ReLU in its prologue) whose epilogue also produces the
  per-channel batch statistics of its output, so BN needs no extra pass over it.

Pure-PyTorch references of both come first (the oracle of the tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv import _DTYPES, _conv2d_fused_checked, conv2d_fused

__all__ = ["block_eval", "conv_bn_stats", "block_eval_reference", "conv_bn_stats_reference"]

_FN_BLOCK = "sdkernels.ops.triton.block_eval"
_FN_STATS = "sdkernels.ops.triton.conv_bn_stats"


# ---------------------------------------------------------------------------------------
# References.

def block_eval_reference(x, convs, shortcut):
    """:func:`block_eval` with ``F.conv2d``, computed in promote(x.dtype, float32)."""
    cd = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(cd)
    h = xc
    for i, (w, b, s, p) in enumerate(convs):
        h = F.conv2d(h, w.to(cd), None if b is None else b.to(cd), s, p)
        if i < len(convs) - 1:
            h = torch.relu(h)
    kind = shortcut[0]
    if kind == "identity":
        r = xc
    elif kind == "option_a":
        _, stride, out_ch = shortcut
        r = xc[:, :, ::stride, ::stride]
        r = F.pad(r, (0, 0, 0, 0, 0, out_ch - r.shape[1]))
    else:
        w, b, s, p = shortcut[1]
        r = F.conv2d(xc, w.to(cd), None if b is None else b.to(cd), s, p)
    return torch.relu(h + r).to(x.dtype).contiguous(memory_format=torch.channels_last)


def conv_bn_stats_reference(x, weight, stride, padding, prologue=None):
    """(y, mean, biased var) of ``conv2d(prologue(x))``; stats in fp32 (fp64 for fp64)."""
    cd = torch.promote_types(x.dtype, torch.float32)
    h = x.to(cd)
    if prologue is not None:
        scale, shift = prologue
        h = torch.relu(h * scale.to(cd).view(1, -1, 1, 1) + shift.to(cd).view(1, -1, 1, 1))
    y = F.conv2d(h, weight.to(cd), None, stride, padding)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last), mean, var


# ---------------------------------------------------------------------------------------
# Fused versions.

def _conv_spec(spec, what):
    try:
        w, b, s, p = spec
    except (TypeError, ValueError):
        raise ValueError(f"{_FN_BLOCK}: {what} must be a (weight, bias, stride, padding) "
                         f"tuple, got {spec!r}") from None
    return w, b, s, p


def _as(w, x):
    # folded weights may come in fp32 for a bf16/fp16 block: cast (weights are small)
    if (isinstance(w, torch.Tensor) and isinstance(x, torch.Tensor) and w.dtype != x.dtype
            and w.is_floating_point() and x.dtype in _DTYPES):
        return w.to(x.dtype)
    return w


def block_eval(x, convs, shortcut, *, allow_tf32=None):
    """Eval forward of a residual block with BN and p_l folded into its convs.

    Args:
        x: block input [N, C, H, W] (fp16/bf16/fp32; any layout, channels_last fastest).
        convs: list of ``(weight, bias, stride, padding)`` for the residual branch in
            order (BasicBlock: 2, Bottleneck: 3); ``bias`` may be None. Every conv but
            the last gets bias + ReLU, the last bias + shortcut + ReLU. Weights of
            another float dtype than x are cast to x's dtype.
        shortcut: ``("identity",)``, ``("option_a", stride, out_channels)`` (x
            subsampled by ``stride`` and zero-padded to ``out_channels`` channels, read
            on the fly), or ``("projection", (weight, bias, stride, padding))`` (a conv
            with folded BN and no ReLU, run by the same kernel, then added in the last
            conv's epilogue).
        allow_tf32: fp32 only: every conv's dot in TF32 on GPU (~1e-3 relative error,
            the cuDNN default) or IEEE fp32 (False). None follows
            ``torch.backends.cudnn.allow_tf32`` (True by default, what ``F.conv2d``
            does). Passed to :func:`.conv.conv2d_fused`; ignored for fp16/bf16 and
            under the Triton interpreter (which computes in IEEE fp32 either way).

    Returns:
        ``relu(shortcut(x) + f(x))``, x's dtype, channels_last.
    """
    if not isinstance(convs, (list, tuple)) or len(convs) < 1:
        raise ValueError(f"{_FN_BLOCK}: convs must be a non-empty list of "
                         f"(weight, bias, stride, padding), got {convs!r}")
    if not isinstance(shortcut, (list, tuple)) or not shortcut:
        raise ValueError(f"{_FN_BLOCK}: shortcut must be ('identity',), ('option_a', stride, "
                         f"out_channels) or ('projection', (weight, bias, stride, padding))")
    specs = [_conv_spec(c, f"convs[{i}]") for i, c in enumerate(convs)]
    h = x
    for w, b, s, p in specs[:-1]:
        h = conv2d_fused(h, _as(w, x), b, s, p, relu=True, allow_tf32=allow_tf32)
    w, b, s, p = specs[-1]
    kind = shortcut[0]
    if kind == "identity":
        if len(shortcut) != 1:
            raise ValueError(f"{_FN_BLOCK}: identity shortcut takes no arguments: {shortcut!r}")
        return conv2d_fused(h, _as(w, x), b, s, p, residual=x, residual_mode="add", relu=True,
                            allow_tf32=allow_tf32)
    if kind == "option_a":
        if len(shortcut) != 3:
            raise ValueError(f"{_FN_BLOCK}: option_a shortcut is ('option_a', stride, "
                             f"out_channels), got {shortcut!r}")
        _, stride, out_ch = shortcut
        if out_ch != w.shape[0]:
            raise ValueError(f"{_FN_BLOCK}: option_a shortcut has {out_ch} channels, the "
                             f"last conv {w.shape[0]}")
        return conv2d_fused(h, _as(w, x), b, s, p, residual=x, residual_mode="option_a",
                            res_stride=stride, relu=True, allow_tf32=allow_tf32)
    if kind == "projection":
        if len(shortcut) != 2:
            raise ValueError(f"{_FN_BLOCK}: projection shortcut is ('projection', (weight, "
                             f"bias, stride, padding)), got {shortcut!r}")
        pw, pb, ps, pp = _conv_spec(shortcut[1], "the projection")
        r = conv2d_fused(x, _as(pw, x), pb, ps, pp, allow_tf32=allow_tf32)
        return conv2d_fused(h, _as(w, x), b, s, p, residual=r, residual_mode="add", relu=True,
                            allow_tf32=allow_tf32)
    raise ValueError(f"{_FN_BLOCK}: unknown shortcut kind {kind!r} (identity, option_a, "
                     f"projection)")


def conv_bn_stats(x, weight, stride, padding, prologue=None, *, allow_tf32=None):
    """Conv whose epilogue also yields the batch statistics of its output.

    Args:
        x: [N, Cin, H, W], fp16/bf16/fp32 (channels_last fastest).
        weight: [Cout, Cin, kh, kw].
        prologue: None or ``(scale, shift)`` per input channel: the conv reads
            ``relu(x * scale + shift)`` (the previous BN applied with its ReLU) on
            in-bounds positions; padding stays zero.
        allow_tf32: fp32 only: TF32 dot on GPU (y and the statistics then carry TF32's
            ~1e-3 relative error) or IEEE fp32 (False). None follows
            ``torch.backends.cudnn.allow_tf32`` (True by default, like ``F.conv2d``).
            Passed to :func:`.conv.conv2d_fused`'s ``allow_tf32``.

    Returns:
        ``(y, mean, var)``: y the conv output (x's dtype, channels_last, no bias), mean
        and *biased* variance per output channel in fp32, of the exact fp32 conv result
        (before rounding y). An empty batch gives zeros.

    Numerics: the kernel does not emit a global sum of squares. Each program reduces
    fixed 64-row slices (16 under the interpreter) to a sum and a sum of squared
    deviations from the slice's own mean; a small fp32 step merges the slices with
    Chan's parallel formula (``m2 = sum m2_j + sum n_j (mean_j - mean)^2``). That
    removes the catastrophic cancellation of ``E[y^2] - E[y]^2`` (which loses all
    digits in fp32 once |mean| / std exceeds about 1e3) up to slice level, at the cost
    of one extra pass over the accumulator tile in registers. It is not a sequential
    Welford: within a slice the deviations are taken from the exact slice mean
    (two-pass in registers), which is at least as accurate.
    """
    if prologue is not None:
        try:
            scale, shift = prologue
        except (TypeError, ValueError):
            raise ValueError(f"{_FN_STATS}: prologue must be None or (scale, shift)") from None
    else:
        scale = shift = None
    y, total, m2 = _conv2d_fused_checked(x, _as(weight, x), None, stride, padding, scale,
                                         shift, None, "none", 1, False, True, allow_tf32)
    m = y.shape[0] * y.shape[2] * y.shape[3]
    if m == 0:
        return y, total, m2
    return y, total / m, m2 / m
