"""One rank of the 2-process DDP test of converted timm models (``test_families_ddp.py``;
run as a script).

Usage: python tests/_ddp_families_worker.py RANK WORLD_SIZE STORE_PORT OUT_FILE

The parent test process owns the TCPStore server (port 0: no port race) and launches one
of these per rank, as ``test_distributed.py`` does for the CIFAR ResNet. Every rank trains,
for each configuration in ``CONFIGS``, a converted timm model (a ViT and a ConvNeXt, in
row and batch mode) under DistributedDataParallel with its defaults (in particular no
``find_unused_parameters``) on its own shard of fixed synthetic batches, and checks on the
spot what only it can see: a residual dropped on its whole shard still gives its branch
parameters a gradient (not None; zeros when it was dropped on every rank, else the other
ranks' average after the all-reduce). Rank 0 gathers everything the parent compares and
saves it to OUT_FILE. Model, data and optimizer come from the functions below, which the
parent's single-process reference uses too.

A last configuration (``NEGATIVE``) trains with ``dropped_grads="none"``: DDP must then
fail with its unused-parameter error, which shows the test above would see a missing
zero gradient.
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.nn.functional as F

from helpers import ddp_record_final, ddp_record_step

STEPS = 6
PER_RANK = 4
WORLD = 2
INIT_SEED = 1234  # torch global RNG seed for the initial weights
GATE_SEED = 5     # sdkernels gate generator seed (identical on every rank)
DATA_SEED = 99
DTYPE = torch.float64

# (model, mode): timm trains with per-sample drop paths ("row"); batch mode drops
# whole residuals
CONFIGS = [("vit", "row"), ("vit", "batch"), ("convnext", "row"), ("convnext", "batch")]
NEGATIVE = ("convnext", "batch")
IMAGE = {"vit": 32, "convnext": 32}


def build(arch: str):
    """The plain timm model (float64, identical initial weights wherever it is built)."""
    import timm

    torch.manual_seed(INIT_SEED)
    if arch == "vit":
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                              depth=4, img_size=IMAGE[arch], drop_path_rate=0.1)
    else:
        m = timm.create_model("convnext_atto", pretrained=False, num_classes=10,
                              drop_path_rate=0.1)
    with torch.no_grad():  # layer scales of 1e-6 (ConvNeXt): make the branches matter
        for n, p in m.named_parameters():
            if n.endswith("gamma"):
                p.fill_(0.5)
    return m.to(DTYPE)


def setup(arch: str, mode: str, dropped_grads: str = "auto"):
    import sdkernels

    model = build(arch)
    sdkernels.convert(model, p_last=0.5, schedule="uniform", mode=mode,
                      scaling="train" if mode == "row" else "test", seed=GATE_SEED,
                      dropped_grads=dropped_grads)
    return model


def make_optimizer(params):
    # Momentum and weight decay: a parameter whose grad is None is skipped by SGD, one
    # whose grad is zero still decays and moves with its momentum.
    return torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=5e-3)


def full_batch(arch: str, step: int):
    g = torch.Generator().manual_seed(DATA_SEED + step)
    n, s = WORLD * PER_RANK, IMAGE[arch]
    return (torch.randn(n, 3, s, s, generator=g, dtype=DTYPE),
            torch.randint(0, 10, (n,), generator=g))


def shard(arch: str, step: int, rank: int):
    x, y = full_batch(arch, step)
    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[sl], y[sl]


def gates_and_params(model):
    """Per residual of ``model`` in forward order: (gate, [(name, parameter) of its
    branch]): a ViT block's attention (norm1, attn, ls1) and MLP (norm2, mlp, ls2); a
    ConvNeXt block's conv_dw, norm, mlp and gamma (its shortcut is the identity)."""
    from sdkernels.convert import gates_of, residual_blocks

    out = []
    for q, b in residual_blocks(model):
        gates = gates_of(b)
        if len(gates) == 2:
            parts = [("norm1", "attn", "ls1"), ("norm2", "mlp", "ls2")]
        else:
            parts = [("conv_dw", "norm", "mlp", "gamma")]
        for g, names in zip(gates, parts):
            params = [(f"{q}.{n}", p) for n, p in b.named_parameters()
                      if n.split(".")[0] in names]
            assert params, (q, names)
            out.append((g, params))
    return out


