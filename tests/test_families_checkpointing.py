"""Activation checkpointing of converted timm models (issue 15; design §2: a recomputation
gets the gates of the forward it replays).

A converted ViT (vit_tiny, 4 blocks) and ConvNeXt (convnext_atto) train for 3 SGD steps
in float64 at p_L = 0.5, as two deep copies with the same weights and gate generator
state, one of them with timm's ``set_grad_checkpointing(True)`` (reentrant and not): the
gates, losses and gradients must be the same at every step. The checkpointed copy really
recomputes (each branch that ran in the forward runs again in the backward), and
residuals are dropped, so a recomputation that drew new gates would give other
gradients.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("timm")

import _families_models as fm  # noqa: E402
import sdkernels  # noqa: E402
from sdkernels.convert import gates_of, residual_blocks  # noqa: E402
from sdkernels.gates import gate_record  # noqa: E402

pytestmark = [pytest.mark.thirdparty, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(params=[False, True], ids=["non_reentrant", "reentrant"])
def reentrant(request):
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    before = use_reentrant_ckpt()
    set_reentrant_ckpt(request.param)
    yield request.param
    set_reentrant_ckpt(before)


def _build(arch, mode):
    m = fm.small_timm(arch)
    return sdkernels.convert(m, p_last=0.5, schedule="uniform", mode=mode, seed=2)


def _branch_calls(model):
    """Per residual, how often a module inside its branch started to run (attention / MLP
    of a ViT block, the depthwise conv of a ConvNeXt block). Pre-hooks: a non-reentrant
    recomputation stops early, once the last tensor the backward needs is recomputed,
    possibly inside the module, before its forward hook would fire."""
    calls = []
    for _, b in residual_blocks(model):
        names = ("attn", "mlp") if len(gates_of(b)) == 2 else ("conv_dw",)
        for n in names:
            c = [0]
            b.get_submodule(n).register_forward_pre_hook(
                lambda m, a, c=c: c.__setitem__(0, c[0] + 1))
            calls.append(c)
    return calls


def _ran(g) -> bool:
    return bool(g) if isinstance(g, bool) else bool(g.any())


def _train(model, steps=3, batch=4):
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    calls = _branch_calls(model)
    out = []
    model.train()
    for _ in range(steps):
        for c in calls:
            c[0] = 0
        opt.zero_grad(set_to_none=True)
        x = torch.randn(batch, 3, 32, 32, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (batch,), generator=g)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        gates = [g if isinstance(g, bool) else g.clone() for g in gate_record(model)]
        out.append((loss.item(), grads, gates, [c[0] for c in calls]))
        opt.step()
    return out


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("arch", ["vit", "convnext"])
def test_set_grad_checkpointing_same_gradients(arch, mode, reentrant):
    plain = _build(arch, mode)
    ckpt = copy.deepcopy(plain)  # the same weights and gate generator state
    ckpt.set_grad_checkpointing(True)
    a, b = _train(plain), _train(ckpt)
    dropped = 0
    for step, ((la, ga, gates_a, calls_a), (lb, gb, gates_b, calls_b)) in enumerate(zip(a, b)):
        assert len(gates_a) == len(gates_b) == len(calls_a) and gates_a
        for x, y in zip(gates_a, gates_b):
            assert (x == y) if isinstance(x, bool) else torch.equal(x, y)
        dropped += sum((not g) if isinstance(g, bool) else int((~g).sum()) for g in gates_a)
        # without checkpointing each branch that ran ran once; with it, once more in the
        # backward (the recomputation), and a dropped one not at all
        assert calls_a == [int(_ran(g)) for g in gates_a], f"step {step}"
        assert calls_b == [2 * int(_ran(g)) for g in gates_a], f"step {step}"
        assert la == pytest.approx(lb, rel=1e-12)
        assert ga.keys() == gb.keys(), f"step {step}: different parameters got gradients"
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"step {step}, {name}: {m}")
    assert dropped > 0, "no residual was dropped: the test would not see wrong gates"
