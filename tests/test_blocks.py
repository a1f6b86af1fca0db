"""Block semantics (design §2): what runs, what is skipped, what comes out."""
import copy
import math

import pytest
import torch
from torch import nn

import sdkernels
from sdkernels.gates import FixedGates, GateGenerator
from sdkernels.models.cifar import OptionAShortcut

BACKENDS = ["reference"] + (["extension"] if sdkernels.ops.extension.is_available() else [])


def binom_two_sided_p(k, n, p):
    """Exact two-sided binomial test p-value (sum of outcomes no likelier than k)."""
    logpmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
              + (i * math.log(p) if i else 0.0) + ((n - i) * math.log1p(-p) if n - i else 0.0)
              for i in range(n + 1)]
    ref = logpmf[k] + 1e-9
    return min(1.0, sum(math.exp(v) for v in logpmf if v <= ref))


def _block(kind, shortcut, dtype=torch.float64, **kw):
    if kind == "basic":
        if shortcut == "identity":
            b = sdkernels.BasicBlock(8, 8, **kw)
        elif shortcut == "optionA":
            b = sdkernels.BasicBlock(8, 16, 2, OptionAShortcut(8, 16), **kw)
        else:
            b = sdkernels.BasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                                             nn.BatchNorm2d(16)), **kw)
    else:
        if shortcut == "identity":
            b = sdkernels.Bottleneck(32, 8, **kw)
        elif shortcut == "optionA":
            b = sdkernels.Bottleneck(16, 8, 2, OptionAShortcut(16, 32), **kw)
        else:
            b = sdkernels.Bottleneck(16, 8, 2, nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False),
                                                             nn.BatchNorm2d(32)), **kw)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return b.to(dtype)


def _input(b, n=6, dtype=torch.float64):
    c = b.conv1.in_channels
    return torch.rand(n, c, 8, 8, dtype=dtype)  # post-ReLU, like every block input


def _branch_plain(b, x):
    """f(x) with plain module calls (BN as the modules' mode says)."""
    if isinstance(b, sdkernels.Bottleneck):
        y = b.relu(b.bn1(b.conv1(x)))
        y = b.relu(b.bn2(b.conv2(y)))
        return b.bn3(b.conv3(y))
    return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x)))))


def _shortcut(b, x):
    return x if b.downsample is None else b.downsample(x)


KINDS = [("basic", "identity"), ("basic", "optionA"), ("basic", "projection"),
         ("bottleneck", "identity"), ("bottleneck", "optionA"), ("bottleneck", "projection")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,shortcut", KINDS)
@pytest.mark.parametrize("scaling", ["test", "train"])
def test_eval_output_formula(kind, shortcut, scaling, backend):
    b = _block(kind, shortcut, survival_prob=0.7, scaling=scaling).eval()
    x = _input(b)
    with sdkernels.use_backend(backend), torch.no_grad():
        got = b(x)
        s = 0.7 if scaling == "test" else 1.0
        want = torch.relu(_shortcut(b, x) + s * _branch_plain(b, x))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,shortcut", KINDS)
@pytest.mark.parametrize("scaling", ["test", "train"])
def test_training_active_and_dropped_outputs(kind, shortcut, scaling, backend):
    b = _block(kind, shortcut, survival_prob=0.6, scaling=scaling).train()
    x = _input(b)
    twin = copy.deepcopy(b)
    with sdkernels.use_backend(backend):
        b.gate_generator = FixedGates(True)
        got = b(x)
    # the same block computed by hand with plain modules in training mode
    f = twin.bn2(twin.conv2(twin.relu(twin.bn1(twin.conv1(x))))) if kind == "basic" else \
        twin.bn3(twin.conv3(twin.relu(twin.bn2(twin.conv2(twin.relu(twin.bn1(twin.conv1(x))))))))
    s = 1.0 if scaling == "test" else 1 / 0.6
    torch.testing.assert_close(got, torch.relu(_shortcut(twin, x) + s * f), rtol=1e-12, atol=1e-12)
    b.gate_generator = FixedGates(False)
    with sdkernels.use_backend(backend):
        out = b(x)
    if shortcut == "identity":
        assert out is x  # the input itself: nothing computed, nothing copied
    else:
        torch.testing.assert_close(out, torch.relu(_shortcut(twin, x)))


@pytest.mark.parametrize("kind,shortcut", [("basic", "identity"), ("bottleneck", "projection")])
def test_dropped_block_runs_nothing_and_keeps_bn_stats(kind, shortcut):
    b = _block(kind, shortcut, survival_prob=0.5, dropped_grads="none").train()
    b.gate_generator = GateGenerator(seed=11)
    calls = {"conv": 0, "bn": 0}
    for name, m in b.named_modules():
        if name.startswith("downsample"):
            continue
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda *a: calls.__setitem__("conv", calls["conv"] + 1))
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda *a: calls.__setitem__("bn", calls["bn"] + 1))
    n_conv = 2 if kind == "basic" else 3
    branch_bns = [m for n, m in b.named_modules()
                  if isinstance(m, nn.BatchNorm2d) and not n.startswith("downsample")]
    active = 0
    for step in range(40):
        before = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                  for m in branch_bns]
        conv_before = calls["conv"]
        x = _input(b).requires_grad_()
        out = b(x)
        out.sum().backward()
        if b.last_gate:
            active += 1
            assert calls["conv"] - conv_before == n_conv
        else:
            assert calls["conv"] == conv_before
            for m, (rm, rv, nb) in zip(branch_bns, before):
                assert torch.equal(m.running_mean, rm) and torch.equal(m.running_var, rv)
                assert torch.equal(m.num_batches_tracked, nb)
            assert all(p.grad is None for p in b.conv1.parameters()) or active > 0
    assert 0 < active < 40
    # the last norm is fused, not called as a module: count the first norm only
    assert calls["bn"] >= active


