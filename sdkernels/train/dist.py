"""torch.distributed for the training CLI: set up from torchrun's environment variables.

``torchrun --nproc-per-node N [--nnodes M ...] -m sdkernels.train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; with a world size
above 1 the process group is initialised from them (``env://``) with NCCL on CUDA and
gloo on CPU. Without them (or with a world size of 1) the run is a single process and
every helper here is a no-op.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "setup", "cleanup", "all_reduce_sum", "gather_objects", "barrier",
           "broadcast_object", "replica_digests"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def setup(device: str = "auto") -> DistEnv:
    """Read torchrun's variables, pick the device, initialise the process group if needed.

    ``device``: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N". Under
    torchrun with CUDA every process takes ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here")
        if world > 1 and dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev)
    if world > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            kw = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend=backend, init_method="env://", **kw)
        env.backend = backend
    return env


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Sum a list of numbers over ranks (float64)."""
    if not env.distributed:
        return [float(v) for v in values]
    dev = env.device if env.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.cpu().tolist()


def gather_objects(env: DistEnv, obj) -> list:
    """Every rank's ``obj`` on every rank, in rank order."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def replica_digests(env: DistEnv, model: torch.nn.Module) -> list[str]:
    """SHA-256 of every rank's state_dict (parameters and buffers, bit for bit)."""
    return gather_objects(env, _digest(model))
