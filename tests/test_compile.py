"""torch.compile of stochastic-depth models (design §2: gates drawn on the host).

The gate draws (``GateGenerator.batch``/``rows``) are ``torch.compiler.disable``d, so a
compiled model graph-breaks at each draw and the gate becomes a guarded Python value
(batch mode) or a graph input (row mode). These tests check that the gates therefore
keep changing from step to step (they are not frozen at trace time), that training
matches an eager twin step by step, and that the number of compilations stays bounded
and stops growing once every gate value has been seen.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sdkernels
from helpers import assert_twin_step
from sdkernels.models.resnet import resnet18

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

pytestmark = [pytest.mark.skipif(not hasattr(torch, "compile"), reason="needs torch.compile"),
              pytest.mark.usefixtures("fresh_dynamo")]


def _graphs() -> int:
    """Distinct FX graphs Dynamo has compiled since the last reset."""
    return counters["stats"]["unique_graphs"]


def _frames() -> int:
    """Frame compilations (first compiles and recompiles) since the last reset."""
    return counters["frames"]["total"]


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, sdkernels.StochasticDepthBlock)]


def _batch(step: int, n: int, size: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


class _Twins:
    """A model compiled with ``backend`` and an eager deep copy (same initial weights,
    same gate generator state), each with its own identical SGD optimizer."""

    def __init__(self, model, backend, rtol, atol):
        self.eager = copy.deepcopy(model)  # GateGenerator deep-copies its state
        assert sdkernels.gate_state(self.eager)[0]["state"].equal(
            sdkernels.gate_state(model)[0]["state"])
        self.model = model
        self.compiled = torch.compile(model, backend=backend)
        self.opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
                     for m in (model, self.eager)]
        self.rtol, self.atol = rtol, atol
        self.patterns = []

    def step(self, step: int, n: int, size: int):
        """One training step of both twins; asserts they agree. Returns the gate pattern."""
        x, y = _batch(step, n, size)
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss_c = F.cross_entropy(self.compiled(x), y)
        loss_c.backward()
        # Compiled blocks take the module path (Inductor fuses it); the eager twin runs
        # the same path so the two compare the same arithmetic.
        with sdkernels.use_backend("reference"):
            loss_e = F.cross_entropy(self.eager(x), y)
        loss_e.backward()
        pattern = assert_twin_step(
            step, [b.last_gate for b in _blocks(self.model)],
            [b.last_gate for b in _blocks(self.eager)], loss_c, loss_e, self.model,
            self.eager, self.rtol, self.atol)
        for opt in self.opts:
            opt.step()
        self.patterns.append(pattern)
        return pattern

    def assert_same_state(self):
        """Weights and BN running statistics (mutated inside the compiled graphs) agree."""
        for (name, a), b in zip(self.model.state_dict().items(), self.eager.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=self.rtol, atol=self.atol,
                                       msg=lambda m: f"{name}: {m}")

    def assert_eval_matches(self, n: int, size: int):
        self.compiled.eval()
        self.eager.eval()
        x, _ = _batch(10_000, n, size)
        with torch.no_grad():
            out_c = self.compiled(x)
            with sdkernels.use_backend("reference"):
                out_e = self.eager(x)
        torch.testing.assert_close(out_c, out_e, rtol=self.rtol, atol=self.atol)
        # eval is deterministic: a second call gives the same output
        with torch.no_grad():
            torch.testing.assert_close(self.compiled(x), out_c, rtol=0, atol=0)


def test_compiled_converted_resnet18_batch_mode_aot_eager():
    torch.manual_seed(0)
    model = sdkernels.convert(resnet18(num_classes=10), p_last=0.5, schedule="uniform",
                              seed=3)
    n_blocks = len(_blocks(model))
    assert n_blocks == 8
    t = _Twins(model, "aot_eager", rtol=1e-5, atol=1e-6)

    # Phase 1: train until every block has run and been dropped at least once (every
    # gate value of every block, hence every stage shape on both paths, has been seen),
    # and for at least 6 steps.
    seen, step = set(), 0
    while step < 6 or len(seen) < 2 * n_blocks:
        assert step < 30, f"gates did not cover both values of every block: {sorted(seen)}"
        seen.update(enumerate(t.step(step, 8, 32)))
        step += 1
    graphs_warm, frames_warm = _graphs(), _frames()
    assert graphs_warm > 0

    # Phase 2: 6 more steps, with Dynamo told to raise on any recompilation. Nothing new
    # is compiled although the gate pattern keeps changing.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            t.step(step, 8, 32)
            step += 1
    assert _graphs() == graphs_warm, "a new graph was compiled after all gate values were seen"
    assert _frames() == frames_warm

    # Gates change from step to step (not frozen at trace time), also after warm-up.
    assert len(set(t.patterns)) >= step // 2, t.patterns
    assert len(set(t.patterns[-6:])) > 1
    # Both gate values occurred in the compiled model (some blocks really dropped).
    assert any(not g for p in t.patterns for g in p) and any(g for p in t.patterns for g in p)
    # Bounded compilation: a graph break at each gate draw, graphs specialised on the gate
    # value and on the stage (observed with torch 2.13: 15 graphs and 32 frame compiles
    # for ResNet-18, at the frame bound: one more graph break per block would show here).
    assert graphs_warm <= 3 * n_blocks, graphs_warm
    assert frames_warm <= 4 * n_blocks, frames_warm
    t.assert_same_state()


def test_first_compiled_call_is_not_compiled_again_for_the_backend_choice(monkeypatch):
    """The automatic backend is chosen lazily, once per process. A compiled frame that
    reaches an op before anything else did must not guard on that first choice (it
    would be compiled again on its next call: a wasted entry of the recompile limit)."""
    from sdkernels import backends
    from sdkernels.ops.dispatch import batch_norm_add_relu
    monkeypatch.setattr(backends, "_auto", {})  # as in a fresh process

    def tail(y, r, w, b):
        return batch_norm_add_relu(y, r, w, b, None, None, training=True, momentum=0.1,
                                   eps=1e-5)

    compiled = torch.compile(tail, backend="aot_eager")
    y, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            torch.testing.assert_close(compiled(y, r, w, b), tail(y, r, w, b))
    assert _frames() == 1
    assert "cpu" in backends._auto  # chosen, and kept for the process


def test_compiled_eval_matches_eager_eval():
    torch.manual_seed(1)
    model = sdkernels.models.cifar_resnet(20, p_last=0.5, seed=11)
    t = _Twins(model, "aot_eager", rtol=1e-5, atol=1e-6)
    for step in range(3):  # non-trivial BN running statistics, updated by compiled code
        t.step(step, 8, 16)
    t.assert_same_state()
    t.assert_eval_matches(8, 16)
    # eval uses all blocks scaled by p_l: no gate is drawn
    assert all(b.last_gate == t.patterns[-1][i] for i, b in enumerate(_blocks(model)))


def test_compiled_row_mode_trains_and_gates_vary():
    torch.manual_seed(2)
    model = sdkernels.models.cifar_resnet(20, p_last=0.5, schedule="uniform", mode="row",
                                          seed=5)
    n_blocks = len(_blocks(model))
    t = _Twins(model, "aot_eager", rtol=1e-5, atol=1e-6)
    steps = 8
    for step in range(steps):
        t.step(step, 8, 16)
    # row gates: one bool per sample and block; they vary between steps and blocks
    assert len(set(t.patterns)) == steps
    survivors = {sum(rows) for p in t.patterns for rows in p}
    assert len(survivors) >= 3, survivors  # variable-size survivor batches were compiled
    assert any(0 < s < 8 for s in survivors)
    assert _graphs() <= 3 * n_blocks, _graphs()  # observed: 17 graphs, 23 frame compiles
    t.assert_same_state()
    t.assert_eval_matches(8, 16)


# inductor on a busy 2-core CPU: 83-103 s with a cold compile cache, ~10 s with a warm one
@pytest.mark.slow
def test_compiled_inductor_default_backend():
    torch.manual_seed(3)
    model = sdkernels.models.cifar_resnet(8, p_last=0.5, schedule="uniform", seed=8)
    n_blocks = len(_blocks(model))
    t = _Twins(model, "inductor", rtol=1e-4, atol=1e-5)
    for step in range(8):
        t.step(step, 8, 16)
    assert len(set(t.patterns)) > 1
    assert _graphs() <= 4 * n_blocks, _graphs()  # observed: 11 graphs
    t.assert_same_state()
    t.assert_eval_matches(8, 16)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_a_dropped_identity_residual_keeps_its_frame_compiled(mode):
    """A dropped residual with the identity shortcut and no activation returns its input:
    the code after the draw would trace no op, and Dynamo skips such a frame for good
    (it then runs eagerly, and every function it calls is compiled as a frame of its
    own, once per block shape: the entries that pushed a ConvNeXt past the recompile
    limit). The dropped path keeps one op (a view of the input) in the compiled code."""
    from sdkernels.gates import FixedGates
    torch.manual_seed(0)
    block = sdkernels.StochasticDepth(torch.nn.Linear(4, 4), survival_prob=0.5, mode=mode,
                                      scaling="train", gate_generator=FixedGates(False))
    compiled = torch.compile(block, backend="aot_eager")
    x = torch.randn(3, 4, requires_grad=True)
    out = compiled(x)
    assert torch.equal(out, x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    block.gate_generator = FixedGates(True)
    torch.testing.assert_close(compiled(x), x + 2 * block.branch(x))
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    names = {m.co_name for m in torch._dynamo.utils.get_compilation_metrics()}
    assert not names & {"gated", "_active", "_dropped", "_active_rows"}, names
