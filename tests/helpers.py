"""Helpers shared by the tests: layouts, per-channel broadcasting and error measures (the
compiled-extension op tests), DDP worker runs and records, and the step check of a
compiled model against its eager twin.

tests/ is on sys.path under pytest, so test files import this as ``from helpers import``.
Nothing here touches CUDA at import time.
"""
from __future__ import annotations

import datetime
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

LOW = (torch.float16, torch.bfloat16)


def per_channel(v, ndim):
    """A [C] vector shaped to broadcast over [N, C, ...] with `ndim` dims."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def channels_last_format(t):
    """The channels-last memory format for t's rank (contiguous below 4-D)."""
    if t.dim() == 4:
        return torch.channels_last
    if t.dim() == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def relayout(t, layout, device=None):
    """Same values as t (moved to `device` if given), in another memory layout.

    contiguous; channels_last (4-D/5-D only, other ranks unchanged); sliced (every other
    element of a 2x wider last dim); transposed (first and last dim swapped in memory, not
    dense); misaligned (dense, channels-last for 4-D/5-D, but starting one element into
    its storage, so kernels cannot use 16-byte vector accesses on it).
    """
    if device is not None:
        t = t.to(device)
    if layout == "channels_last":
        return t.contiguous(memory_format=channels_last_format(t)) if t.dim() in (4, 5) else t
    if layout == "sliced":
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "misaligned":
        dense = t.contiguous(memory_format=channels_last_format(t))
        buf = torch.empty(dense.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].as_strided(dense.shape, dense.stride())
        view.copy_(dense)
        return view
    return t.contiguous()  # "contiguous", and any name a test file resolves itself


def memory_format(t):
    """torch's suggested memory format of t (what the ops keep for their outputs)."""
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(t)


def assert_format_like(out, x):
    """out has x's shape and is dense in x's suggested memory format."""
    assert out.shape == x.shape
    assert out.is_contiguous(memory_format=memory_format(x))


def max_err(a, ref):
    """Largest absolute difference, computed in float64 (0 for empty tensors)."""
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def upcast(*ts):
    """The tensors in float64 (None stays None)."""
    return [None if t is None else t.double() for t in ts]


# --- Triton kernel tests (test_triton_block/_conv) ---------------------------------------

#: unit roundoff per dtype
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def rand_on(device):
    """``rand(*shape, dtype, scale, offset)``: normal samples on ``device``."""
    def rand(*shape, dtype=torch.float32, scale=1.0, offset=0.0):
        return (torch.randn(shape) * scale + offset).to(device=device, dtype=dtype)
    return rand


# --- folded residual blocks for the Triton block tests (test_triton_block/_conv) -------

