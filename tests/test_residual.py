"""The generic stochastic-depth rule (``sdkernels.residual``): the public
``StochasticDepth`` wrapper and the ``ResidualGate`` of converted blocks, on plain
PyTorch modules (no third-party package, CPU).

Each check is one test body; gates are forced with generators whose draws are known, so
every expected output is computed independently from the modules themselves.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdkernels
from sdkernels.gates import FixedGates, GateGenerator
from sdkernels.residual import Residual, ResidualGate, StochasticDepth, decide

DT = torch.float64


class RowPattern(GateGenerator):
    """Row gates from a fixed pattern (batch gates: the pattern's first entry)."""

    def __init__(self, pattern):
        super().__init__(seed=0)
        self.pattern = torch.tensor(pattern, dtype=torch.bool)

    def batch(self, p):
        return bool(self.pattern[0])

    def rows(self, p, n):
        assert n == len(self.pattern), f"asked for {n} rows, pattern has {len(self.pattern)}"
        return self.pattern.clone()


class Counted(nn.Module):
    """A per-sample branch (LayerNorm + Linear + GELU + Linear) that records the batch
    size of every call."""

    def __init__(self, dim=6):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.calls = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def _wrapper(gen, *, p=0.8, mode="batch", scaling="test", shortcut=None, activation=None,
             dropped_grads="none", drop_impl="skip"):
    torch.manual_seed(0)
    return StochasticDepth(Counted(), shortcut, activation, survival_prob=p, mode=mode,
                           scaling=scaling, gate_generator=gen, dropped_grads=dropped_grads,
                           drop_impl=drop_impl).to(DT)


def _x(n=5, dim=6, seed=1):
    return torch.randn(n, dim, dtype=DT, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scaling, s", [("test", 1.0), ("train", 1 / 0.8)])
@pytest.mark.parametrize("activation", [None, nn.ReLU()])
def test_batch_mode_active_and_dropped(scaling, s, activation):
    sc = nn.Linear(6, 6).to(DT)
    m = _wrapper(FixedGates(True), scaling=scaling, shortcut=sc, activation=activation)
    x = _x()
    act = activation or (lambda t: t)
    with torch.no_grad():
        expect = act(sc(x) + s * m.branch(x))
    torch.testing.assert_close(m(x), expect, rtol=1e-12, atol=0)
    m.gate_generator = FixedGates(False)
    m.branch.calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(m(x), act(sc(x)), rtol=0, atol=0)
    assert m.branch.calls == [], "a dropped residual ran its branch"
    assert m.last_gate is False


@pytest.mark.parametrize("scaling, s", [("test", 0.8), ("train", 1.0)])
def test_eval_rule(scaling, s):
    m = _wrapper(FixedGates(False), scaling=scaling).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(m(x), x + s * m.branch(x), rtol=1e-12, atol=0)


@pytest.mark.parametrize("scaling, s", [("test", 1.0), ("train", 1 / 0.8)])
def test_row_mode_runs_the_branch_on_survivors_only(scaling, s):
    keep = [True, False, True, True, False]
    m = _wrapper(RowPattern(keep), mode="row", scaling=scaling)
    x = _x()
    out = m(x)
    assert m.branch.calls == [3], "the branch must see the 3 surviving rows only"
    with torch.no_grad():
        full = m.branch(x)  # per-sample branch: its rows equal the gathered computation
    k = torch.tensor(keep)
    torch.testing.assert_close(out[k], x[k] + s * full[k], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out[~k], x[~k], rtol=0, atol=0)
    assert torch.equal(m.last_gate, k)


def test_row_mode_gradients_match_a_masked_reference():
    keep = [False, True, True, False, True]
    m = _wrapper(RowPattern(keep), mode="row", scaling="train")
    ref = copy.deepcopy(m)
    x1, x2 = _x().requires_grad_(), _x().requires_grad_()
    m(x1).square().sum().backward()
    mask = torch.tensor(keep, dtype=DT)[:, None] / 0.8
    (x2 + mask * ref.branch(x2)).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-14)
    for (name, a), b in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=name)


def test_row_mode_gradcheck():
    m = _wrapper(RowPattern([True, False, True]), mode="row", scaling="train",
                 shortcut=nn.Linear(6, 6).to(DT), activation=nn.Tanh())
    x = _x(3).requires_grad_()
    assert torch.autograd.gradcheck(m, (x,))


