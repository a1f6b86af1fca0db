"""Which backend runs the fused ops, and how to force one.

Backends, in order of preference for the automatic choice:

``extension``  the compiled ops in ``sdkernels._C`` (``torch.ops.sdkernels.*``), CPU
               always, CUDA when the package was built with the CUDA toolkit.
``triton``     Triton implicit-GEMM convolutions with fused prologues/epilogues on CUDA
               (on CPU only under ``TRITON_INTERPRET=1``, for tests), plus the
               extension's ops for backward. Never chosen automatically: it has not been
               measured to win anywhere yet; ask for it with ``use_backend("triton")``.
``reference``  plain PyTorch (``sdkernels.ops.reference``): always available.

The choice is made per device. A forced backend (:func:`use_backend`) that cannot run on
a tensor's device is an error, never a silent switch; the automatic choice falls back
to ``reference`` and warns once, saying why.

On CUDA the automatic choice is ``reference`` (the modules, with real skipping of dropped
blocks) until a GPU run recorded in the repository shows the fused extension path at
least as fast as the module path and every ``gpu`` test passing: the fused CUDA ops have
been compiled, linked and dry-run under fake tensors, but never timed on a GPU
(docs/design.md, "Defaults follow evidence"). ``use_backend("extension")`` or
``use_backend("triton")`` opts in; :func:`backend_info` says why.

Testing seam (:func:`dry_run_cuda`, off by default): the dry run of the CUDA paths on a
machine without a GPU (``sdkernels.bench.dryrun``) runs forward passes on fake CUDA
tensors and whole training steps on ``meta`` tensors, because the autograd engine needs
a real CUDA context for CUDA tensors (pytorch #92627). Inside the seam
:func:`effective_device_type` maps ``meta`` to ``cuda``, so the library picks exactly
the implementations it would pick on a GPU, and a CUDA backend counts as available when
its ops have fake/meta kernels (no kernel runs on fake or meta tensors). It is the one
process-wide switch besides the forced backend; nothing else reads hidden state.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from . import availability

__all__ = ["BACKENDS", "BackendInfo", "backend_info", "use_backend", "resolve_backend",
           "auto_reason", "BackendUnavailableError", "effective_device_type", "dry_run_cuda"]

BACKENDS = ("extension", "triton", "reference")

# The forced backend is process-wide (a plain module global rather than a ContextVar)
# because torch.compile can trace a global read, and guards on it, but graph-breaks on
# ContextVar.get in every block.
_forced: str | None = None
_auto: dict[str, str] = {}  # device type -> automatic choice, decided once

# Device types whose fused paths a recorded GPU run has not yet shown to be at least as
# fast as the module path (with every gpu test passing): the automatic choice there is
# the module path. Remove an entry only together with the recorded run in
# benchmarks/RESULTS.md that justifies it.
_UNMEASURED_FUSED: dict[str, str] = {
    "cuda": ("fused CUDA paths not yet measured on a GPU (no recorded run shows them at "
             "least as fast as the module path); opt in with use_backend('extension') or "
             "use_backend('triton')"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here."""


# Testing seam (module doc): a plain global, like _forced, so that the check costs one
# read per op and torch.compile can guard on it.
_dry_run_cuda = False


def effective_device_type(device: torch.device | str) -> str:
    """The device type whose implementation runs on ``device``.

    Its own type, except inside :func:`dry_run_cuda`, where ``meta`` tensors stand for
    CUDA tensors. Every library check of "is this CUDA?" goes through here.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if _dry_run_cuda and device_type == "meta":
        return "cuda"
    return device_type


@contextlib.contextmanager
def dry_run_cuda():
    """TESTING SEAM: inside, the library treats ``meta`` tensors as CUDA tensors.

    For dry runs on fake CUDA or meta tensors only (``sdkernels.bench.dryrun``): a CUDA
    backend counts as available when its ops have fake/meta kernels, even where the
    extension has no CUDA kernels or no GPU is present, so real CUDA tensors must not
    reach the ops inside. Not for use in training code.
    """
    global _dry_run_cuda
    previous, _dry_run_cuda = _dry_run_cuda, True
    try:
        yield
    finally:
        _dry_run_cuda = previous


def _dry_run_status(name: str) -> tuple[bool, str]:
    """Availability on CUDA inside the seam: the ops' fake/meta kernels are present."""
    if name == "reference":
        return True, ""
    if availability.extension_library() is None:
        return False, f"compiled extension not loaded: {availability.extension_missing()}"
    if name == "triton":
        why = availability.triton_missing()
        if why is not None:
            return False, why
    return True, ""


def _extension_status(device_type: str) -> tuple[bool, str]:
    if availability.extension_library() is None:
        return False, f"compiled extension not loaded: {availability.extension_missing()}"
    if device_type == "cuda" and not availability.extension_has_cuda():
        return False, "compiled extension was built without CUDA kernels"
    if device_type not in ("cpu", "cuda"):
        return False, f"compiled extension has no kernels for device type {device_type!r}"
    return True, ""


def _triton_status(device_type: str) -> tuple[bool, str]:
    # Triton runs the convolutions; backward and the elementwise tails stay on the
    # compiled extension, so both are needed.
    why = availability.triton_unavailable_reason(device_type)
    if why is not None:
        return False, why
    ok, ext_why = _extension_status(device_type)
    if not ok:
        return False, f"the Triton backend also needs the compiled extension ({ext_why})"
    return True, ""


