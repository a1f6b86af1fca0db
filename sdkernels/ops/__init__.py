"""Functional ops: stateless, everything passed as arguments, backend chosen per call.

Modules (``sdkernels.blocks``) call these; these call a backend (``extension``,
``triton`` or ``reference``, see :mod:`sdkernels.backends`). Gates, gate scales and
statistics come in as arguments: nothing here reads hidden state.
"""
from __future__ import annotations

import torch

from . import extension, fused_block, reference
from ..backends import resolve_backend
from .fused_block import ConvBN

__all__ = ["scale_bias_add_relu", "batch_norm_add_relu", "residual_branch_train", "ConvBN",
           "resolve_backend", "reference", "extension", "fused_block"]


def scale_bias_add_relu(x, scale, bias, residual):
    """relu(x * scale[c] + bias[c] + residual) on the active backend."""
    if resolve_backend(x.device) == "extension":
        return extension.scale_bias_add_relu(x, scale, bias, residual)
    return reference.scale_bias_add_relu(x, scale, bias, residual)


def batch_norm_add_relu(y, residual, weight, bias, running_mean, running_var, *,
                        training: bool, momentum: float, eps: float,
                        gate_scale: float = 1.0):
    """relu(residual + gate_scale * batch_norm(y)): the end of every residual block.

    ``training`` means "normalise with batch statistics" (and update the running ones
    when given), as in ``F.batch_norm``. ``gate_scale`` is s = 1 or 1/p_l in training,
    p_l or 1 in eval (DESIGN 2).
    """
    backend = resolve_backend(y.device)
    if backend == "reference" or training:
        # Training keeps ATen's batch_norm + in-place add + ReLU, exactly what a
        # constant-depth block runs. Splitting BN into "normalise" + the fused
        # scale-bias-add-ReLU op was measured slower on the 2-core CPU (ResNet-110 step
        # with every block active: 1.12x the plain network, against 1.01x): the op's
        # backward re-reduces what BN's backward already reduces. The fused training
        # tail needs BN's backward fused with it (DESIGN 5), which is the next step.
        return reference.batch_norm_add_relu(
            y, residual, weight, bias, running_mean, running_var,
            training=training, momentum=momentum, eps=eps, gate_scale=gate_scale)
    if residual.dtype != y.dtype:  # autocast can hand a block an fp32 residual
        residual = residual.to(y.dtype)
    # Eval: running statistics, gamma, beta and p_l folded into one scale and bias.
    invstd = torch.rsqrt(running_var + eps)
    scale = invstd if weight is None else weight * invstd
    shift = -running_mean * scale if bias is None else bias - running_mean * scale
    if gate_scale != 1.0:
        scale, shift = scale * gate_scale, shift * gate_scale
    return extension.scale_bias_add_relu(y, scale, shift, residual)


def residual_branch_train(x, residual, stages, gate_scale: float, *, backend: str | None = None):
    """relu(residual + gate_scale * branch(x)) in training, fused (see ``ops.fused_block``).

    ``residual=None`` is the identity shortcut; ``stages`` are :class:`ConvBN` records.
    ``backend`` defaults to the active one; "reference" runs the same recomputing
    function on the pure-PyTorch versions of the ops (for tests).
    """
    backend = backend or resolve_backend(x.device)
    kernels = {"reference": lambda: fused_block.REFERENCE_KERNELS,
               "extension": fused_block.extension_kernels,
               "triton": fused_block.triton_kernels}[backend]()
    return fused_block.residual_branch_train(x, residual, stages, gate_scale, kernels)