def test_row_mode_batchnorm_sees_survivor_statistics():
    keep = [True, True, False, True, False, True]
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)).to(DT)
    m = StochasticDepth(branch, activation=nn.ReLU(), mode="row",
                        gate_generator=RowPattern(keep)).to(DT)
    ref = copy.deepcopy(branch)
    x = torch.rand(6, 4, 5, 5, dtype=DT)
    out = m(x)
    k = torch.tensor(keep)
    torch.testing.assert_close(out[k], torch.relu(x[k] + ref(x[k])), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(branch[1].running_mean, ref[1].running_mean, rtol=0, atol=0)


def test_no_survivors_and_all_survivors():
    m = _wrapper(RowPattern([False] * 4), mode="row")
    x = _x(4)
    assert torch.equal(m(x), x) and m.branch.calls == []
    m.gate_generator = RowPattern([True] * 4)
    with torch.no_grad():
        torch.testing.assert_close(m(x), x + m.branch(x), rtol=0, atol=0)


def test_empty_batch():
    for mode in ("batch", "row"):
        m = _wrapper(GateGenerator(0), mode=mode)
        assert m(_x(0)).shape == (0, 6)


def test_inplace_activation_never_writes_into_the_input():
    m = _wrapper(FixedGates(False), activation=nn.ReLU(inplace=True))
    x = _x()
    before = x.clone()
    out = m(x)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out, torch.relu(before), rtol=0, atol=0)


def test_pre_step_feeds_branch_and_optionally_shortcut():
    """ResNetV2-style: h = pre(x); the shortcut takes h when ``pre_shortcut``."""
    torch.manual_seed(0)
    pre, f, ds = (nn.Linear(6, 6).to(DT) for _ in range(3))
    x = _x()
    for pre_shortcut, keep in ((True, [True, False, True, True, False]),
                               (False, [False, True, True, True, False])):
        gate = ResidualGate(0.7, mode="row", gate_generator=RowPattern(keep)).to(DT)
        r = Residual(f, ds if pre_shortcut else None, None, pre=pre, pre_shortcut=pre_shortcut)
        out = gate(x, decide(gate, x), r)
        with torch.no_grad():
            h = pre(x)
            sc = ds(h) if pre_shortcut else x
            expect = torch.where(torch.tensor(keep)[:, None], sc + f(h), sc)
        torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-14)


def test_row_args_are_gathered_with_the_rows():
    keep = [True, False, True, False]
    gate = ResidualGate(0.5, mode="row", gate_generator=RowPattern(keep))
    x = _x(4)
    mask = torch.arange(4, dtype=DT)[:, None].expand(4, 6)
    out = gate(x, decide(gate, x), Residual(lambda h, m: h * 0 + m, row_args=[mask]))
    k = torch.tensor(keep)
    torch.testing.assert_close(out[k], x[k] + mask[k], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_mask_impl_computes_everything_and_matches(mode):
    keep = [True, False, True, True, False]
    gen = RowPattern(keep)
    skip = _wrapper(gen, mode=mode, scaling="train")
    mask = _wrapper(RowPattern(keep), mode=mode, scaling="train", drop_impl="mask")
    x = _x()
    torch.testing.assert_close(mask(x), skip(x), rtol=1e-12, atol=1e-15)
    assert mask.branch.calls == [5], "the naive implementation computes every row"


@pytest.mark.parametrize("dropped_grads, expect_zeros", [("zeros", True), ("none", False)])
def test_dropped_residual_gradients(dropped_grads, expect_zeros):
    m = _wrapper(FixedGates(False), dropped_grads=dropped_grads)
    x = _x().requires_grad_()
    m(x).sum().backward()
    for name, p in m.branch.named_parameters():
        if expect_zeros:
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_activation_checkpointing_replays_the_forward_gates(mode, reentrant):
    torch.manual_seed(0)
    layers = [StochasticDepth(Counted(), survival_prob=0.5, mode=mode) for _ in range(6)]
    net = nn.Sequential(*layers).to(DT)
    gen = GateGenerator(4)  # its first step drops residuals (batch) and rows (row mode)
    gen.bind(layers)
    for m in layers:
        m.gate_generator = gen
    twin = copy.deepcopy(net)
    x = _x(8).requires_grad_()
    net(x).square().sum().backward()
    torch.utils.checkpoint.checkpoint_sequential(twin, 3, x, use_reentrant=reentrant) \
        .square().sum().backward()
    gates = [(g.tolist() if isinstance(g, torch.Tensor) else g) for g in
             sdkernels.gates.gate_record(net)]
    assert gates == [(g.tolist() if isinstance(g, torch.Tensor) else g) for g in
                     sdkernels.gates.gate_record(twin)]
    assert any(g is False or (isinstance(g, list) and not all(g)) for g in gates)
    for (name, a), b in zip(net.named_parameters(), twin.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14, msg=name)


def test_deepcopy_and_pickle():
    m = _wrapper(GateGenerator(5), mode="row")
    x = _x()
    twin = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    a, b, c = m(x), twin(x), loaded(x)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    torch.testing.assert_close(c, a, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"branch": None}, TypeError, "branch is required"),
    ({"branch": 3}, TypeError, "branch must be"),
    ({"shortcut": "identity"}, TypeError, "shortcut must be"),
    ({"survival_prob": 0.0}, ValueError, r"\(0, 1\]"),
    ({"survival_prob": 1.5}, ValueError, r"\(0, 1\]"),
    ({"survival_prob": "0.5"}, TypeError, "real number"),
    ({"mode": "rows"}, ValueError, "mode"),
    ({"scaling": "inverted"}, ValueError, "scaling"),
    ({"gate_generator": torch.Generator()}, TypeError, "GateGenerator"),
    ({"dropped_grads": "zero"}, ValueError, "dropped_grads"),
])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    args = {"branch": nn.Linear(2, 2)}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        StochasticDepth(**args)


