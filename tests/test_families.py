"""Real stochastic depth for the timm / torchvision residual families (issue 15), with the
real packages: every family converts, equals the original at p = 1 (float64, training and
eval), reverts exactly, really skips dropped residual work in a training step, and at
p_L = 0.5 equals the original whose drop paths apply the same gates as masks. Also:
``schedule="keep"``, deepcopy / pickle, converting twice, hooks, and the layouts that
cannot be made exact (a ValueError naming the module, the model left as it was).

Each test body runs once per family (``_families_models.SPECS``: the packages' own models,
shrunk: fewer blocks, small images). What a model should become is read from the
package's side (its block classes, ``has_skip`` / ``use_res_connect``, its drop-path
modules and rates), never from sdkernels' recognition code. The whole file skips where
timm or torchvision is not installed (CI's CPU environment); CI's CUDA-torch environment
runs it (marker ``thirdparty``).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("timm")
pytest.importorskip("torchvision")

import sdkernels  # noqa: E402
from sdkernels.convert import gates_of, residual_blocks  # noqa: E402
from sdkernels.families import ConvertedBlock  # noqa: E402
from sdkernels.gates import gate_record, generators_of  # noqa: E402
from sdkernels.residual import ResidualGate  # noqa: E402

import _families_models as fm  # noqa: E402

pytestmark = [pytest.mark.thirdparty, pytest.mark.usefixtures("one_thread")]

FAMILIES = [pytest.param(s, id=s.name) for s in fm.SPECS]
TOL = 1e-9  # relative error allowed at p = 1 in float64


def _converted_blocks(model):
    return [b for _, b in residual_blocks(model)]


def _all_gates(model):
    return [g for b in _converted_blocks(model) for g in gates_of(b)]


def _types(model):
    return [(q, type(m)) for q, m in model.named_modules()]


def _structure(model, rebuilt=()):
    """Per module: its children (name, object id) in registration order, and the
    names in its __dict__ (what conversion may add or take away). Children named in
    ``rebuilt`` (fused ResNet blocks: revert builds a new block of the original class
    around the same modules) count by type instead of identity."""
    def ident(q, n, c):
        qual = f"{q}.{n}" if q else n
        return type(c) if qual in rebuilt else id(c)
    return {q: ([(n, ident(q, n, c)) for n, c in m._modules.items()], sorted(m.__dict__))
            for q, m in model.named_modules()}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, state):
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _assert_close_rel(out, ref, what):
    assert ref.abs().max() > 0, f"{what}: the reference is all zeros; the comparison proves nothing"
    err = fm.rel_err(out, ref)
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL}"


def _train_forward(model, x, y):
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


# -- converts --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", FAMILIES)
def test_converts_every_residual_block(spec):
    model = fm.make(spec)
    expected = fm.package_blocks(spec, model)
    others = fm.non_residual_blocks(spec, model)
    fused = fm.fused_blocks(spec, model)
    assert expected, f"{spec.name}: the model has no block of {spec.blocks}"
    keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    orig_cls = {q: type(b) for q, b in expected.items()}

    assert sdkernels.convert(model, p_last=0.5, seed=0) is model  # in place

    found = residual_blocks(model)
    # exactly the package's residual blocks, in forward (registration) order: kept as the
    # same objects (in place), their class a generated subclass of their own; plain
    # ResNet blocks (no extra) become the fused sdkernels blocks, holding the same modules
    assert [q for q, _ in found] == list(expected)
    assert len(found) > len(fused)  # the family's own path is exercised
    for q, b in found:
        cls = orig_cls[q]
        children = list(b.children())
        if q in fused:
            assert type(b) is getattr(sdkernels, cls.__name__), q
            assert gates_of(b) == [b] and b.conv1 is expected[q].conv1
            assert not any(isinstance(c, fm.drop_path_types()) for c in children), q
            continue
        assert b is expected[q]
        assert isinstance(b, ConvertedBlock) and isinstance(b, cls), q
        assert type(b).__name__ == f"Gated{cls.__name__}" and type(b).__bases__[1] is cls
        gates = gates_of(b)
        assert len(gates) == spec.gates, q
        assert len({id(g) for g in gates}) == spec.gates
        for g in gates:
            assert type(g) is ResidualGate and any(g is c for c in children), q
            assert not list(g.parameters()) and not list(g.buffers())
        # no drop path of the package is left on a converted block
        assert not any(isinstance(c, fm.drop_path_types()) for c in children), q
    # blocks of the family that have no residual in this instance stay as they are, and
    # a package drop path survives only there (it is never applied)
    for q, b in others.items():
        assert not isinstance(b, ConvertedBlock) and type(b).__name__ in [c for _, c in spec.blocks]
    for q, m in model.named_modules():
        if isinstance(m, fm.drop_path_types()):
            assert q.rpartition(".")[0] in others, f"{q}: a drop path was left in place"
    # the state_dict keys (in order) and the parameters themselves are unchanged
    assert list(model.state_dict()) == keys
    assert [id(p) for p in model.parameters()] == params
    # the linear schedule: survival 1 - l/L (1 - p_L) per block l, each of its gates
    probs = [g.survival_prob for b in _converted_blocks(model) for g in gates_of(b)]
    n = len(found)
    want = [1 - (i + 1) / n * 0.5 for i, (_, b) in enumerate(found) for _ in gates_of(b)]
    assert probs == pytest.approx(want)
    # all gates share the one generator convert made
    assert len(generators_of(model)) == 1


# -- equals the original at p = 1 ------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spec", FAMILIES)
def test_equals_original_at_p1(spec, training):
    model = fm.make(spec)
    ref = fm.reference_copy(model)  # the same weights, its drop paths and dropout off
    sdkernels.convert(model, p_last=1.0, schedule="uniform", seed=0)
    assert all(g.survival_prob == 1.0 for g in _all_gates(model))
    x, y = fm.inputs(spec)
    model.train(training)
    ref.train(training)
    if training:
        out, out_ref = model(x), ref(x)
        F.cross_entropy(out, y).backward()
        F.cross_entropy(out_ref, y).backward()
        # the gated path ran (a gate was drawn for every residual), not an eval path
        assert all(g.last_gate is True for g in _all_gates(model))
    else:
        with torch.no_grad():
            out, out_ref = model(x), ref(x)
        assert all(g.last_gate is None for g in _all_gates(model))
    _assert_close_rel(out, out_ref, f"{spec.name} output")
    if training:
        n_grads = 0
        for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
            assert (p.grad is None) == (p_ref.grad is None), name
            if p_ref.grad is not None and p_ref.grad.abs().max() > 0:
                err = fm.rel_err(p.grad, p_ref.grad)
                assert err <= TOL, f"{spec.name} grad of {name}: relative error {err:.3g}"
                n_grads += 1
        assert n_grads > 0
        # BatchNorm statistics were updated alike
        for (k, v), v_ref in zip(model.state_dict().items(), ref.state_dict().values()):
            if v.is_floating_point():
                assert (v - v_ref).abs().max() <= TOL * max(1.0, float(v_ref.abs().max())), k


# -- reverts exactly -------------------------------------------------------------------

@pytest.mark.parametrize("spec", FAMILIES)
def test_reverts_exactly(spec):
    model = fm.make(spec)  # drop paths active, as built
    orig = copy.deepcopy(model)
    rebuilt = set(fm.fused_blocks(spec, model))
    types, structure, state = _types(model), _structure(model, rebuilt), _state(model)
    drop_paths = {q: m for q, m in model.named_modules() if isinstance(m, fm.drop_path_types())}
    assert drop_paths or all(s is None for s in spec.drop_slots)

    sdkernels.convert(model, p_last=0.5, seed=1)
    assert _types(model) != types
    x, y = fm.inputs(spec)
    model.eval()
    with torch.no_grad():
        model(x)  # an eval forward changes no state
    model.train()

    assert sdkernels.revert(model) is model
    # the original classes, children (the same objects, the drop paths included, in
    # their registration order), attributes and state
    assert _types(model) == types
    assert _structure(model, rebuilt) == structure
    for q, dp in drop_paths.items():
        assert model.get_submodule(q) is dp
    _assert_state_equal(model, state)
    assert not residual_blocks(model) or all(
        not isinstance(b, ConvertedBlock) for _, b in residual_blocks(model))
    # and the same computation as the original, the package's random drop paths
    # included: the same global RNG draws the same drop-path masks
    for training in (True, False):
        model.train(training), orig.train(training)
        torch.manual_seed(5)
        out = model(x)
        torch.manual_seed(5)
        out_orig = orig(x)
        assert torch.equal(out, out_orig), f"{spec.name}, training={training}"
    # converted again and trained (BatchNorm statistics move), revert keeps the state as
    # it is at that point, and the classes
    sdkernels.convert(model, p_last=0.5, mode="row", seed=2)
    _train_forward(model, *fm.inputs(spec, step=1, batch=spec.row_batch))
    trained = _state(model)
    sdkernels.revert(model)
    assert _types(model) == types
    _assert_state_equal(model, trained)


# -- a training step at p_L = 0.5 skips ------------------------------------------------

def _branch_recorder(model, spec):
    """Forward hooks on a module inside each residual's branch (``spec.branch``): per
    gate, the leading dimension of every call's input."""
    calls = {}
    handles = []
    for b in _converted_blocks(model):
        for i, g in enumerate(gates_of(b)):
            mod = b.get_submodule(spec.branch[i])
            rec = calls.setdefault(id(g), [])
            handles.append(mod.register_forward_hook(
                lambda m, args, out, rec=rec: rec.append(args[0].shape[0])))
    return calls, handles


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("spec", FAMILIES)
def test_training_step_skips_dropped_work(spec, mode):
    """A training step at p_L = 0.5: a dropped residual's branch does not run at all (its
    forward hook does not fire, its parameters get no gradient with
    dropped_grads="none"); in row mode a branch runs once, on the surviving rows only."""
    model = fm.make(spec, dtype=torch.float32)
    sdkernels.convert(model, p_last=0.5, schedule="uniform", mode=mode, seed=11,
                      dropped_grads="none")
    gates = _all_gates(model)
    assert len(gates) >= 2
    calls, handles = _branch_recorder(model, spec)
    batch = spec.row_batch if mode == "row" else 4
    x, y = fm.inputs(spec, dtype=torch.float32, batch=batch)
    # every branch on all rows (eval): the branch module's leading dimension per call
    model.eval()
    with torch.no_grad():
        model(x)
    full = {k: v[0] for k, v in calls.items()}
    assert all(len(v) == 1 for v in calls.values())
    seen = {"dropped": 0, "active": 0, "rows": 0}
    for step in range(6):
        for v in calls.values():
            v.clear()
        model.zero_grad(set_to_none=True)
        x, y = fm.inputs(spec, step=step, dtype=torch.float32, batch=batch)
        loss = _train_forward(model, x, y)
        assert torch.isfinite(loss)
        record = gate_record(model)
        assert len(record) == len(gates)
        for gate, rec_g in zip(gates, record):
            g, rec = gate.last_gate, calls[id(gate)]
            if mode == "batch":
                assert isinstance(g, bool) and g is rec_g
                kept = batch if g else 0
            else:
                assert isinstance(g, torch.Tensor) and g.shape == (batch,) and g.dtype == torch.bool
                assert torch.equal(g, rec_g)
                kept = int(g.sum())
            if kept == 0:
                # the branch did not run at all
                assert rec == [], f"step {step}: a dropped residual's branch ran"
                seen["dropped"] += 1
            elif kept == batch:
                assert rec == [full[id(gate)]]
                seen["active"] += 1
            elif kept < gate.min_rows or (
                    gate.per_sample_branch and batch - kept < gate.gather_min_drop * batch):
                # masked on every row: a BatchNorm branch with one survivor, or too few
                # rows dropped to pay for a gather (GatedResidual.draw)
                assert rec == [full[id(gate)]]
                seen["masked"] = seen.get("masked", 0) + 1
            else:
                # the branch ran once, on the surviving rows only
                assert rec == [full[id(gate)] * kept // batch], (rec, full[id(gate)], kept)
                assert rec[0] < full[id(gate)]
                seen["rows"] += 1
        # dropped_grads="none": a residual whose branch never ran leaves its branch
        # parameters without gradient (no autograd node was made for it); one that ran
        # gives them gradients
        for b in _converted_blocks(model):
            for i, gate in enumerate(gates_of(b)):
                ps = list(b.get_submodule(spec.branch[i]).parameters())
                if not ps:
                    continue
                if calls[id(gate)]:
                    assert any(p.grad is not None for p in ps)
                else:
                    assert all(p.grad is None for p in ps)
        if (seen["dropped"] if mode == "batch" else seen["rows"]) and seen["active"] + seen["rows"]:
            break
    if mode == "batch":
        assert seen["dropped"] > 0, f"no residual was dropped: {seen}"
        assert seen["active"] > 0
    else:
        assert seen["rows"] > 0, f"no residual ran on a subset of rows: {seen}"
    for h in handles:
        h.remove()


class _OneSurvivor(sdkernels.GateGenerator):
    """Row gates with exactly one surviving row (the first); batch gates: active."""

    def batch(self, p):
        return True

    def rows(self, p, n):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[0] = True
        return keep


def test_row_mode_one_survivor_selective_kernel(monkeypatch):
    """A row-mode draw that keeps one row of a SelectiveKernel block trains as the
    original model does with that draw as its drop-path masks.

    SelectiveKernel's attention normalises its pooled [N, C, 1, 1] features with a
    BatchNorm, which refuses one value per channel; any batch size can draw a single
    survivor (probability n p (1-p)^(n-1) per residual and step). A row-mode residual
    whose branch has BatchNorm therefore runs a one-survivor step masked over the whole
    batch (``GatedResidual.min_rows``), and says so once."""
    import sdkernels.residual as residual
    monkeypatch.setattr(residual, "_WARNED_MASKED", set())
    spec = fm.BY_NAME["timm.skresnet18"]
    model = fm.make(spec)
    ref = fm.reference_copy(model)
    queue = []
    for blk in fm.package_blocks(spec, ref).values():
        for slot in dict.fromkeys(spec.drop_slots):
            setattr(blk, slot, _Replay(queue))
    x, y = fm.inputs(spec, batch=8)
    sdkernels.convert(model, p_last=0.5, schedule="uniform", mode="row", scaling="train",
                      seed=0, dropped_grads="zeros")
    gen = _OneSurvivor(0)
    gates = _all_gates(model)
    for g in gates:
        assert g.min_rows == 2
        g.gate_generator = gen
    with pytest.warns(RuntimeWarning, match="single survivor"):
        out = model(x)
    F.cross_entropy(out, y).backward()
    assert all(int(g.last_gate.sum()) == 1 for g in gates)
    queue[:] = [(g.last_gate, g.survival_prob) for g in gates]
    out_ref = ref(x)
    F.cross_entropy(out_ref, y).backward()
    assert queue == []
    _assert_close_rel(out, out_ref, "skresnet18 one survivor output")
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and p_ref.grad is not None, name
        scale = float(p_ref.grad.abs().max())
        assert float((p.grad - p_ref.grad).abs().max()) <= TOL * max(scale, 1e-12), name


# -- at p_L = 0.5 the gated model is the original with those gates as masks --------------

class _Replay(nn.Module):
    """Stands for a package drop path in the reference: applies the next recorded gate of
    the converted model as the mask timm / torchvision would have drawn (x * keep / p)."""

    def __init__(self, queue):
        super().__init__()
        self.queue = queue

    def forward(self, x):
        keep, p = self.queue.pop(0)
        if isinstance(keep, torch.Tensor):
            mask = keep.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        else:
            mask = torch.tensor(float(keep), dtype=x.dtype)
        return x * (mask * (1.0 / p))


def _has_batch_norm(blocks) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in blocks for m in b.modules())


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("spec", FAMILIES)
def test_training_step_equals_the_masked_original(spec, mode):
    """With scaling="train" (timm / torchvision semantics) a training step of the
    converted model at p_L = 0.5 equals the original model whose drop paths apply the
    same gates as masks: outputs and gradients (a dropped branch's being zero). Row mode
    only where the branches hold no BatchNorm (there the branch normalises with the
    surviving rows' statistics by design, sdkernels.residual)."""
    if all(s is None for s in spec.drop_slots):
        pytest.skip(f"{spec.name} has no drop-path module to replay the gates in")
    model = fm.make(spec)
    ref = fm.reference_copy(model)
    if mode == "row" and _has_batch_norm(fm.package_blocks(spec, model).values()):
        pytest.skip("row mode: a branch BatchNorm normalises over the surviving rows only")
    queue = []
    for b in fm.package_blocks(spec, ref).values():
        for slot in dict.fromkeys(spec.drop_slots):  # torchvision Swin: one for both
            setattr(b, slot, _Replay(queue))
    sdkernels.convert(model, p_last=0.5, schedule="uniform", mode=mode, scaling="train",
                      seed=21, dropped_grads="zeros")
    gates = _all_gates(model)
    x, y = fm.inputs(spec, batch=spec.row_batch if mode == "row" else 4)
    for step in range(3):
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        model.train(), ref.train()
        out = model(x)
        F.cross_entropy(out, y).backward()
        queue[:] = [(g.last_gate, g.survival_prob) for g in gates]
        kept = [g.last_gate if isinstance(g.last_gate, bool) else bool(g.last_gate.all())
                for g in gates]
        out_ref = ref(x)
        F.cross_entropy(out_ref, y).backward()
        assert queue == [], "the original applied its drop paths a different number of times"
        if not all(kept):
            break
    assert not all(kept), "nothing was dropped: the comparison would be the one at p = 1"
    _assert_close_rel(out, out_ref, f"{spec.name} ({mode}) output")
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if p_ref.grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert p.grad is not None, name
        scale = float(p_ref.grad.abs().max())
        err = float((p.grad - p_ref.grad).abs().max())
        assert err <= TOL * max(scale, 1e-12) or (scale == 0 and err == 0), \
            f"{spec.name} ({mode}) grad of {name}: {err:.3g} vs {scale:.3g}"


