"""Memory of a training step: bytes saved for backward (any device), peak CUDA memory.

Bytes saved for backward are counted over *unique storages* seen by
``torch.autograd.graph.saved_tensors_hooks`` while the forward runs: a tensor saved by
several autograd nodes (or a view of one) counts once. Parameters are reported apart
(``param_bytes``): they are saved by every convolution but are not activation memory.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["saved_bytes", "training_step_memory"]


def saved_bytes(fn: Callable, *args, exclude=()) -> tuple[dict, object]:
    """Run ``fn(*args)`` and count what autograd saves for backward.

    Returns ({"saved_bytes", "num_storages"}, fn's result); storages of tensors in
    ``exclude`` (e.g. the parameters) are left out.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[tuple, int] = {}

    def pack(t):
        st = t.untyped_storage()
        key = (t.device, st.data_ptr())
        if st.data_ptr() not in excluded and st.data_ptr() != 0:
            seen[key] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return {"saved_bytes": sum(seen.values()), "num_storages": len(seen)}, out


def training_step_memory(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Bytes saved for backward by one forward + loss of ``model`` (then backward runs
    and frees them), and the CUDA peak of the whole step when on CUDA."""
    params = list(model.parameters())
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
    model.zero_grad(set_to_none=True)
    counts, loss = saved_bytes(lambda: F.cross_entropy(model(x), y), exclude=params)
    loss.backward()
    out = dict(counts)
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in params)
    if cuda:
        torch.cuda.synchronize(x.device)
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(x.device) - base
    return out