@pytest.mark.parametrize("name, value, error, match", [
    ("survival_prob", 0.0, ValueError, r"survival probability must be .*\(0, 1\]"),
    ("mode", "rows", ValueError, "unknown mode 'rows'"),
    ("min_rows", 0, ValueError, "min_rows must be >= 1"),
    ("min_rows", 2.0, TypeError, "min_rows must be an int"),
    ("per_sample_branch", 1, TypeError, "per_sample_branch must be a bool"),
    ("gather_min_drop", 1.5, ValueError, r"gather_min_drop must be a number in \[0, 1\]"),
    ("gather_min_drop", float("nan"), ValueError, "gather_min_drop must be a number"),
    ("gather_min_drop", True, ValueError, "gather_min_drop must be a number"),
])
def test_settings_are_validated_when_set_on_a_live_module(name, value, error, match):
    sd = StochasticDepth(nn.Linear(2, 2), survival_prob=0.5, mode="row")
    before = getattr(sd, name)
    with pytest.raises(error, match=match):
        setattr(sd, name, value)
    assert getattr(sd, name) == before  # a refused value leaves the setting as it was


def test_an_unset_setting_is_an_attribute_error():
    # hasattr / getattr(default) on a module whose gate is not initialised yet
    from sdkernels.residual import GatedResidual
    g = GatedResidual()
    assert not hasattr(g, "mode") and getattr(g, "survival_prob", None) is None


def test_settings_from_an_older_pickle_are_read():
    # row-mode settings used to be plain attributes stored under their own names
    sd = StochasticDepth(nn.Linear(2, 2), survival_prob=0.5, mode="row")
    state = dict(sd.__dict__)
    for name in ("min_rows", "per_sample_branch", "gather_min_drop"):
        state[name] = state.pop("_" + name)
    state["gather_min_drop"] = 0.25
    fresh = StochasticDepth.__new__(StochasticDepth)
    fresh.__setstate__(state)
    assert (fresh.min_rows, fresh.per_sample_branch, fresh.gather_min_drop) == (1, True, 0.25)


def test_resnet_blocks_are_the_special_case():
    """The drop-in ResNet blocks run the same rule (batch/row, eval scale)."""
    from sdkernels.residual import GatedResidual
    b = sdkernels.BasicBlock(4, 4, survival_prob=0.5, mode="row", gate_generator=RowPattern(
        [True, False, True]))
    assert isinstance(b, GatedResidual)
    x = torch.rand(3, 4, 6, 6)
    out = b(x)
    assert torch.equal(out[1], x[1])