def test_dropped_block_adds_no_autograd_node_on_identity():
    b = _block("basic", "identity", survival_prob=0.5)
    b.gate_generator = FixedGates(False)
    x = _input(b).requires_grad_()
    y = x * 2
    out = b(y)
    assert out is y and out.grad_fn is y.grad_fn


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_gate_frequencies_binomial(mode, p):
    b = _block("basic", "identity", dtype=torch.float32, survival_prob=p, mode=mode)
    b.gate_generator = GateGenerator(seed=1234)
    n_steps, rows = 400, 8
    kept = trials = 0
    with torch.no_grad():
        for _ in range(n_steps):
            b(_input(b, n=rows, dtype=torch.float32))
            if mode == "batch":
                kept, trials = kept + int(b.last_gate), trials + 1
            else:
                kept, trials = kept + int(b.last_gate.sum()), trials + rows
    assert binom_two_sided_p(kept, trials, p) > 1e-3, (kept, trials, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,shortcut", [("basic", "identity"), ("basic", "optionA"),
                                           ("bottleneck", "projection")])
@pytest.mark.parametrize("scaling", ["test", "train"])
def test_row_mode_runs_branch_on_survivors_only(kind, shortcut, scaling, backend):
    b = _block(kind, shortcut, survival_prob=0.5, mode="row", scaling=scaling).train()
    b.gate_generator = GateGenerator(seed=5)
    seen = []
    b.conv1.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    ref = copy.deepcopy(b)
    x = _input(b, n=9)
    for _ in range(20):
        seen.clear()
        with sdkernels.use_backend(backend):
            out = b(x)
        keep = b.last_gate
        if 0 < int(keep.sum()) < 9:
            break
    assert 0 < int(keep.sum()) < 9
    assert len(seen) == 1 and torch.equal(seen[0], x[keep])
    # survivors: the branch on the survivors alone (BN statistics of the survivors); the
    # shortcut, which is not part of f, runs on the whole batch
    sc = _shortcut(ref, x)
    s = 1.0 if scaling == "test" else 2.0
    want_kept = torch.relu(sc[keep] + s * _branch_plain(ref, x[keep]))
    torch.testing.assert_close(out[keep], want_kept, rtol=1e-12, atol=1e-12)
    want_dropped = x[~keep] if shortcut == "identity" else torch.relu(sc[~keep])
    torch.testing.assert_close(out[~keep], want_dropped)