# -- schedule="keep" -------------------------------------------------------------------

def _slot_module(block, slot):
    if slot is None:
        return None
    if slot in block._modules:
        return block._modules[slot]
    return block.__dict__.get(slot)  # timm keeps an absent drop path as a None attribute


@pytest.mark.parametrize("spec", FAMILIES)
def test_schedule_keep_reads_the_models_rates(spec):
    model = fm.make(spec)
    ref = copy.deepcopy(model)
    blocks = fm.package_blocks(spec, model)
    # the package's own per-residual drop rates and modes, read before conversion
    rates = [fm.drop_rate(_slot_module(b, s)) for b in blocks.values() for s in spec.drop_slots]
    modes = [fm.drop_mode(_slot_module(b, s)) for b in blocks.values() for s in spec.drop_slots]
    if any(s is not None for s in spec.drop_slots):
        # a per-gate reading is visible: the rates rise along the network
        assert len(set(rates)) >= 2 and max(rates) > 0, rates
    # converted in eval mode, it stays in eval mode: every module, the gates included
    model.eval()
    sdkernels.convert(model, schedule="keep", seed=0)
    assert not any(m.training for m in model.modules())
    gates = _all_gates(model)
    assert len(gates) == len(rates)
    assert [g.survival_prob for g in gates] == pytest.approx([1 - r for r in rates], abs=1e-12)
    assert [g.mode for g in gates] == [m or "row" for m in modes]
    assert all(g.scaling == "train" for g in gates)
    # inverted scaling: in eval the converted model is the original model (no gate drawn)
    x, _ = fm.inputs(spec)
    ref.eval()
    with torch.no_grad():
        _assert_close_rel(model(x), ref(x), f"{spec.name} eval after schedule='keep'")
    assert all(g.last_gate is None for g in gates)
    # an explicit mode overrides the per-sample default, the rates stay
    other = sdkernels.convert(copy.deepcopy(ref), schedule="keep", mode="batch", seed=0)
    assert [g.survival_prob for g in _all_gates(other)] == pytest.approx([1 - r for r in rates])
    assert all(g.mode == "batch" for g in _all_gates(other))