def gate_value(g):
    """A gate as plain data: a bool (batch) or a tuple of bools (row)."""
    return tuple(g.tolist()) if isinstance(g, torch.Tensor) else bool(g)


def fully_dropped(v) -> bool:
    return not any(v) if isinstance(v, tuple) else not v


def flat_grads(model):
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
                      for p in model.parameters()])


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_config(arch, mode, rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = setup(arch, mode)
    residuals = gates_and_params(model)
    ddp = DDP(model)  # defaults: find_unused_parameters=False, broadcast_buffers=True
    opt = make_optimizer(ddp.parameters())
    rec = {"gates": [], "losses": [], "grads": [], "grads_equal_across_ranks": [],
           "gates_equal_across_ranks": [], "rank_gates": [], "dropped_checked": 0,
           "ran_checked": 0, "problems": [], "none_grads": []}
    for step in range(STEPS):
        x, y = shard(arch, step, rank)
        opt.zero_grad(set_to_none=True)  # a grad that exists after backward was made by it
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        gates = [gate_value(g.last_gate) for g, _ in residuals]
        # row gates are each rank's own rows of one global draw, batch gates the same
        ddp_record_step(rec, world, flat_grads(model), gates, loss)
        all_gates = rec["rank_gates"][-1]
        rec["none_grads"] += [(step, n) for n, p in model.named_parameters() if p.grad is None]
        for i, (v, (_, params)) in enumerate(zip(gates, residuals)):
            everywhere = all(fully_dropped(o[i]) for o in all_gates)
            if fully_dropped(v):
                # dropped_grads="auto" under a process group: a gradient, not None; zeros
                # when no rank ran the branch (else the other ranks' average)
                for name, p in params:
                    rec["dropped_checked"] += 1
                    if p.grad is None:
                        rec["problems"].append((step, i, name, "None"))
                    elif everywhere and torch.count_nonzero(p.grad).item() != 0:
                        rec["problems"].append((step, i, name, "nonzero"))
            else:
                rec["ran_checked"] += 1
                if not any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params):
                    rec["problems"].append((step, i, "*", "a residual that ran has no gradient"))
        opt.step()
    ddp_record_final(rec, world, flat_params(model))
    for key in ("problems", "none_grads"):
        everyone = [None] * world
        dist.all_gather_object(everyone, rec[key])
        rec[key] = [(r,) + tuple(p) for r, ps in enumerate(everyone) for p in ps]
    return rec


def negative_control(arch, mode, rank):
    """dropped_grads="none" under DDP's defaults: the step after a dropped residual must
    fail with DDP's unused-parameter error. Returns what happened."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = setup(arch, mode, dropped_grads="none")
    residuals = gates_and_params(model)
    ddp = DDP(model)
    opt = make_optimizer(ddp.parameters())
    for step in range(STEPS):
        x, y = shard(arch, step, rank)
        opt.zero_grad(set_to_none=True)
        try:
            loss = F.cross_entropy(ddp(x), y)
        except RuntimeError as e:
            return {"error": str(e), "step": step}
        loss.backward()
        if any(fully_dropped(gate_value(g.last_gate)) for g, _ in residuals):
            continue
        opt.step()
    return {"error": None, "step": STEPS}


def main(rank: int, world: int, port: int, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        record = {}
        for arch, mode in CONFIGS:
            record[(arch, mode)] = train_config(arch, mode, rank, world)
            dist.barrier()
        record["negative"] = negative_control(*NEGATIVE, rank)
        if rank == 0:
            torch.save(record, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # The repository root, so that ``import sdkernels`` finds the working tree.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
