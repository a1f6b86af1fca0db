"""Gates come from a library-owned host generator: seeded, resumable, rank-identical."""
import copy
import io

import torch

import sdkernels
from sdkernels.gates import GateGenerator


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, sdkernels.StochasticDepthBlock)]


def _run(model, steps, x):
    pattern = []
    with torch.no_grad():
        for _ in range(steps):
            model(x)
            pattern.append(tuple(bool(b.last_gate) for b in _blocks(model)))
    return pattern


def test_same_seed_same_gates_and_independent_of_global_rng():
    x = torch.rand(2, 3, 8, 8)
    a = sdkernels.models.cifar_resnet(20, seed=42)
    b = sdkernels.models.cifar_resnet(20, seed=42)
    torch.manual_seed(1)
    pa = _run(a, 10, x)
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(100)
    pb = _run(b, 10, x)
    assert pa == pb
    assert len(set(pa)) > 1  # fresh gates on every forward
    c = sdkernels.models.cifar_resnet(20, seed=43)
    assert _run(c, 10, x) != pa


def test_gate_state_resume_is_exact():
    x = torch.rand(2, 3, 8, 8)
    model = sdkernels.models.cifar_resnet(20, seed=7)
    _run(model, 3, x)
    state = sdkernels.gate_state(model)
    buf = io.BytesIO()
    torch.save(state, buf)
    expected = _run(model, 5, x)
    fresh = sdkernels.models.cifar_resnet(20, seed=0)
    buf.seek(0)
    sdkernels.load_gate_state(fresh, torch.load(buf))
    assert _run(fresh, 5, x) == expected


def test_deepcopy_and_pickle_carry_the_generator_state():
    model = sdkernels.models.cifar_resnet(20, seed=5)
    x = torch.rand(2, 3, 8, 8)
    _run(model, 2, x)
    twin = copy.deepcopy(model)
    assert _blocks(twin)[0].gate_generator is not _blocks(model)[0].gate_generator
    assert len({id(b.gate_generator) for b in _blocks(twin)}) == 1  # still shared
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ref = _run(model, 4, x)
    assert _run(twin, 4, x) == ref
    assert _run(loaded, 4, x) == ref


def test_row_gates_and_generator_api():
    g = GateGenerator(3)
    rows = g.rows(0.5, 10)
    assert rows.dtype == torch.bool and rows.shape == (10,) and rows.device.type == "cpu"
    g2 = GateGenerator(3)
    assert torch.equal(g2.rows(0.5, 10), rows)
    s = g.state_dict()
    v = [g.batch(0.5) for _ in range(5)]
    g.load_state_dict(s)
    assert [g.batch(0.5) for _ in range(5)] == v


def test_manual_seed_of_default_generator():
    b = sdkernels.BasicBlock(4, 4, survival_prob=0.5)
    x = torch.rand(1, 4, 4, 4)
    sdkernels.manual_seed(0)
    first = [bool((b(x), b.last_gate)[1]) for _ in range(8)]
    sdkernels.manual_seed(0)
    assert [bool((b(x), b.last_gate)[1]) for _ in range(8)] == first


def test_bad_state_is_rejected():
    import pytest
    with pytest.raises(ValueError):
        GateGenerator(0).load_state_dict({"nope": 1})
    with pytest.raises(ValueError, match="generators"):
        sdkernels.load_gate_state(sdkernels.models.cifar_resnet(20), [])
    with pytest.raises(TypeError):
        GateGenerator("seed")
