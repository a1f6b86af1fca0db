"""Helpers shared by the benchmark files (device, backends, extra_info)."""
from __future__ import annotations

import contextlib

import torch

import sdkernels
from sdkernels.backends import BACKENDS, _status
from sdkernels.bench import environment


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends_for(dev: torch.device) -> list[str]:
    """The sdkernels backends that can run on ``dev`` (others are skipped, not failed)."""
    return [b for b in BACKENDS if _status(b, dev.type)[0]]


def backend_or_skip(pytest, name: str, dev: torch.device):
    ok, why = _status(name, dev.type)
    if not ok:
        pytest.skip(f"backend {name} cannot run on {dev.type}: {why}")
    return sdkernels.use_backend(name)


def maybe_backend(name: str | None):
    return sdkernels.use_backend(name) if name and name != "auto" else contextlib.nullcontext()


def extra_info(dev: torch.device, **kw) -> dict:
    env = environment(dev)
    info = {"device": env["device_name"], "torch": env["torch"], "triton": env["triton"],
            "python": env["python"], "threads": env["torch_threads"],
            "allocator_env": env["allocator_env"]}
    info.update(kw)
    return info