# -- deepcopy and pickle ---------------------------------------------------------------

@pytest.mark.parametrize("spec", FAMILIES)
def test_deepcopy_and_pickle(spec):
    model = fm.make(spec, dtype=torch.float32)
    sdkernels.convert(model, p_last=0.5, schedule="uniform", mode="row", seed=3)
    x, y = fm.inputs(spec, dtype=torch.float32, batch=spec.row_batch)
    _train_forward(model, x, y)  # a generator that has drawn, gates with a record
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = {"deepcopy": copy.deepcopy(model),
              "pickle": torch.load(buf, weights_only=False)}
    names = [q for q, _ in residual_blocks(model)]
    settings = [(g.survival_prob, g.mode, g.scaling) for g in _all_gates(model)]
    for how, c in copies.items():
        assert _types(c) == _types(model), how
        assert [q for q, _ in residual_blocks(c)] == names
        assert [(g.survival_prob, g.mode, g.scaling) for g in _all_gates(c)] == settings
        gens = generators_of(c)
        assert len(gens) == 1 and gens[0] is not generators_of(model)[0], how
        _assert_state_equal(c, model.state_dict())
    # the same outputs and gates: eval, then training steps from the same gate state
    x2, y2 = fm.inputs(spec, step=1, dtype=torch.float32, batch=spec.row_batch)
    outs = {}
    for how, m in [("model", model)] + list(copies.items()):
        m.eval()
        with torch.no_grad():
            ev = m(x2)
        m.zero_grad(set_to_none=True)
        m.train()
        tr = [m(x2)]
        tr.append(m(x))
        F.cross_entropy(tr[0], y2).backward()
        outs[how] = (ev, tr, [g.clone() for g in gate_record(m)],
                     [p.grad for p in m.parameters()])
    ev, tr, rec, grads = outs.pop("model")
    assert any(not bool(g.all()) for g in rec), "no row was dropped: the gates are not seen"
    for how, (ev_c, tr_c, rec_c, grads_c) in outs.items():
        assert torch.equal(ev_c, ev), how
        assert all(torch.equal(a, b) for a, b in zip(tr_c, tr)), how
        assert all(torch.equal(a, b) for a, b in zip(rec_c, rec)), how
        for a, b in zip(grads_c, grads):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), how
        # a copy reverts to the package's classes
        plain = sdkernels.revert(copies[how])
        assert not any(isinstance(m, (ConvertedBlock, ResidualGate)) for m in plain.modules())


