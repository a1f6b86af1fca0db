"""Activation checkpointing sees the gates of the forward it recomputes (design §2).

Each case trains a converted network for 3 SGD steps in float64 from the same weights and
seed, with and without checkpointing, and requires the same gradients at every step (and
some blocks dropped, so the gates matter). torchvision / timm cases use the real packages
and skip where they are not installed (CI runs them in its CUDA-torch environment).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import sdkernels
from sdkernels.gates import gate_record


class _CheckpointEach(nn.Sequential):
    """A stage (Sequential of blocks) whose blocks each run under torch.utils.checkpoint
    (still indexable, as the models' own code expects)."""

    def __init__(self, seq: nn.Sequential, reentrant: bool):
        super().__init__(*seq)
        self.reentrant = reentrant

    def forward(self, x):
        for block in self:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return x


class _CheckpointSequential(nn.Sequential):
    def __init__(self, seq: nn.Sequential, segments: int):
        super().__init__(*seq)
        self.segments = segments

    def forward(self, x):
        return checkpoint_sequential(list(self), self.segments, x, use_reentrant=False)


def _wrap_layers(model, names, wrap):
    for n in names:
        setattr(model, n, wrap(getattr(model, n)))
    return model


def _train(model, steps=3, batch=4, size=32, classes=10, seed=0, views=1):
    """Per step: the gradients of every parameter (by name) and the gate record.
    ``views`` forwards (as two views through one encoder) before one backward."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    out = []
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = 0
        for v in range(views):
            x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
            y = torch.randint(0, classes, (batch,), generator=g)
            # inputs that need grad make reentrant checkpointing keep its graph
            loss = loss + (v + 1) * nn.functional.cross_entropy(model(x.requires_grad_()), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((grads, [g if isinstance(g, bool) else g.clone() for g in gate_record(model)]))
        opt.step()
    return out


def _same_training(plain, ckpt, **kw):
    a, b = _train(plain, **kw), _train(ckpt, **kw)
    dropped = 0
    for step, ((ga, gates_a), (gb, gates_b)) in enumerate(zip(a, b)):
        assert len(gates_a) == len(gates_b) and gates_a, "no stochastic-depth blocks"
        for x, y in zip(gates_a, gates_b):
            assert (x == y) if isinstance(x, bool) else torch.equal(x, y)
        dropped += sum((not g) if isinstance(g, bool) else int((~g).sum()) for g in gates_a)
        # a block dropped at every step has no gradient in either run: same key sets
        assert ga.keys() == gb.keys(), f"step {step}: different parameters got gradients"
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"step {step}, {name}: {m}")
    assert dropped > 0, "no block was dropped: the test would not see wrong gates"


def _cifar(mode):
    return sdkernels.models.cifar_resnet(20, p_last=0.5, mode=mode, seed=3).double()


# views=2: two views through one encoder before one backward; each recomputation must
# replay its own forward's gates, not the latest forward's
@pytest.mark.parametrize("views, size", [(1, 32), (2, 16)], ids=["one_forward", "two_forwards"])
@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("how", ["reentrant", "non_reentrant", "sequential"])
def test_cifar_resnet_checkpointing_same_gradients(mode, how, views, size):
    plain = _cifar(mode)
    ckpt = copy.deepcopy(plain)
    layers = ("layer1", "layer2", "layer3")
    if how == "sequential":
        _wrap_layers(ckpt, layers, lambda s: _CheckpointSequential(s, 2))
    else:
        _wrap_layers(ckpt, layers, lambda s: _CheckpointEach(s, how == "reentrant"))
    _same_training(plain, ckpt, views=views, size=size)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_torchvision_resnet18_checkpoint_each_block(reentrant):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = sdkernels.convert(tv.models.resnet18(num_classes=10).double(), p_last=0.5, seed=1)
    ckpt = copy.deepcopy(plain)
    _wrap_layers(ckpt, ("layer1", "layer2", "layer3", "layer4"),
                 lambda s: _CheckpointEach(s, reentrant))
    _same_training(plain, ckpt, size=48)


def test_timm_resnet50_set_grad_checkpointing():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = sdkernels.convert(timm.create_model("resnet50", num_classes=10).double(),
                              p_last=0.5, seed=2)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    assert ckpt.grad_checkpointing
    _same_training(plain, ckpt, batch=2, size=48)


def test_gates_drawn_once_per_step_and_recorded():
    model = _cifar("batch")
    gen = model.layer1[0].gate_generator
    draws = []
    real_rand = torch.rand

    def counting_rand(*a, **k):
        if k.get("generator") is gen._gen:
            draws.append(a[0])
        return real_rand(*a, **k)

    torch.rand = counting_rand
    try:
        model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    finally:
        torch.rand = real_rand
    assert draws == [(9, 1)]  # one host draw for all 9 blocks of ResNet-20
    rec = gate_record(model)
    assert len(rec) == 9 and all(isinstance(g, bool) for g in rec)
    assert gen.last_step() and list(gen.last_step().values()) == rec


def test_load_gate_state_none_is_a_clear_error():
    model = _cifar("batch")
    with pytest.raises(TypeError, match="gate_state"):
        sdkernels.load_gate_state(model, None)
