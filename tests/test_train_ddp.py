"""sdkernels.train under torchrun: 2 gloo processes on CPU, DDP with its default settings.

Two short epochs on synthetic data with blocks dropped (no unused-parameter errors);
afterwards every rank holds bit-identical weights (the run all-gathers a SHA-256 of each
rank's state_dict and records them in summary.json), and rank 0's checkpoint is those
weights. Only rank 0 writes files.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import sdkernels
from sdkernels.train.checkpoint import load_checkpoint
from sdkernels.train.dist import _digest

# Subprocesses import the same sdkernels as this process (the installed package in CI,
# the source tree in an editable install), and run outside the repository root so the
# uncompiled source tree cannot shadow an installed package.
PKG_PARENT = str(Path(sdkernels.__file__).resolve().parent.parent)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_identical_weights(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env["PYTHONPATH"] = os.pathsep.join([PKG_PARENT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "sdkernels.train", "--depth", "20", "--synthetic-size", "144",
           "--val-size", "16", "--batch-size", "16", "--epochs", "2", "--seed", "5",
           "--out", str(out), "--log-steps", "--no-progress", "--threads", "1"]
    p = subprocess.run(cmd, cwd=str(Path(__file__).resolve().parent), env=env, capture_output=True, text=True, timeout=150)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "find_unused_parameters" not in log and "Expected to have finished reduction" not in log

    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["finished"]
    assert len(s["replica_digests"]) == 2 and s["replicas_identical"], s["replica_digests"]
    assert "weights identical on all 2 ranks: yes" in p.stdout

    # rank 0's checkpoint holds exactly the weights every rank ended with
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["epoch"] == 2 and ck["rng"]["world_size"] == 2
    model = sdkernels.models.cifar_resnet(20, p_last=0.5)
    model.load_state_dict(ck["model"])
    assert _digest(model) == s["replica_digests"][0]

    # each rank trained on its shard of the global batch: 128 images / 16 -> 8 steps per
    # epoch, 8 images per rank per step; blocks were dropped
    steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 16
    assert any("0" in st["gates"] for st in steps)
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2]
    assert all(r["train_images"] == 128 for r in recs)  # metrics summed over both ranks
    assert all(r["realized_depth"] < 9 for r in recs)
    assert all(0.0 <= r["test_error"] <= 1.0 for r in recs)
    # only rank 0 wrote
    assert sorted(f.name for f in out.iterdir()) == ["checkpoint.pt", "log.jsonl",
                                                     "steps.jsonl", "summary.json"]