# -- converting twice ------------------------------------------------------------------

@pytest.mark.parametrize("spec", FAMILIES)
def test_converting_twice_is_harmless(spec):
    model = fm.make(spec)
    ref = fm.reference_copy(model)
    types, keys = _types(model), list(model.state_dict())
    bases = {q: type(b) for q, b in fm.package_blocks(spec, model).items()}
    sdkernels.convert(model, p_last=0.5, mode="row", seed=0)
    first = [(q, type(b), [id(g) for g in gates_of(b)]) for q, b in residual_blocks(model)]
    sdkernels.convert(model, p_last=1.0, schedule="uniform", seed=1)
    second = [(q, type(b), [id(g) for g in gates_of(b)]) for q, b in residual_blocks(model)]
    assert second == first  # the same blocks, classes and gates: nothing wrapped twice
    for q, b in residual_blocks(model):
        if isinstance(b, ConvertedBlock):
            assert type(b).__bases__ == (ConvertedBlock, bases[q]), q
            assert type(b).__name__ == f"Gated{bases[q].__name__}"
        else:  # a fused sdkernels ResNet block
            assert type(b) is getattr(sdkernels, bases[q].__name__)
    gates = _all_gates(model)
    assert all((g.survival_prob, g.mode) == (1.0, "batch") for g in gates)
    assert len(generators_of(model)) == 1
    assert list(model.state_dict()) == keys
    x, y = fm.inputs(spec)
    model.train(), ref.train()
    _assert_close_rel(model(x), ref(x), f"{spec.name} after two conversions")
    sdkernels.revert(model)
    assert _types(model) == types