def test_resnet_block_row_mode_always_gathers_for_survivor_statistics():
    """A BatchNorm branch gathers however few rows drop: its statistics are the
    survivors' (a masked step would normalise over the whole batch)."""
    keep = [True] * 31 + [False]
    torch.manual_seed(0)
    b = sdkernels.BasicBlock(4, 4, survival_prob=0.9, mode="row",
                             gate_generator=RowPattern(keep)).to(DT)
    ref = copy.deepcopy(b)
    x = torch.rand(32, 4, 5, 5, dtype=DT)
    with sdkernels.use_backend("reference"):
        out = b(x)
    k = torch.tensor(keep)
    with torch.no_grad():
        y = ref.bn2(ref.conv2(ref.relu(ref.bn1(ref.conv1(x[k])))))
    torch.testing.assert_close(out[k], torch.relu(x[k] + y), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b.bn1.running_mean, ref.bn1.running_mean, rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="needs torch.compile")
def test_compiled_row_mode_gates_live_and_recompiles_bounded(fresh_dynamo):
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    layers = [StochasticDepth(Counted(8), survival_prob=0.6, mode="row", scaling="train")
              for _ in range(6)]
    net = nn.Sequential(*layers)
    gen = GateGenerator(11)
    gen.bind(layers)
    for m in layers:
        m.gate_generator = gen
    eager = copy.deepcopy(net)
    compiled = torch.compile(net, backend="aot_eager")
    seen = set()

    def step(i):
        x = _x(8, 8, seed=100 + i).float()
        a, b = compiled(x), eager(x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        rows = tuple(int(m.last_gate.sum()) for m in layers)
        assert rows == tuple(int(m.last_gate.sum()) for m in eager)
        seen.add(rows)

    for i in range(12):  # warm-up: every path (all / none / some rows) appears
        step(i)
    frames = counters["frames"]["total"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(12, 20):
            step(i)
    assert counters["frames"]["total"] == frames
    assert len(seen) > 5, "gates were frozen at trace time"


def test_batchnorm_branch_with_one_survivor_runs_masked(monkeypatch):
    """BatchNorm cannot normalise one sample where that is one value per channel (and
    gives degenerate statistics elsewhere): a BN branch with a single survivor runs on
    the whole batch, masked, and says so once."""
    import sdkernels.residual as residual
    monkeypatch.setattr(residual, "_WARNED_MASKED", set())
    keep = [False, True, False, False]
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4))
    m = StochasticDepth(branch, mode="row", scaling="train", survival_prob=0.5,
                        gate_generator=RowPattern(keep)).to(DT)
    assert m.min_rows == 2
    ref = copy.deepcopy(branch)
    x = torch.rand(4, 4, 3, 3, dtype=DT)
    with pytest.warns(RuntimeWarning, match="single survivor"):
        out = m(x)
    mask = torch.tensor(keep, dtype=DT)[:, None, None, None] / 0.5
    torch.testing.assert_close(out, x + mask * ref(x), rtol=1e-12, atol=1e-14)
    assert StochasticDepth(Counted()).min_rows == 1  # LayerNorm: any number of rows


def test_resnet_block_with_one_survivor_runs_masked(monkeypatch):
    """The drop-in ResNet blocks follow every BatchNorm branch: one survivor on 1x1 maps
    (a ResNet's last stage at CIFAR sizes, small batches) would be one value per
    channel, an error in BatchNorm; the step runs masked and says so once."""
    import sdkernels.residual as residual
    monkeypatch.setattr(residual, "_WARNED_MASKED", set())
    keep = [False, True, False, False]
    torch.manual_seed(0)
    b = sdkernels.BasicBlock(4, 4, survival_prob=0.5, mode="row", scaling="train",
                             gate_generator=RowPattern(keep)).to(DT)
    assert b.min_rows == 2
    ref = copy.deepcopy(b)
    x = torch.rand(4, 4, 1, 1, dtype=DT)
    with sdkernels.use_backend("reference"), pytest.warns(RuntimeWarning, match="single survivor"):
        out = b(x)
    mask = torch.tensor(keep, dtype=DT)[:, None, None, None] / 0.5
    with torch.no_grad():
        y = ref.bn2(ref.conv2(ref.relu(ref.bn1(ref.conv1(x)))))
    torch.testing.assert_close(out, torch.relu(x + mask * y), rtol=1e-12, atol=1e-14)


