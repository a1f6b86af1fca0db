"""Stochastic depth under torch.distributed DDP (design §2, "Distributed").

A 2-process gloo job on CPU trains a CIFAR ResNet-20 with DDP's defaults (no
``find_unused_parameters``) for 20 steps with dropped blocks; gradients must agree
across ranks and with a single-process reference on the same data and gates.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import sdkernels
from sdkernels.gates import FixedGates

from helpers import average_replica_grads, broadcast_replica_params, load_worker, run_ddp_workers

WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"
W = load_worker(WORKER, "_sdk_ddp_worker")

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _run_ddp_job(tmp_path) -> dict:
    """Launch WORLD worker processes; return what rank 0 saved."""
    return run_ddp_workers(WORKER, W.WORLD, tmp_path / "ddp_record.pt", timeout=150)


def _reference_run():
    """Single-process reproduction of the 2-rank DDP job, exact up to rounding.

    Under DDP, rank r computes the gradient of the mean loss over ITS shard, with
    BatchNorm normalising by the statistics of its own 8 samples, and DDP replaces every
    gradient by the average over ranks: g = (g_0 + g_1) / 2. Both ranks draw the same
    gates, because each rank's model owns a gate generator seeded with GATE_SEED and
    draws one gate per block per forward. One model forwarding the full batch of 16
    would normalise with 16-sample statistics, and forwarding the two shards through
    one model in turn would draw a second, different set of gates for the second shard.
    So the reference keeps two replicas R_0 and R_1:

    * built identically (same initial weights, each with its own gate generator seeded
      with GATE_SEED), so each draws exactly the gate sequence the DDP ranks draw;
    * each step R_r forwards shard r and back-propagates its own loss, and the
      gradients are averaged, (g_R0 + g_R1) / 2, into R_0's .grad;
    * the optimizer (the DDP job's SGD with momentum and weight decay) steps R_0, and
      R_0's weights are copied into R_1, so both replicas always hold the weights the
      DDP ranks hold.

    The replicas use dropped_grads="zeros": no process group exists here, so "auto"
    would leave None on dropped blocks, SGD would then skip their weight decay and
    momentum, and the run would diverge from DDP, where "auto" gives zeros.
    """
    reps = [W.ddp_setup("zeros") for _ in range(W.WORLD)]
    for a, b in zip(reps[0].parameters(), reps[1].parameters()):
        assert torch.equal(a, b)
    opt = W.make_optimizer(reps[0].parameters())
    blocks = [W.blocks_of(m) for m in reps]
    grads, gates, losses = [], [], []
    for step in range(W.STEPS):
        for m in reps:
            m.zero_grad(set_to_none=True)
        step_losses = []
        for r, m in enumerate(reps):
            x, y = W.shard(step, r)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            step_losses.append(loss.item())
        g0 = [bool(b.last_gate) for b in blocks[0]]
        assert g0 == [bool(b.last_gate) for b in blocks[1]]
        average_replica_grads(reps)
        grads.append(W.flat_grads(reps[0]))
        gates.append(g0)
        losses.append(step_losses)
        opt.step()
        broadcast_replica_params(reps)
    return {"grads": torch.stack(grads), "gates": gates, "losses": losses,
            "final_params": W.flat_params(reps[0])}


def test_ddp_two_ranks_matches_single_process(tmp_path):
    rec = _run_ddp_job(tmp_path)
    n_blocks = len(rec["gates"][0])
    assert len(rec["gates"]) == W.STEPS and n_blocks == 9

    # Dropped blocks really occurred, and DDP (no find_unused_parameters) trained through
    # them: the job got here without a reducer error.
    dropped = sum(not g for gates in rec["gates"] for g in gates)
    assert dropped > 0, "no block was dropped in 20 steps: the test proves nothing"
    assert all(any(gates) for gates in rec["gates"])
    # dropped_grads="auto" under DDP gave every branch parameter of every dropped block
    # a zero gradient, not None, on every rank.
    assert rec["dropped_checked"] > 0
    assert rec["dropped_grad_problems"] == []

    # (a) identical gradients on both ranks every step (after DDP's all-reduce), and the
    # same gates on both ranks.
    assert all(rec["gates_equal_across_ranks"])
    assert all(rec["grads_equal_across_ranks"]), rec["grads_equal_across_ranks"]
    # (b) identical final weights on both ranks.
    assert rec["final_params_equal_across_ranks"]

    # (c) the single-process reference on the same data and gates.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers; also much faster on 2 busy cores
    try:
        ref = _reference_run()
    finally:
        torch.set_num_threads(threads)
    assert ref["gates"] == rec["gates"]
    for step in range(W.STEPS):
        assert ref["losses"][step] == pytest.approx(rec["losses"][step], rel=1e-10, abs=1e-12)
        torch.testing.assert_close(rec["grads"][step], ref["grads"][step], rtol=1e-9,
                                   atol=1e-12, msg=lambda m: f"step {step}: {m}")
    torch.testing.assert_close(rec["final_params"], ref["final_params"], rtol=1e-9, atol=1e-12)
    # Training moved the weights (the comparison is not of untouched initial weights).
    assert not torch.equal(rec["final_params"], W.flat_params(W.ddp_setup("zeros")))


# -- outside DDP: the user chooses zeros or None -----------------------------------------

def _one_step_with_dropped_block(dropped_grads: str):
    torch.manual_seed(0)
    model = sdkernels.models.cifar_resnet(20, p_last=1.0, seed=0, dropped_grads=dropped_grads)
    blocks = W.blocks_of(model)
    dropped = {1, 3}  # an identity-shortcut block and an option-A downsampling block
    for i in dropped:
        blocks[i].gate_generator = FixedGates(False)
    x = torch.randn(4, 3, 16, 16)
    y = torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    assert [bool(b.last_gate) for b in blocks] == [i not in dropped for i in range(len(blocks))]
    return blocks, dropped


@pytest.mark.parametrize("dropped_grads", ["none", "auto"])
def test_dropped_grads_none_outside_ddp(dropped_grads):
    assert not (dist.is_available() and dist.is_initialized())
    blocks, dropped = _one_step_with_dropped_block(dropped_grads)
    for i, b in enumerate(blocks):
        for name, p in b.named_parameters():
            if i in dropped:
                assert p.grad is None, f"block {i} {name}"
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"block {i} {name}"


def test_dropped_grads_zeros_outside_ddp():
    blocks, dropped = _one_step_with_dropped_block("zeros")
    for i, b in enumerate(blocks):
        for name, p in b.named_parameters():
            assert p.grad is not None, f"block {i} {name}"
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype
            if i in dropped:
                assert torch.count_nonzero(p.grad) == 0, f"block {i} {name}"
            else:
                assert p.grad.abs().sum() > 0, f"block {i} {name}"