# -- hooks -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", FAMILIES)
def test_hooks_registered_before_conversion_fire(spec):
    model = fm.make(spec, dtype=torch.float32)
    blocks = fm.package_blocks(spec, model)
    pre, post, inner = [], [], []
    for q, b in blocks.items():
        b.register_forward_pre_hook(lambda m, args, q=q: pre.append((q, args[0].shape)))
        b.register_forward_hook(lambda m, args, out, q=q: post.append((q, out.shape)))
        b.get_submodule(spec.branch[0]).register_forward_hook(
            lambda m, args, out, q=q: inner.append(q))
    x, y = fm.inputs(spec, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        model(x)
    want_pre, want_post, want_inner = list(pre), list(post), list(inner)
    assert len(want_pre) == len(blocks) and len(want_inner) >= len(blocks)
    sdkernels.convert(model, p_last=1.0, seed=0)
    for training in (False, True):
        pre.clear(), post.clear(), inner.clear()
        model.train(training)
        model(x)
        assert pre == want_pre and post == want_post and inner == want_inner, training


def test_hooks_on_identity_children_fire():
    """timm's ViT keeps ls1/ls2 as nn.Identity without layer scale; the converted block
    skips an identity, unless a hook on it must see the call."""
    import timm
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3).double()
    model = copy.deepcopy(ref)
    calls = []
    for tag, m in (("ref", ref), ("converted", model)):
        m.blocks[1].ls1.register_forward_hook(
            lambda mod, a, o, tag=tag: calls.append(tag) or o * 0.5)
    sdkernels.convert(model, p_last=1.0, seed=0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (False, True):
        calls.clear()
        _assert_close_rel(model.train(training)(x), ref.train(training)(x), "hooked ls1")
        assert sorted(calls) == ["converted", "ref"]


@pytest.mark.parametrize("child", ["act1", "act2", "aa", "drop_block"])
def test_hooks_on_timm_resnet_children_the_drop_in_block_drops_run(child):
    """A timm ResNet block converts to the fused drop-in block, which calls neither its
    activations nor its (inactive) aa/drop_block; with a hook on one of them it converts
    as a family instead, whose forward calls them."""
    import timm
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=3).double()
    model = copy.deepcopy(ref)
    calls = []
    for tag, m in (("ref", ref), ("converted", model)):
        m.layer1[0].get_submodule(child).register_forward_hook(
            lambda mod, a, o, tag=tag: calls.append(tag) or o * 0.5 + 1)
    sdkernels.convert(model, p_last=1.0, seed=0)
    assert isinstance(model.layer1[0], ConvertedBlock)
    assert isinstance(model.layer1[1], sdkernels.BasicBlock)  # no hook: the fused block
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for training in (False, True):
        calls.clear()
        _assert_close_rel(model.train(training)(x), ref.train(training)(x), f"hooked {child}")
        assert sorted(calls) == ["converted", "ref"]