def test_resnet_block_from_an_older_pickle_gets_its_row_minimum():
    # ResNet blocks used to store the generic default, 1, whatever their branch
    b = sdkernels.BasicBlock(4, 4, mode="row")
    state = dict(b.__dict__, _min_rows=1)
    fresh = sdkernels.BasicBlock.__new__(sdkernels.BasicBlock)
    fresh.__setstate__(state)
    assert fresh.min_rows == 2


@pytest.mark.parametrize("shortcut", ["identity", "projection"])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_a_hook_on_the_final_relu_sees_the_block_output_once(mode, shortcut):
    """With a hook on the block's ReLU (torchvision's, in place), a dropped block or a
    row-mode step calls it once on the block's whole output (after the branch's own
    call on the rows that run), and never writes into the input or the shortcut's
    output."""
    keep = [False, True, False, True]  # batch mode: dropped (the pattern's first entry)
    torch.manual_seed(0)
    down = (None if shortcut == "identity" else
            nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)))
    b = sdkernels.BasicBlock(4, 4, downsample=down, survival_prob=0.5, mode=mode,
                             gate_generator=RowPattern(keep)).to(DT)
    seen, shortcut_out = [], []
    b.relu.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    if down is not None:
        down.register_forward_hook(lambda m, a, o: shortcut_out.append((o, o.clone())))
    x = torch.rand(4, 4, 3, 3, dtype=DT) - 0.5
    x0 = x.clone()
    with sdkernels.use_backend("reference"):
        out = b(x)
    assert len(seen) == (1 if mode == "batch" else 2)
    torch.testing.assert_close(seen[-1], out, rtol=0, atol=0)
    torch.testing.assert_close(x, x0, rtol=0, atol=0)
    for o, copy_of_o in shortcut_out:
        torch.testing.assert_close(o, copy_of_o, rtol=0, atol=0)


class OneToken(nn.Module):
    """A per-sample branch whose output, one token per sample ([N, 1, C]), is added to
    every token of the shortcut ([N, L, C]) by broadcasting."""

    def __init__(self, c=6):
        super().__init__()
        self.lin = nn.Linear(c, c)

    def forward(self, h):
        return self.lin(h.mean(1, keepdim=True))


