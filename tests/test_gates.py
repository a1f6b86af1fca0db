"""Gates come from a library-owned host generator: seeded, resumable, one draw per step
shared by the ranks of a data-parallel job (batch gates alike, row gates per rank)."""
import copy
import io
import pickle

import pytest
import torch

import sdkernels
from sdkernels.gates import FixedGates, GateGenerator


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


def test_gates_under_fake_tensor_mode_draw_the_same_sequence():
    # The dry run of the CUDA paths runs models under FakeTensorMode (and a recording
    # dispatch mode): the draws must still be real host values from the real generator,
    # the same sequence as without any mode, and nothing of it reaches the modes.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    def draws(g):
        out = [g.batch(0.5) for _ in range(20)]
        keep = g.rows(0.5, 9)
        n, idx = sdkernels.gates.survivors(keep)
        return out, keep.tolist(), n, idx.tolist()

    want = draws(GateGenerator(seed=7))
    g = GateGenerator(seed=7)
    seen = Seen()
    with FakeTensorMode(), seen:
        got = draws(g)
    assert got == want
    assert seen.ops == []
    assert want[2] == sum(want[1]) and want[3] == [i for i, k in enumerate(want[1]) if k]
    # and the generator state moved exactly as it does without modes
    ref = GateGenerator(seed=7)
    draws(ref)
    assert torch.equal(g.state_dict()["state"], ref.state_dict()["state"])


def test_survivors_rejects_device_gates():
    import pytest

    with pytest.raises(ValueError, match="CPU tensor"):
        sdkernels.gates.survivors(torch.ones(3, dtype=torch.bool, device="meta"))


def test_row_gates_of_a_shard_are_its_rows_of_the_global_draw():
    # a distributed job draws row gates for the global batch once per step (the same
    # draw on every rank) and each rank takes its own rows; batch gates stay shared
    class Key:
        pass

    blocks = [Key() for _ in range(3)]

    def step(gen, rows):
        gen.bind(blocks)
        return [gen.gate(i, 0.5, rows) for i in range(2)] + [gen.gate(2, 0.5)]

    whole = step(GateGenerator(7), 8)
    parts = [step(GateGenerator(7, shard=(r, 2)), 4) for r in range(2)]
    for i in range(2):
        assert torch.equal(torch.cat([parts[0][i], parts[1][i]]), whole[i])
    assert parts[0][2] == parts[1][2] == whole[2]
    assert not torch.equal(parts[0][0], parts[1][0]) or not torch.equal(parts[0][1], parts[1][1])
    g = GateGenerator(1, shard=(1, 4))
    # the shard belongs to the process: a copy keeps it, a pickle (another process) not
    assert copy.deepcopy(g).shard == (1, 4) and pickle.loads(pickle.dumps(g)).shard is None
    assert GateGenerator(1).shard is None  # the process group's (0, 1 without one)
    for bad in [(2, 2), (-1, 2), (0, 0), [0, 2], (0.0, 2), (True, 2)]:
        with pytest.raises(ValueError, match="shard"):
            GateGenerator(1, shard=bad)


def test_mixed_batch_and_row_gates_of_one_row_per_shard_differ_across_ranks():
    # a step first asked by a batch gate is drawn for one row and no shard; a row gate
    # of one row per rank must still be its rank's own, not column 0 on every rank
    class Key:
        pass

    blocks = [Key() for _ in range(2)]
    same = 0
    for seed in range(20):
        drawn = []
        for r in range(2):
            gen = GateGenerator(seed, shard=(r, 2))
            gen.bind(blocks)
            gen.gate(0, 0.5)  # batch gate first
            drawn.append(gen.gate(1, 0.5, 1))
        same += bool(torch.equal(drawn[0], drawn[1]))
    assert same < 20  # equal only by chance (about half the time), never always


def test_gates_are_drawn_on_the_host_inside_a_device_context():
    """A model built or run under ``with torch.device(...)`` (factory functions default
    to that device) still draws its gates on the host, from its own CPU generator."""
    gen = GateGenerator(seed=0)
    gen.bind([torch.nn.Module() for _ in range(2)])
    fixed = FixedGates(True)
    with torch.device("meta"):
        rows = gen.rows(0.5, 8)
        batch = gen.batch(0.5)
        stepped = (gen.gate(0, 0.5, 8), gen.gate(1, 0.5))
        unbound = gen.gate(("x", 1), 0.5, 8)
        forced = fixed.rows(0.5, 8)
    for g in (rows, stepped[0], unbound, forced):
        assert g.device.type == "cpu" and g.dtype == torch.bool and g.shape == (8,)
    assert isinstance(batch, bool) and isinstance(stepped[1], bool)