def folded_conv(rand, cin, cout, k, s, dtype=torch.float32):
    """A folded conv stage (weight, bias, stride, padding) with weights of unit gain."""
    w = rand(cout, cin, k, k, scale=(cin * k * k) ** -0.5).to(dtype)
    return (w, rand(cout, scale=0.1), s, k // 2)


def basic_convs(rand, cin, cout, s, dtype):
    return [folded_conv(rand, cin, cout, 3, s, dtype), folded_conv(rand, cout, cout, 3, 1, dtype)]


def bottleneck_convs(rand, cin, planes, s, dtype):
    return [folded_conv(rand, cin, planes, 1, 1, dtype),
            folded_conv(rand, planes, planes, 3, s, dtype),
            folded_conv(rand, planes, 4 * planes, 1, 1, dtype)]


def block_cases(rand):
    """name -> (convs(dtype), shortcut(dtype), input shape) for block_eval."""
    return {
        "basic-identity": (lambda d: basic_convs(rand, 16, 16, 1, d), lambda d: ("identity",),
                           (2, 16, 8, 8)),
        "basic-option_a": (lambda d: basic_convs(rand, 8, 16, 2, d),
                           lambda d: ("option_a", 2, 16), (2, 8, 8, 8)),
        "basic-projection": (lambda d: basic_convs(rand, 8, 16, 2, d),
                             lambda d: ("projection", folded_conv(rand, 8, 16, 1, 2, d)),
                             (2, 8, 7, 7)),
        "bottleneck-identity": (lambda d: bottleneck_convs(rand, 20, 5, 1, d),
                                lambda d: ("identity",), (2, 20, 5, 7)),
        "bottleneck-projection": (lambda d: bottleneck_convs(rand, 16, 5, 2, d),
                                  lambda d: ("projection", folded_conv(rand, 16, 20, 1, 2, d)),
                                  (2, 16, 8, 8)),
    }


def load_worker(path: Path, name: str):
    """A DDP worker script imported as a module (the parent's reference runs use its
    model, data and optimizer builders)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_ddp_workers(worker: Path, world: int, out: Path, timeout: float) -> dict:
    """Launch ``world`` processes of ``worker`` (args: RANK WORLD STORE_PORT OUT_FILE) on
    gloo and return what rank 0 saved to ``out``.

    The TCPStore server lives here, on a port the OS picks (port 0): no free-port race.
    Subprocesses import the same sdkernels as this process (the installed package in CI,
    the source tree in an editable install) and run from tests/, outside the repository
    root, so the uncompiled source tree cannot shadow an installed package.
    """
    import torch.distributed as dist
    import sdkernels

    store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True,
                          wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    env = dict(os.environ)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only; no hostname lookup
    env["OMP_NUM_THREADS"] = "1"
    pkg_parent = str(Path(sdkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # each rank logs to a file of its own: read one after another, pipes could fill up
    # and block a chatty rank while we wait on the other
    log_files = [Path(out).with_name(f"{Path(out).name}.rank{r}.log") for r in range(world)]
    procs = []
    for r, log in enumerate(log_files):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(
                [sys.executable, str(worker), str(r), str(world), str(store.port), str(out)],
                cwd=str(Path(worker).resolve().parent), env=env, stdout=fh,
                stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + timeout
    try:
        for r, p in enumerate(procs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                logs = "\n".join(f"--- rank {i}:\n{f.read_text()[-2000:]}"
                                  for i, f in enumerate(log_files))
                raise AssertionError(f"DDP rank {r} still running after {timeout} s\n"
                                     f"{logs}") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    del store
    for r, (p, log) in enumerate(zip(procs, log_files)):
        assert p.returncode == 0, (f"DDP rank {r} failed (rc={p.returncode}):\n"
                                   f"{log.read_text()[-4000:]}")
    return torch.load(out, weights_only=False)


# -- DDP jobs: what a rank records, and the single-process reference of a 2-rank job ----

def ddp_record_step(rec: dict, world: int, grads: torch.Tensor, gates, loss) -> None:
    """After a rank's step (backward and all-reduce done): whether gradients and gates
    agree across ranks, every rank's loss, and this rank's flat gradient and gates."""
    import torch.distributed as dist
    gathered = [torch.empty_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    rec["grads_equal_across_ranks"].append(all(torch.equal(gathered[0], o)
                                               for o in gathered[1:]))
    all_gates = [None] * world
    dist.all_gather_object(all_gates, gates)
    rec["gates_equal_across_ranks"].append(all(o == all_gates[0] for o in all_gates))
    rec.setdefault("rank_gates", []).append(all_gates)
    losses = [None] * world
    dist.all_gather_object(losses, loss.item())
    rec["grads"].append(grads.clone())
    rec["gates"].append(gates)
    rec["losses"].append(losses)


def ddp_record_final(rec: dict, world: int, params: torch.Tensor) -> None:
    """After the last step: this rank's flat weights, and whether all ranks hold them."""
    import torch.distributed as dist
    gathered = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    rec["final_params"] = params.clone()
    rec["final_params_equal_across_ranks"] = all(torch.equal(gathered[0], o)
                                                 for o in gathered[1:])
    rec["grads"] = torch.stack(rec["grads"])


def average_replica_grads(reps) -> None:
    """The all-reduce of a DDP job, for its single-process reference: replica 0's
    gradients become the mean over the replicas (each of which ran one rank's shard)."""
    with torch.no_grad():
        for ps in zip(*(r.parameters() for r in reps)):
            ps[0].grad = sum(p.grad for p in ps) / len(reps)


def broadcast_replica_params(reps) -> None:
    """After replica 0's optimizer step: every replica holds its weights."""
    with torch.no_grad():
        for ps in zip(*(r.parameters() for r in reps)):
            for p in ps[1:]:
                p.copy_(ps[0])


def gate_key(gate):
    """Hashable form of a gate (bool in batch mode, bool tensor in row mode)."""
    return tuple(gate.tolist()) if isinstance(gate, torch.Tensor) else bool(gate)


def assert_twin_step(step: int, compiled_gates, eager_gates, loss_c, loss_e, model, eager,
                     rtol: float, atol: float) -> tuple:
    """A compiled model and its eager twin after one training step (backward done): the
    same gates, loss and gradients. Returns the step's gate pattern."""
    pattern = tuple(gate_key(g) for g in compiled_gates)
    assert pattern == tuple(gate_key(g) for g in eager_gates), \
        f"step {step}: compiled and eager drew different gates"
    torch.testing.assert_close(loss_c, loss_e, rtol=rtol, atol=atol)
    for (name, pc), pe in zip(model.named_parameters(), eager.parameters()):
        assert (pc.grad is None) == (pe.grad is None), f"step {step}: {name}"
        if pc.grad is not None:
            torch.testing.assert_close(pc.grad, pe.grad, rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step}, grad of {name}: {m}")
    return pattern
