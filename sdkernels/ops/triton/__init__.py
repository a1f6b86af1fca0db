"""Triton kernels: implicit-GEMM convolutions and what rides in their prologue/epilogue.

Division of labour (design §5): the compiled extension holds the elementwise and reduction
ops; Triton holds the convolutions and everything fused into them (the previous BN's
scale-bias-ReLU in the prologue; bias, residual add, ReLU and BN statistics in the
epilogue).

Importing this package never imports triton, so ``import sdkernels`` works without it.
The kernels live in :mod:`.conv` (the kernel family and ``conv2d_fused``) and
:mod:`.block` (block-level functions); their public names are also reachable from
here (``sdkernels.ops.triton.conv2d_fused`` ...), imported on first use.

Availability: triton importable, and a CUDA device present, or the Triton interpreter
switched on (``TRITON_INTERPRET=1`` in the environment before triton kernels are first
defined), in which case the kernels run, slowly, on CPU tensors.
"""
from __future__ import annotations

import importlib

from ... import availability as _availability

__all__ = ["is_available", "unavailable_reason", "interpreter_enabled",
           "conv2d_fused", "block_eval", "conv_bn_stats", "check_autotune_configs"]

_LAZY = {
    "conv2d_fused": "conv",
    "check_autotune_configs": "conv",
    "conv2d_fused_reference": "conv",
    "block_eval": "block",
    "conv_bn_stats": "block",
    "block_eval_reference": "block",
    "conv_bn_stats_reference": "block",
}


# Availability is answered below backends (design §3), by sdkernels.availability.
interpreter_enabled = _availability.interpreter_enabled
unavailable_reason = _availability.triton_unavailable_reason


def is_available(device_type: str | None = None) -> bool:
    """Triton importable and a CUDA device present or TRITON_INTERPRET=1 set."""
    return unavailable_reason(device_type) is None


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