_status_cache: dict[tuple[str, str], tuple[bool, str]] = {}


def _status(name: str, device_type: str) -> tuple[bool, str]:
    """(available, why not) of a backend on a device type; fixed for the process."""
    if _dry_run_cuda and device_type == "cuda":
        return _dry_run_status(name)  # never cached: the seam is temporary
    key = (name, device_type)
    if key not in _status_cache:
        if name == "extension":
            _status_cache[key] = _extension_status(device_type)
        elif name == "triton":
            _status_cache[key] = _triton_status(device_type)
        else:
            _status_cache[key] = (True, "")
    return _status_cache[key]


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown sdkernels backend {name!r}: expected one of {BACKENDS}")


def resolve_backend(device: torch.device | str) -> str:
    """The backend that runs ops on ``device`` now (forced or automatic)."""
    device_type = effective_device_type(device)
    if _forced is not None:
        ok, why = _status(_forced, device_type)
        if not ok:
            raise BackendUnavailableError(
                f"sdkernels backend {_forced!r} cannot run on {device_type}: {why}")
        return _forced
    return _auto_choice(device_type)


# Traced by torch.compile, the first call's lazy fill of _auto would be guarded on ("cpu
# not in _auto") and the frame compiled again on the next call: a wasted entry of
# dynamo's recompile limit in every frame that reaches an op first. The choice is fixed
# for the process, so dynamo may run this at trace time and keep the answer.
@torch.compiler.assume_constant_result
def _auto_choice(device_type: str) -> str:
    choice = _auto.get(device_type)
    if choice is None:
        choice = _auto[device_type] = _choose(device_type)
    return choice


def auto_reason(device_type: str) -> str:
    """Why the automatic choice on ``device_type`` is what it is ("" when nothing to say)."""
    if device_type in _UNMEASURED_FUSED:
        return _UNMEASURED_FUSED[device_type]
    ok, why = _status("extension", device_type)
    return "" if ok else why


def _choose(device_type: str) -> str:
    if device_type in _UNMEASURED_FUSED:
        # A deliberate default, not a fallback: no warning (backend_info says why).
        return "reference"
    for name in ("extension",):
        if _status(name, device_type)[0]:
            return name
    why = _extension_status(device_type)[1]
    warnings.warn(f"sdkernels: using the reference PyTorch ops on {device_type} ({why})",
                  RuntimeWarning, stacklevel=5)  # the caller of implementation()
    return "reference"


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (process-wide, not per thread).

    Raises ``BackendUnavailableError`` at once if the backend cannot run on any device
    here, and when an op meets a tensor on a device the backend does not support.
    """
    _check_name(name)
    # every device's status now, not lazily: compiled code reads them in the forced
    # branch of resolve_backend, and a first fill traced there would be guarded on
    ok_anywhere = any([_status(name, d)[0] for d in ("cpu", "cuda")])
    if not ok_anywhere:
        raise BackendUnavailableError(
            f"sdkernels backend {name!r} is not available: {_status(name, 'cpu')[1]}")
    global _forced
    previous, _forced = _forced, name
    try:
        yield name
    finally:
        _forced = previous


@dataclass
class BackendInfo:
    """What :func:`backend_info` reports; ``str()`` gives a readable summary."""

    active: dict[str, str]
    available: dict[str, dict[str, str | bool]]
    forced: str | None
    versions: dict[str, str] = field(default_factory=dict)
    extension_path: str | None = None
    #: device type -> why the automatic choice there is what it is (cuda always listed)
    reasons: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = ["sdkernels backends"]
        for name, devs in self.available.items():
            parts = []
            for dev in ("cpu", "cuda"):
                why = devs[dev]
                parts.append(f"{dev}: {'yes' if why == '' else 'no (' + why + ')'}")
            lines.append(f"  {name:<10} " + "; ".join(parts))
        lines.append("  runs now: " + ", ".join(f"{d} -> {b}" for d, b in self.active.items())
                     + (f" (forced: {self.forced})" if self.forced else ""))
        for dev, why in self.reasons.items():
            if why:
                lines.append(f"  automatic choice on {dev}: {why}")
        if self.extension_path:
            lines.append(f"  extension: {self.extension_path}")
        lines.append("  note: on extension/triton an active block trains as one fused, "
                     "recomputing function (convolutions via ATen, BN/ReLU/residual via "
                     "sdkernels ops) and evaluates with BN and p_l folded into cached "
                     "convolution weights; the reference backend runs the modules")
        lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
        return "\n".join(lines)


def backend_info() -> BackendInfo:
    """Which backends are available on which device type, and which one runs."""
    available = {}
    for name in BACKENDS:
        available[name] = {d: ("" if ok else why)
                           for d in ("cpu", "cuda") for ok, why in [_status(name, d)]}
    active = {}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for d in devices:
        if _forced is not None:
            ok, why = _status(_forced, d)
            active[d] = _forced if ok else f"error: {_forced} cannot run on {d}: {why}"
        elif d in _auto:
            active[d] = _auto[d]
        else:
            # not cached: the first op on this device must still warn about a fallback
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                active[d] = _choose(d)
    versions = {"torch": torch.__version__}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    reasons = {d: auto_reason(d) for d in ("cpu", "cuda")}
    return BackendInfo(active=active, available=available, forced=_forced,
                       versions=versions, reasons=reasons,
                       extension_path=getattr(availability.extension_library(), "__file__", None))