def test_a_family_block_registered_twice_is_refused():
    import timm
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, drop_path_rate=0.2,
                            num_classes=3)
    vit.blocks[1] = vit.blocks[0]
    _assert_refused(vit, r"'blocks\.1'.*same module as 'blocks\.0'")


# -- what cannot be made exact is refused, naming the module ---------------------------

def _assert_refused(model, match):
    types, state = _types(model), _state(model)
    with pytest.raises(ValueError, match=match):
        sdkernels.convert(model, p_last=0.5)
    # nothing was converted before the error: the model is the one given
    assert _types(model) == types
    _assert_state_equal(model, state)


@pytest.mark.parametrize("arch", ["resnet18", "seresnet50"])
def test_active_drop_block_is_refused(arch):
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=10, layers=(1, 1, 1, 1),
                              drop_block_rate=0.1, drop_path_rate=0.1)
    assert type(model.layer3[0].drop_block).__name__ == "DropBlock2d"
    _assert_refused(model, r"'layer3\.0'.*drop_block")
    # without DropBlock the same model converts
    timm.create_model(arch, pretrained=False, num_classes=10, layers=(1, 1, 1, 1),
                      drop_path_rate=0.1)
    sdkernels.convert(timm.create_model(arch, pretrained=False, num_classes=10,
                                        layers=(1, 1, 1, 1), drop_path_rate=0.1))


