"""One rank of the 2-process DDP test in ``test_distributed.py`` (run as a script).

Usage: python tests/_ddp_worker.py RANK WORLD_SIZE STORE_PORT OUT_FILE

The parent test process owns the TCPStore server (bound to a free port chosen by the
OS, so there is no port race) and launches one of these per rank. Every rank trains
the same CIFAR ResNet-20 under DistributedDataParallel with its defaults (in
particular no ``find_unused_parameters``), on its own shard of a fixed synthetic
batch, and checks on the spot what only it can see (dropped blocks' grads are zeros,
not None). Rank 0 gathers everything the parent compares and saves it to OUT_FILE.
The model, data and optimizer come from ``ddp_setup`` below, which the parent's
single-process reference uses too.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.nn.functional as F

from helpers import ddp_record_final, ddp_record_step

STEPS = 20
PER_RANK = 8
WORLD = 2
IMAGE = 16
INIT_SEED = 1234   # torch global RNG seed for the initial weights
GATE_SEED = 7      # sdkernels gate generator seed (identical on every rank)
DATA_SEED = 99
DTYPE = torch.float64


def ddp_setup(dropped_grads: str = "auto"):
    """Model (float64, identical initial weights wherever it is built) and optimizer."""
    import sdkernels

    torch.manual_seed(INIT_SEED)
    model = sdkernels.models.cifar_resnet(20, p_last=0.5, seed=GATE_SEED,
                                          dropped_grads=dropped_grads).to(DTYPE)
    return model


def make_optimizer(params):
    # Momentum and weight decay: a parameter whose grad is None is skipped by SGD,
    # one whose grad is zero still decays and moves with its momentum (design §2).
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-3)


def full_batch(step: int):
    """The fixed synthetic batch of ``step`` for all ranks together: rank r takes rows
    [r * PER_RANK, (r + 1) * PER_RANK)."""
    g = torch.Generator().manual_seed(DATA_SEED + step)
    x = torch.randn(WORLD * PER_RANK, 3, IMAGE, IMAGE, generator=g, dtype=DTYPE)
    y = torch.randint(0, 10, (WORLD * PER_RANK,), generator=g)
    return x, y


def shard(step: int, rank: int):
    x, y = full_batch(step)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[sl], y[sl]


def blocks_of(model):
    import sdkernels

    return [m for m in model.modules() if isinstance(m, sdkernels.StochasticDepthBlock)]


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                      for p in model.parameters()])


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main(rank: int, world: int, port: int, out_file: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = ddp_setup("auto")
        blocks = blocks_of(model)
        ddp = DDP(model)  # defaults: find_unused_parameters=False, broadcast_buffers=True
        opt = make_optimizer(ddp.parameters())
        record = {"grads": [], "gates": [], "losses": [], "grads_equal_across_ranks": [],
                  "gates_equal_across_ranks": [], "dropped_checked": 0,
                  "dropped_grad_problems": []}
        for step in range(STEPS):
            x, y = shard(step, rank)
            opt.zero_grad(set_to_none=True)  # a grad that exists after backward was made by it
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            gates = [bool(b.last_gate) for b in blocks]
            # dropped_grads="auto" under an initialised process group: a dropped block's
            # branch parameters must hold zero gradients, not None (DDP needs them).
            for i, (b, gate) in enumerate(zip(blocks, gates)):
                if gate:
                    continue
                for name, p in b.named_parameters():
                    record["dropped_checked"] += 1
                    if p.grad is None:
                        record["dropped_grad_problems"].append((step, i, name, "None"))
                    elif torch.count_nonzero(p.grad).item() != 0:
                        record["dropped_grad_problems"].append((step, i, name, "nonzero"))
            ddp_record_step(record, world, flat_grads(model), gates, loss)
            opt.step()
        ddp_record_final(record, world, flat_params(model))
        all_problems = [None] * world
        dist.all_gather_object(all_problems, record["dropped_grad_problems"])
        record["dropped_grad_problems"] = [p for ps in all_problems for p in ps]
        if rank == 0:
            torch.save(record, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # The repository root, so that ``import sdkernels`` finds the working tree.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
