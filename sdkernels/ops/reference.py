"""Pure-PyTorch reference ops: the oracle in tests and the fallback backend.

Everything here is written for clarity, not speed. Every fast path in
``sdkernels.ops`` (compiled extension, Triton) must match these functions.

It also holds the *naive* stochastic depth that torchvision's ``StochasticDepth`` and
timm's ``DropPath`` implement: the residual branch is always computed and then
multiplied by a 0/1 Bernoulli mask. That is the baseline every benchmark compares
against, so it lives in the library (benchmarks and tests import it, never copy it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "scale_bias_add_relu",
    "scale_bias_add_relu_backward",
    "batch_norm_add_relu",
    "stats_dtype",
    "bn_stats",
    "scale_bias_relu",
    "relu_bn_backward_reduce",
    "bn_backward_apply",
    "mask_multiply",
    "bernoulli_mask",
    "layout_of",
]


def _per_channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    # [C] -> [1, C, 1, ...] so it broadcasts over an [N, C, *] tensor.
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def scale_bias_add_relu(x, scale, bias, residual):
    """relu(x * scale[c] + bias[c] + residual) for x of shape [N, C, *].

    The tail of every residual block: BN apply (scale/bias carry gamma*invstd and the
    gate scale s or p_l folded in), residual add and ReLU.
    """
    s = _per_channel(scale, x.dim()).to(x.dtype)
    b = _per_channel(bias, x.dim()).to(x.dtype)
    return torch.relu(x * s + b + residual)


def scale_bias_add_relu_backward(grad_out, out, x, scale):
    """Gradients of :func:`scale_bias_add_relu` given its output.

    Returns (grad_x, grad_scale, grad_bias, grad_residual); grad_scale and grad_bias
    have scale's dtype and are reduced in at least float32.
    """
    g = torch.where(out > 0, grad_out, torch.zeros_like(grad_out))
    dims = [0] + list(range(2, x.dim()))
    acc = torch.promote_types(scale.dtype, torch.float32)
    grad_scale = (g.to(acc) * x.to(acc)).sum(dims).to(scale.dtype)
    grad_bias = g.to(acc).sum(dims).to(scale.dtype)
    grad_x = g * _per_channel(scale, x.dim()).to(x.dtype)
    return grad_x, grad_scale, grad_bias, g


def batch_norm_add_relu(y, residual, weight, bias, running_mean, running_var, *,
                        training: bool, momentum: float, eps: float,
                        gate_scale: float = 1.0):
    """relu(residual + gate_scale * batch_norm(y)) the way eager PyTorch writes it.

    With gate_scale == 1 this is exactly torchvision's ``out = bn2(...); out += identity;
    out = relu(out)``: no extra multiply, so a surviving block costs what a
    constant-depth block costs.
    """
    z = F.batch_norm(y, running_mean, running_var, weight, bias, training, momentum, eps)
    if gate_scale == 1.0:
        return z.add_(residual).relu_()
    return torch.add(residual, z, alpha=gate_scale).relu_()


# ---------------------------------------------------------------------------------------
# Training-mode batch norm decomposed as design §5 does (statistics, apply, backward
# reductions, backward apply): the oracle of the compiled ops of the same names.

def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of per-channel statistics for activations of ``dtype`` (fp32, fp64 for fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def bn_stats(x, running_mean, running_var, momentum: float, eps: float):
    """(mean, invstd) over all but dim 1; updates the running statistics in place.

    Matches ``F.batch_norm(training=True)``: biased variance for invstd, unbiased for the
    running variance. An empty x gives mean 0, invstd 1/sqrt(eps) and no update.
    """
    acc = stats_dtype(x.dtype)
    xs = x.to(acc)
    m = x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else 0
    if m == 0:
        c = x.shape[1]
        return (torch.zeros(c, dtype=acc, device=x.device),
                torch.full((c,), eps, dtype=acc, device=x.device).rsqrt())
    var, mean = torch.var_mean(xs, dim=_reduce_dims(x), correction=0)
    invstd = torch.rsqrt(var + eps)
    if running_mean is not None:
        unbiased = var * (m / (m - 1)) if m > 1 else var
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return mean, invstd


def scale_bias_relu(x, scale, bias):
    """relu(x * scale[c] + bias[c]): BN apply (folded) + ReLU inside a residual branch."""
    s = _per_channel(scale, x.dim()).to(x.dtype)
    b = _per_channel(bias, x.dim()).to(x.dtype)
    return torch.relu(x * s + b)


def _masked(grad_out, out):
    if out is None:
        return grad_out
    return torch.where(out > 0, grad_out, torch.zeros_like(grad_out))


def relu_bn_backward_reduce(grad_out, out, y, mean, invstd, want_dy: bool):
    """(sum dy, sum dy * xhat, dy or empty): BN-backward reductions behind a ReLU.

    dy = grad_out where out > 0 (out None: no ReLU), xhat = (y - mean) * invstd.
    """
    dy = _masked(grad_out, out)
    acc = mean.dtype
    xhat = (y.to(acc) - _per_channel(mean, y.dim())) * _per_channel(invstd, y.dim())
    dims = _reduce_dims(y)
    sum_dy = dy.to(acc).sum(dims)
    sum_dy_xhat = (dy.to(acc) * xhat).sum(dims)
    return sum_dy, sum_dy_xhat, (dy.contiguous(memory_format=_fmt(y)) if want_dy
                                 else y.new_empty(0))


def bn_backward_apply(grad_out, out, y, mean, invstd, weight, sum_dy, sum_dy_xhat):
    """grad_y = weight * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M)."""
    dy = _masked(grad_out, out)
    acc = mean.dtype
    m = y.numel() // max(y.shape[1], 1)
    if m == 0:
        return torch.empty_like(y, memory_format=_fmt(y))
    pc = lambda v: _per_channel(v, y.dim())  # noqa: E731
    k = invstd if weight is None else weight.to(acc) * invstd
    xhat = (y.to(acc) - pc(mean)) * pc(invstd)
    g = pc(k) * (dy.to(acc) - pc(sum_dy) / m - xhat * pc(sum_dy_xhat) / m)
    return g.to(y.dtype).contiguous(memory_format=_fmt(y))


def layout_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is stored that way (and not also plain contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fmt(x: torch.Tensor) -> torch.memory_format:
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(x)


def bernoulli_mask(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row 0/1 mask shaped [N, 1, 1, ...] from a bool vector of survivors."""
    return keep.to(device=like.device, dtype=like.dtype).reshape(
        (-1,) + (1,) * (like.dim() - 1))


def mask_multiply(branch: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """Naive stochastic depth (torchvision / timm): branch * mask * scale.

    ``branch`` has already been computed in full, whatever the mask: that is exactly the
    waste sdkernels removes. ``keep`` is a bool tensor of shape [N] (row mode) or [1]
    (batch mode, broadcast over the batch).
    """
    return branch * (bernoulli_mask(keep, branch) * scale)
