"""Triton kernels: implicit-GEMM convolutions and what rides in their prologue/epilogue.

Division of labour (DESIGN 5): the compiled extension holds the elementwise and reduction
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
import os

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


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the Triton interpreter (kernels on CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_triton_import_error: str | None = None
_triton_checked = False


def _triton_missing() -> str | None:
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401  (a broken install fails here)
        except Exception as e:  # ImportError, or a broken install
            _triton_import_error = f"triton is not importable ({type(e).__name__}: {e})"
        _triton_checked = True
    return _triton_import_error


def unavailable_reason(device_type: str | None = None) -> str | None:
    """Why the Triton kernels cannot run (None when they can).

    ``device_type`` None: anywhere in this process; ``"cuda"``: on CUDA tensors;
    ``"cpu"``: on CPU tensors (only under the Triton interpreter).
    """
    why = _triton_missing()
    if why:
        return why
    import torch

    cuda = torch.cuda.is_available()
    interp = interpreter_enabled()
    if device_type is None:
        if cuda or interp:
            return None
        return "no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1)"
    if device_type == "cuda":
        return None if cuda else "no CUDA device"
    if device_type == "cpu":
        return None if interp else ("Triton kernels run on CPU tensors only under the "
                                    "interpreter (set TRITON_INTERPRET=1)")
    return f"no Triton kernels for device type {device_type!r}"


def is_available(device_type: str | None = None) -> bool:
    """Triton importable and a CUDA device present or TRITON_INTERPRET=1 set."""
    return unavailable_reason(device_type) is None


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
