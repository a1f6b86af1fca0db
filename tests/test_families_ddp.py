"""Converted timm models train under torch.distributed DDP with its defaults (issue 15).

A 2-process gloo job on CPU (``_ddp_families_worker.py``) trains a converted ViT
(vit_tiny, 4 blocks, 32 px) and a converted ConvNeXt (convnext_atto) in row mode (per
sample, as timm's drop path) and batch mode, with DDP's defaults (no
``find_unused_parameters``), for several steps in which residuals are dropped. It shows:
no DDP error about unused parameters (a residual dropped on a whole shard ties zero
gradients to its branch parameters); gradients and weights identical on both ranks after
the all-reduce; batch gates identical on both ranks, row gates each rank's own rows of
one draw; the parameters of residuals dropped on every rank hold zero gradients, not
None; and every step equals a single-process reference on the same data and gates. With
``dropped_grads="none"`` the same job fails with DDP's error: the test sees a missing
gradient.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("timm")

import sdkernels  # noqa: E402
from sdkernels.gates import generators_of  # noqa: E402

from helpers import (average_replica_grads, broadcast_replica_params, load_worker,  # noqa: E402
                     run_ddp_workers)

WORKER = Path(__file__).resolve().parent / "_ddp_families_worker.py"
W = load_worker(WORKER, "_sdk_ddp_families_worker")

pytestmark = [pytest.mark.thirdparty,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

CONFIGS = [pytest.param(c, id=f"{c[0]}-{c[1]}") for c in W.CONFIGS]


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    """Launch WORLD worker processes once for all configurations; what rank 0 saved."""
    out = tmp_path_factory.mktemp("ddp_families") / "record.pt"
    return run_ddp_workers(WORKER, W.WORLD, out, timeout=240)


def _reference_run(arch, mode):
    """Single-process reproduction of the 2-rank DDP job (as in test_distributed.py):
    two replicas built identically, each with its gate generator seeded like the ranks'
    and set to rank r's shard (so each draws the gates rank r draws), replica r forwards
    shard r; gradients are
    averaged into replica 0, which steps; its weights are copied into replica 1. The
    replicas use dropped_grads="zeros" (no process group here: "auto" would give None,
    and SGD would skip the dropped parameters' weight decay and momentum)."""
    reps = [W.setup(arch, mode, dropped_grads="zeros") for _ in range(W.WORLD)]
    for r, m in enumerate(reps):
        for gen in generators_of(m):
            gen.shard = (r, W.WORLD)
    opt = W.make_optimizer(reps[0].parameters())
    residuals = [W.gates_and_params(m) for m in reps]
    grads, gates, rank_gates, losses = [], [], [], []
    for step in range(W.STEPS):
        for m in reps:
            m.zero_grad(set_to_none=True)
        step_losses = []
        for r, m in enumerate(reps):
            x, y = W.shard(arch, step, r)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            step_losses.append(loss.item())
        each = [[W.gate_value(g.last_gate) for g, _ in res] for res in residuals]
        g0 = each[0]
        rank_gates.append(each)
        average_replica_grads(reps)
        grads.append(W.flat_grads(reps[0]))
        gates.append(g0)
        losses.append(step_losses)
        opt.step()
        broadcast_replica_params(reps)
    return {"grads": torch.stack(grads), "gates": gates, "rank_gates": rank_gates,
            "losses": losses,
            "final_params": W.flat_params(reps[0])}


@pytest.mark.parametrize("config", CONFIGS)
def test_ddp_trains_with_dropped_residuals(record, config):
    arch, mode = config
    rec = record[config]
    assert len(rec["gates"]) == W.STEPS
    # residuals were dropped on a whole shard (their branch did not run; DDP trained
    # through that without find_unused_parameters), and others ran
    dropped = sum(W.fully_dropped(v) for gates in rec["gates"] for v in gates)
    assert dropped > 0, f"no residual was dropped in {W.STEPS} steps: the test proves nothing"
    assert rec["ran_checked"] > 0
    if mode == "row":
        # per-sample gates: some residuals ran on part of the shard
        assert any(isinstance(v, tuple) and 0 < sum(v) < W.PER_RANK
                   for gates in rec["gates"] for v in gates)
    # every parameter had a gradient on every rank; a dropped residual's are zeros
    assert rec["none_grads"] == []
    assert rec["dropped_checked"] > 0
    assert rec["problems"] == []
    # batch mode: the same gates on both ranks; row mode: each rank's own rows of the
    # step's draw (ranks train different samples)
    if mode == "batch":
        assert all(rec["gates_equal_across_ranks"])
    else:
        assert not all(rec["gates_equal_across_ranks"])
    # the same gradients (after the all-reduce) and final weights on both ranks
    assert all(rec["grads_equal_across_ranks"]), rec["grads_equal_across_ranks"]
    assert rec["final_params_equal_across_ranks"]


@pytest.mark.parametrize("config", CONFIGS)
def test_ddp_matches_single_process_reference(record, config):
    rec = record[config]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers; also faster on 2 busy cores
    try:
        ref = _reference_run(*config)
    finally:
        torch.set_num_threads(threads)
    assert ref["gates"] == rec["gates"] and ref["rank_gates"] == rec["rank_gates"]
    for step in range(W.STEPS):
        assert ref["losses"][step] == pytest.approx(rec["losses"][step], rel=1e-10, abs=1e-12)
        torch.testing.assert_close(rec["grads"][step], ref["grads"][step], rtol=1e-9,
                                   atol=1e-12, msg=lambda m: f"step {step}: {m}")
    torch.testing.assert_close(rec["final_params"], ref["final_params"], rtol=1e-9, atol=1e-12)
    # training moved the weights
    assert not torch.equal(rec["final_params"], W.flat_params(W.setup(*config)))


def test_ddp_without_zero_grads_fails(record):
    """Negative control: with dropped_grads="none" a dropped residual's parameters get no
    gradient, and DDP's defaults refuse the next step (what the tests above rule out)."""
    neg = record["negative"]
    assert neg["error"] is not None, "DDP trained through dropped residuals without zero grads"
    assert "parameters that were not used in producing loss" in neg["error"]
    assert 0 < neg["step"] < W.STEPS