class Shared(nn.Module):
    """A branch whose output does not depend on the sample: [1, L, C] or [L, C]."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))

    def forward(self, h):
        return self.w * 1.0


@pytest.mark.parametrize("branch", [OneToken, lambda: Shared((1, 5, 6)), lambda: Shared((5, 6))],
                         ids=["[N,1,C]", "[1,L,C]", "[L,C]"])
def test_row_mode_broadcasts_the_branch_output_as_the_full_batch_does(branch):
    keep = [True, False, True, True, False, True, False, True]
    torch.manual_seed(0)
    m = StochasticDepth(branch(), survival_prob=0.5, mode="row", scaling="train",
                        gate_generator=RowPattern(keep)).to(DT)
    x = torch.rand(8, 5, 6, dtype=DT, requires_grad=True)
    out = m(x)
    ref = x + torch.tensor(keep, dtype=DT)[:, None, None] / 0.5 * m.branch(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.rand_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0],
                               torch.autograd.grad(ref, x, g)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("branch", [nn.Linear(6, 3), nn.Flatten(1)], ids=["width", "shape"])
def test_row_mode_branch_output_the_shortcut_cannot_take_is_a_clear_error(branch):
    keep = [True, False] * 4
    m = StochasticDepth(branch, survival_prob=0.5, mode="row",
                        gate_generator=RowPattern(keep))
    with pytest.raises(ValueError, match=r"branch's output on 4 rows has shape .* does not "
                                         r"broadcast to the shortcut's rows \(4, 5, 6\)"):
        m(torch.rand(8, 5, 6))


def test_row_mode_gathers_only_when_enough_rows_drop():
    """Below ``gather_min_drop`` of the batch dropped, a per-sample branch runs on every
    row and is masked (cheaper than gathering, same result); at or above it, gathered."""
    keep = [True] * 31 + [False]
    m = _wrapper(RowPattern(keep), mode="row", scaling="train")
    x = _x(32)
    masked = m(x)
    assert m.branch.calls == [32]
    m.gate_generator = RowPattern(keep)
    m.gather_min_drop = 1 / 32
    m.branch.calls.clear()
    gathered = m(x)
    assert m.branch.calls == [31]
    torch.testing.assert_close(masked, gathered, rtol=1e-12, atol=1e-14)
    k = torch.tensor(keep)
    torch.testing.assert_close(masked[~k], x[~k], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nhwc_view", "batch_inner"])
def test_row_helpers_keep_the_layout_and_match_indexing(layout):
    # gather_rows / add_rows / copy_rows work on the rows as dense blocks of memory
    # (channels_last as its NHWC permutation); a tensor whose rows are not blocks (batch
    # not outermost) takes plain indexing. Values, gradients and layout must be the same
    # as plain indexing gives, whatever the path.
    from sdkernels.residual import add_rows, copy_rows, gather_rows
    torch.manual_seed(0)
    base = torch.randn(6, 4, 3, 5, dtype=DT)
    make = {"contiguous": lambda t: t.clone(),
            "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
            "nhwc_view": lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
            "batch_inner": lambda t: t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)}
    x = make[layout](base).requires_grad_()
    idx = torch.tensor([0, 2, 5])
    xk = gather_rows(x, idx)
    assert torch.equal(xk, base[idx])
    if layout != "batch_inner":
        assert xk.stride() == make[layout](base[idx]).stride()
    f = make[layout](torch.randn(3, 4, 3, 5, dtype=DT))
    out = add_rows(x, idx, f * xk, 0.5)
    ref = base.clone()
    ref[idx] += 0.5 * f * base[idx]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)
    assert out.stride() == x.stride()
    g = torch.randn_like(base)
    (grad,) = torch.autograd.grad(out, x, g)
    xr = base.clone().requires_grad_()
    ro = xr.clone()
    ro[idx] = ro[idx] + 0.5 * f * xr[idx]
    torch.testing.assert_close(grad, torch.autograd.grad(ro, xr, g)[0], rtol=0, atol=1e-14)
    c = copy_rows(x.detach(), idx, f)
    cref = base.clone()
    cref[idx] = f
    assert torch.equal(c, cref) and c.stride() == x.stride()


def test_row_helpers_channels_last_3d():
    from sdkernels.residual import add_rows, gather_rows
    base = torch.randn(4, 3, 2, 2, 5, dtype=DT)
    x = base.contiguous(memory_format=torch.channels_last_3d)
    idx = torch.tensor([1, 3])
    xk = gather_rows(x, idx)
    assert torch.equal(xk, base[idx])
    assert xk.is_contiguous(memory_format=torch.channels_last_3d)
    out = add_rows(x, idx, xk, None)
    ref = base.clone()
    ref[idx] *= 2
    assert torch.equal(out, ref) and out.stride() == x.stride()


def test_channels_last_rows_take_the_contiguous_kernels():
    # the fast path itself, not only its results: gather and scatter of a channels-last
    # tensor run index_select / index_add_ on its NHWC view, in forward and backward,
    # never advanced indexing (index / index_put_ with accumulation in backward)
    from torch.utils._python_dispatch import TorchDispatchMode

    from sdkernels.residual import add_rows, gather_rows

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(6, 4, 3, 5, dtype=DT).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    idx = torch.tensor([0, 2, 5])
    with Ops() as ops:
        out = add_rows(x, idx, gather_rows(x, idx) * 2, 0.5)
        out.backward(torch.randn_like(out))
    assert {"index_select", "index_add_"} <= ops.seen or {"index_select", "index_add"} <= ops.seen
    assert not {"index", "index_put", "index_put_", "_index_put_impl_"} & ops.seen, ops.seen


@pytest.mark.parametrize("kept, min_rows, per_sample, expect", [
    (0, 1, True, ("dropped", None)),
    (32, 1, True, ("active", None)),
    (31, 1, True, ("mask", "few_dropped")),   # 1 of 32 dropped < 1/16
    (30, 1, True, ("rows", None)),            # 2 of 32: gathered
    (31, 2, False, ("rows", None)),           # BatchNorm branch: always gathers...
    (1, 2, False, ("mask", "min_rows")),      # ...unless one survivor
])
def test_row_path_is_chosen_in_one_place(kept, min_rows, per_sample, expect):
    from sdkernels.ops import row_path
    assert row_path(kept, 32, min_rows=min_rows, per_sample_branch=per_sample,
                    gather_min_drop=1 / 16) == expect