def _post_norm_layer_scale_block():
    from timm.layers import LayerScale
    from timm.models.vision_transformer import ResPostBlock

    class PostNormLayerScale(ResPostBlock):
        """A ResPostBlock-like post-norm block with layer scale (norm, then scale)."""

        def __init__(self, dim, *args, **kwargs):
            super().__init__(dim, *args, **kwargs)
            self.ls1 = LayerScale(dim, 0.1)
            self.ls2 = LayerScale(dim, 0.1)

        def forward(self, x, attn_mask=None, is_causal=False):
            x = x + self.drop_path1(self.ls1(self.norm1(self.attn(x, attn_mask=attn_mask))))
            return x + self.drop_path2(self.ls2(self.norm2(self.mlp(x))))

    return PostNormLayerScale


def test_post_norm_block_with_layer_scale_is_refused():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                              drop_path_rate=0.1, block_fn=_post_norm_layer_scale_block())
    model(torch.randn(1, 3, 32, 32))  # a working model
    _assert_refused(model, r"'blocks\.0'.*PostNormLayerScale.*layer scale")


class _UnknownResidual(nn.Module):
    """A residual block of no known layout, with a package drop path under a name that
    does not say so."""

    def __init__(self, drop):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.skipper = drop

    def forward(self, x):
        return x + self.skipper(self.conv(x))


@pytest.mark.parametrize("package", ["timm", "torchvision"])
def test_unknown_block_with_a_drop_path_is_refused(package):
    if package == "timm":
        from timm.layers import DropPath
        drop = DropPath(0.1)
    else:
        from torchvision.ops import StochasticDepth
        drop = StochasticDepth(0.1, "row")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                          nn.Sequential(nn.ReLU(), _UnknownResidual(drop)))
    _assert_refused(model, r"'1\.1'.*_UnknownResidual")
    # also when the unknown block sits in a real model that otherwise converts
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                            drop_path_rate=0.1)
    vit.norm_pre = nn.Sequential(_UnknownResidual(drop))
    _assert_refused(vit, r"'norm_pre\.0'.*_UnknownResidual")
    # and a known block with an unknown extra child no longer has a known layout
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                            drop_path_rate=0.1)
    vit.blocks[1].add_module("extra", nn.Linear(4, 4))
    _assert_refused(vit, r"'blocks\.1'.*Block")


