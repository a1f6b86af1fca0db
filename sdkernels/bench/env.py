"""What every recorded result carries: device, versions, backend (design §7)."""
from __future__ import annotations

import os
import platform
import sys

import torch

from ..backends import backend_info

__all__ = ["environment", "device_name"]


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {name}"


def environment(device) -> dict:
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = backend_info()
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "backend": info.active.get(device.type, "?"),
        "backend_info": str(info),
        # glibc settings that decide whether freed memory is handed back to the OS (and
        # page-faulted in again on the next step): CPU timings depend on them.
        "allocator_env": {k: v for k, v in os.environ.items()
                          if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")},
    }