def test_row_mode_gradients_flow_to_survivors_only():
    b = _block("basic", "identity", survival_prob=0.5, mode="row").train()
    b.gate_generator = GateGenerator(seed=7)
    x = _input(b, n=8).requires_grad_()
    out = b(x)
    keep = b.last_gate
    g = torch.randn_like(out)
    out.backward(g)
    # a dropped row is the identity: its input gradient is the output gradient
    torch.testing.assert_close(x.grad[~keep], g[~keep])
    assert b.conv1.weight.grad is not None


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_no_survivors_in_row_mode_is_dropped(mode):
    b = _block("basic", "identity", survival_prob=0.5, mode=mode, dropped_grads="none")
    b.gate_generator = FixedGates(False)
    x = _input(b).requires_grad_()
    assert b(x) is x


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("scaling", ["test", "train"])
def test_mask_baseline_matches_skipping(mode, scaling):
    """The naive mask-multiply baseline and real skipping give the same outputs for the
    same gates (the baseline only wastes the work; in row mode its BN statistics cover
    all rows, so compare batch mode exactly and row mode in eval)."""
    b = _block("basic", "optionA", survival_prob=0.5, mode=mode, scaling=scaling)
    naive = copy.deepcopy(b)
    naive.drop_impl = "mask"
    b.gate_generator, naive.gate_generator = GateGenerator(seed=3), GateGenerator(seed=3)
    x = _input(b)
    for _ in range(10):
        out, out_naive = b(x), naive(x)
        if mode == "batch":
            assert b.last_gate == naive.last_gate
            torch.testing.assert_close(out, out_naive, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(b.last_gate, naive.last_gate)
    # the baseline also updated BN running stats of dropped steps; align them for eval
    naive.load_state_dict(b.state_dict())
    b.eval(), naive.eval()
    torch.testing.assert_close(b(x), naive(x))


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_dropped_grads_zeros_and_none(mode):
    for setting, expect_none in (("zeros", False), ("none", True)):
        b = _block("basic", "identity", survival_prob=0.5, mode=mode, dropped_grads=setting)
        b.gate_generator = FixedGates(False)
        x = _input(b).requires_grad_()
        out = b(x) * 1.0
        out.sum().backward()
        for p in b.parameters():
            if expect_none:
                assert p.grad is None
            else:
                assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_attributes_are_settable_and_validated():
    b = sdkernels.BasicBlock(8, 8)
    assert (b.survival_prob, b.mode, b.scaling) == (1.0, "batch", "test")
    b.survival_prob, b.mode, b.scaling = 0.3, "row", "train"
    assert (b.survival_prob, b.mode, b.scaling) == (0.3, "row", "train")
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="in \\(0, 1\\]"):
            b.survival_prob = bad
    with pytest.raises(TypeError):
        b.survival_prob = "half"
    with pytest.raises(ValueError, match="mode"):
        b.mode = "sample"
    with pytest.raises(ValueError, match="scaling"):
        b.scaling = "none"
    with pytest.raises(ValueError, match="survival"):
        sdkernels.Bottleneck(16, 4, survival_prob=0.0)
    with pytest.raises(TypeError):
        b.gate_generator = torch.Generator()
    assert "survival_prob=0.3" in repr(b)


def test_torchvision_constructor_and_state_dict_keys():
    from sdkernels.models import resnet as tv
    for sd_cls, tv_cls, args in ((sdkernels.BasicBlock, tv.BasicBlock, (16, 16)),
                                 (sdkernels.Bottleneck, tv.Bottleneck, (64, 16))):
        a, b = sd_cls(*args), tv_cls(*args)
        assert list(a.state_dict()) == list(b.state_dict())
        assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]
    down = nn.Sequential(nn.Conv2d(64, 256, 1, 2, bias=False), nn.BatchNorm2d(256))
    blk = sdkernels.Bottleneck(64, 64, 2, down, groups=2, base_width=32, norm_layer=nn.BatchNorm2d)
    ref = tv.Bottleneck(64, 64, 2, copy.deepcopy(down), groups=2, base_width=32)
    assert list(blk.state_dict()) == list(ref.state_dict())
    with pytest.raises(ValueError, match="groups=1"):
        sdkernels.BasicBlock(8, 8, groups=2)
    with pytest.raises(NotImplementedError):
        sdkernels.BasicBlock(8, 8, dilation=2)