def test_keep_without_scale_by_keep_is_refused():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                              drop_path_rate=0.2)
    model.blocks[1].drop_path2.scale_by_keep = False
    with pytest.raises(ValueError, match=r"'blocks\.1'.*scale_by_keep"):
        sdkernels.convert(model, schedule="keep")
    assert not residual_blocks(model) or not any(
        isinstance(b, ConvertedBlock) for _, b in residual_blocks(model))
    sdkernels.convert(model, schedule="keep", scaling="test")  # an explicit choice converts


def _forward_reads(cls):
    code = cls.forward.__code__
    return set(code.co_names), set(code.co_varnames[2:code.co_argcount + code.co_kwonlyargcount])


def test_family_forward_names_cover_the_packages_blocks():
    """Each family's ``names``/``args`` (what a block's own forward may read) cover the
    real timm / torchvision classes it converts: a package update that makes a forward
    read something new is refused by convert, and shows up here first."""
    from timm.models import (_efficientnet_blocks as eb, beit, convnext, eva, regnet, resnet,
                             resnetv2, sknet, swin_transformer as sw,
                             swin_transformer_v2 as sw2, vision_transformer as vt)
    import torchvision.models.convnext as tv_convnext
    import torchvision.models.efficientnet as tv_eff
    import torchvision.models.regnet as tv_regnet
    import torchvision.models.swin_transformer as tv_swin
    import torchvision.models.vision_transformer as tv_vit
    from sdkernels.families import FAMILIES
    by_name = {f.name: f for f in FAMILIES}
    classes = {
        "timm ResNet block (SE/attention/anti-aliasing)": [resnet.BasicBlock, resnet.Bottleneck],
        "timm SelectiveKernel block": [sknet.SelectiveKernelBasic, sknet.SelectiveKernelBottleneck],
        "timm ResNetV2 pre-activation block": [resnetv2.PreActBasic, resnetv2.PreActBottleneck],
        "timm ResNetV2 bottleneck": [resnetv2.Bottleneck],
        "timm RegNet block": [regnet.Bottleneck],
        "timm RegNet pre-activation block": [regnet.PreBottleneck],
        "timm ConvNeXt block": [convnext.ConvNeXtBlock],
        "transformer block (timm ViT/DeiT/BEiT/EVA/Swin)": [
            vt.Block, vt.ResPostBlock, beit.Block, eva.EvaBlock, eva.EvaBlockPostNorm,
            sw.SwinTransformerBlock, sw2.SwinTransformerV2Block],
        "torchvision Swin block": [tv_swin.SwinTransformerBlock, tv_swin.SwinTransformerBlockV2],
        "torchvision ViT encoder block": [tv_vit.EncoderBlock],
        "timm inverted residual": [eb.InvertedResidual],
        "timm depthwise-separable block": [eb.DepthwiseSeparableConv],
        "timm edge residual": [eb.EdgeResidual],
        "timm ConvBnAct": [eb.ConvBnAct],
        "torchvision ConvNeXt / EfficientNet block": [tv_convnext.CNBlock, tv_eff.MBConv,
                                                      tv_eff.FusedMBConv],
        "torchvision RegNet block": [tv_regnet.ResBottleneckBlock],
    }
    assert set(classes) == set(by_name)
    for name, clss in classes.items():
        for cls in clss:
            reads, args = _forward_reads(cls)
            assert reads <= by_name[name].names, (name, cls, reads - by_name[name].names)
            assert args <= by_name[name].args, (name, cls, args - by_name[name].args)


def test_timm_lookalike_transformer_blocks_are_refused():
    """timm blocks with a ViT block's children but another forward (windowed attention,
    a second input) are refused, naming the module, instead of converted wrongly."""
    from timm.models import pvt_v2, vision_transformer_sam as sam
    for block in (sam.Block(16, 2, window_size=2), pvt_v2.Block(16, 2)):
        model = torch.nn.Sequential(block)
        with pytest.raises(ValueError, match=rf"'0'.*{type(block).__name__}.*does not reproduce"):
            sdkernels.convert(model)
