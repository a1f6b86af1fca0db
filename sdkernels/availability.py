"""What is installed: the compiled library and Triton (a leaf of design §3).

``backends`` decides from these answers and ``ops`` runs what they load, so the answers
live below both: ``backends`` never imports ``ops``. Importing this module loads
``sdkernels._C`` (its ops register their C++ kernels with the dispatcher); it never
imports triton and never fails.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

__all__ = ["extension_library", "extension_missing", "extension_failed",
           "extension_has_cuda", "interpreter_enabled", "triton_missing",
           "triton_unavailable_reason"]

_C = None
_reason: Optional[str] = None
try:
    _C = importlib.import_module("sdkernels._C")
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _reason = f"sdkernels._C could not be loaded: {type(exc).__name__}: {exc}"


def extension_library():
    """The loaded ``sdkernels._C`` module, or None."""
    return _C


def extension_missing() -> Optional[str]:
    """Why the compiled library cannot be used, or None when it can."""
    return _reason


def extension_failed(reason: str) -> None:
    """Mark the loaded library unusable (its Python registrations failed)."""
    global _C, _reason
    _C, _reason = None, reason


def extension_has_cuda() -> bool:
    """True when the loaded library has CUDA kernels (independent of a visible GPU)."""
    if _C is None:
        return False
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(
        "sdkernels::scale_bias_add_relu", "CUDA"))


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks for the Triton interpreter (kernels on CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_triton_import_error: Optional[str] = None
_triton_checked = False


def triton_missing() -> Optional[str]:
    """Why triton cannot be imported, or None (checked once per process)."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401  (a broken install fails here)
        except Exception as e:  # ImportError, or a broken install
            _triton_import_error = f"triton is not importable ({type(e).__name__}: {e})"
        _triton_checked = True
    return _triton_import_error


def triton_unavailable_reason(device_type: Optional[str] = None) -> Optional[str]:
    """Why the Triton kernels cannot run (None when they can).

    ``device_type`` None: anywhere in this process; ``"cuda"``: on CUDA tensors;
    ``"cpu"``: on CPU tensors (only under the Triton interpreter).
    """
    why = triton_missing()
    if why:
        return why
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
