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
    "mask_multiply",
    "bernoulli_mask",
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
