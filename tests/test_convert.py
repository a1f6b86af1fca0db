"""Converting ResNets to stochastic depth and back (design §6).

The real torchvision and timm models run (on CPU, random init, nothing downloaded)
where those packages are installed: CI's CUDA-torch environment. Without them (CI's
CPU environment) those cases skip, and the timm-layout cases use the look-alikes in
``_thirdparty``.
"""
import copy
import pickle

import pytest
import torch
from torch import nn

import sdkernels
from sdkernels.models import resnet as tv
from sdkernels.models.cifar import OptionAShortcut

from _thirdparty import (HAVE_TIMM, CifarLikeResNet, DropPath, PreActBlock, TimmBasicBlock,
                         TimmBottleneck, TimmDropPath, timm_resnet, timm_resnet_module)

BACKENDS = ["reference"] + (["extension"] if sdkernels.ops.extension.is_available() else [])


def _torchvision(arch):
    # weights=None is torchvision's default: random init, no download.
    return getattr(pytest.importorskip("torchvision").models, arch)(num_classes=10)


def _timm(arch, **kw):
    return pytest.importorskip("timm").create_model(arch, pretrained=False, num_classes=10,
                                                    **kw)


def _models():
    # tv_*: sdkernels' torchvision-compatible copy; torchvision.* / timm.*: the real
    # packages (skipped where not installed); timm_basic / timm_bottleneck: small real
    # timm ResNets, or the look-alikes without timm.
    return {
        "tv_resnet18": lambda: tv.resnet18(num_classes=10),
        "tv_resnet50": lambda: tv.resnet50(num_classes=10),
        "torchvision.resnet18": lambda: _torchvision("resnet18"),
        "torchvision.resnet50": lambda: _torchvision("resnet50"),
        "timm.resnet50": lambda: _timm("resnet50", drop_path_rate=0.1),
        "timm_basic": lambda: timm_resnet("basic", drop_path_rate=0.2),
        "timm_bottleneck": lambda: timm_resnet("bottleneck", drop_path_rate=0.2),
        "cifar_optA": lambda: CifarLikeResNet("A"),
        "cifar_optB": lambda: CifarLikeResNet("B"),
        "sdk_cifar20_plain": lambda: sdkernels.revert(sdkernels.models.cifar_resnet(20, p_last=1.0)),
    }


# Models built from torchvision or timm (real, or the timm look-alikes without timm): CI
# runs the tests marked `thirdparty` again in its environment with those packages.
_THIRDPARTY = ("torchvision.", "timm")


# The real ResNet-50s are the slow cases (float64 on CPU): they run with "test" scaling
# only. At p=1 the scaling changes no value; its "train" path through the same sdkernels
# Bottleneck is covered by tv_resnet50 and timm_bottleneck.
_ONE_SCALING = ("torchvision.resnet50", "timm.resnet50")


def _model_params():
    return [pytest.param(n, marks=pytest.mark.thirdparty) if n.startswith(_THIRDPARTY) else n
            for n in _models()]


def _p1_params():
    return [pytest.param(scaling, n, id=f"{scaling}-{n}",
                         marks=[pytest.mark.thirdparty] if n.startswith(_THIRDPARTY) else [])
            for scaling in ("test", "train") for n in _models()
            if scaling == "test" or n not in _ONE_SCALING]


def _perturb_bn(model):
    # Non-trivial BN affine parameters and running statistics, so equality tests see them.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _close(a, b, rel=1e-8):
    # Relative to the tensor's largest magnitude: deep nets with BN over tiny spatial
    # sizes amplify float64 rounding, so per-element rtol is the wrong yardstick.
    # (ResNet-50 at 32x32 normalises layer4 over N*H*W = 3 values: parameter gradients
    # differed by up to 2e-9 relative on an AVX2-only AMD CPU, with the fused path and
    # with the module path alike, so 1e-9 was a property of the machine, not the code.)
    assert a.shape == b.shape
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= rel * max(b.abs().max().item() if b.numel() else 0.0, 1e-30), err


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_state_equal(a, b, tol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scaling, name", _p1_params())
def test_p1_equals_original_train_and_eval(name, backend, scaling):
    torch.manual_seed(0)
    orig = _perturb_bn(_models()[name]().double())
    for m in orig.modules():  # the original's own DropPath is random: off for equality
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    conv = sdkernels.convert(orig, p_last=1.0, scaling=scaling, inplace=False, seed=3)
    size = 32 if name.startswith(("tv_", "torchvision.", "timm")) else 16
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    with sdkernels.use_backend(backend):
        for training in (True, False):
            orig.train(training)
            conv.train(training)
            for m in (orig, conv):
                m.zero_grad(set_to_none=True)
            xo, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
            yo, yc = orig(xo), conv(xc)
            _close(yc, yo)
            w = torch.randn_like(yo)
            (yo * w).sum().backward()
            (yc * w).sum().backward()
            _close(xc.grad, xo.grad)
            go, gc = _grads(orig), _grads(conv)
            assert go.keys() == gc.keys()
            for k in go:
                _close(gc[k], go[k])
            _assert_state_equal(conv, orig, 1e-10)  # running stats moved alike in training


@pytest.mark.parametrize("name", _model_params())
def test_revert_restores_classes_and_state(name):
    orig = _models()[name]()
    before = copy.deepcopy(orig.state_dict())
    classes = [type(m) for m in orig.modules()]
    conv = sdkernels.convert(orig, p_last=0.5, inplace=False)
    assert any(isinstance(m, sdkernels.StochasticDepthBlock) for m in conv.modules())
    _assert_state_equal(conv, orig)
    plain = sdkernels.revert(conv)
    assert not any(isinstance(m, sdkernels.StochasticDepthBlock) for m in plain.modules())
    assert [type(m) for m in plain.modules()] == classes
    assert list(plain.state_dict()) == list(before)
    for k in before:
        assert torch.equal(plain.state_dict()[k], before[k])
    # the reverted model runs and matches the original
    x = torch.randn(2, 3, 32, 32)
    orig.eval(), plain.eval()
    torch.testing.assert_close(plain(x), orig(x))


def test_convert_in_place_keeps_parameter_identity():
    model = tv.resnet18(num_classes=10)
    params = {id(p) for p in model.parameters()}
    out = sdkernels.convert(model)
    assert out is model
    assert {id(p) for p in model.parameters()} == params


def test_convert_copy_leaves_original_alone():
    model = tv.resnet18(num_classes=10)
    conv = sdkernels.convert(model, inplace=False)
    assert conv is not model
    assert not any(isinstance(m, sdkernels.StochasticDepthBlock) for m in model.modules())


def test_numbering_and_schedule_in_forward_order():
    model = sdkernels.convert(tv.resnet50(num_classes=10), p_last=0.5, schedule="linear")
    blocks = [m for m in model.modules() if isinstance(m, sdkernels.StochasticDepthBlock)]
    assert len(blocks) == 16
    assert [b.survival_prob for b in blocks] == pytest.approx(sdkernels.survival_probs(16, 0.5))
    assert blocks[-1].survival_prob == pytest.approx(0.5)
    assert isinstance(blocks[0], sdkernels.Bottleneck)
    assert len({id(b.gate_generator) for b in blocks}) == 1


def test_convert_twice_is_harmless():
    model = sdkernels.convert(tv.resnet18(num_classes=10), p_last=0.5)
    blocks = [m for m in model.modules() if isinstance(m, sdkernels.StochasticDepthBlock)]
    state = copy.deepcopy(model.state_dict())
    again = sdkernels.convert(model, p_last=0.8, schedule="uniform", mode="row", scaling="train")
    blocks2 = [m for m in again.modules() if isinstance(m, sdkernels.StochasticDepthBlock)]
    assert [id(b) for b in blocks2] == [id(b) for b in blocks]
    assert all(b.survival_prob == 0.8 and b.mode == "row" and b.scaling == "train" for b in blocks2)
    for k, v in again.state_dict().items():
        assert torch.equal(v, state[k])
    plain = sdkernels.revert(again)
    assert type(plain.layer1[0]) is tv.BasicBlock


@pytest.mark.thirdparty
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_timm_drop_path_is_replaced_and_restored(block):
    model = timm_resnet(block, drop_path_rate=0.3)
    names = [q for q, m in model.named_modules() if hasattr(m, "drop_path")]
    dps = {q: model.get_submodule(q).drop_path for q in names}
    assert sum(isinstance(d, nn.Module) for d in dps.values()) >= 3
    conv = sdkernels.convert(model, p_last=0.5)
    for q in names:
        assert isinstance(conv.get_submodule(q), sdkernels.StochasticDepthBlock)
        assert "drop_path" not in conv.get_submodule(q)._modules
    assert not any(type(m).__name__ == "DropPath" for m in conv.modules())
    plain = sdkernels.revert(conv)
    for q, dp in dps.items():
        assert plain.get_submodule(q).drop_path is dp


@pytest.mark.thirdparty
@pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed: nothing to compare the "
                    "look-alikes with")
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_timm_lookalikes_match_real_timm(block):
    # The look-alikes stand in for timm where it is not installed (CPU CI): same child
    # names, registration order, child types, state_dict keys and forward math.
    fake_cls, real_cls = ((TimmBasicBlock, timm_resnet_module.BasicBlock) if block == "basic"
                          else (TimmBottleneck, timm_resnet_module.Bottleneck))
    inplanes, planes = 32, 16
    out = planes * real_cls.expansion

    def down():
        return nn.Sequential(nn.Conv2d(inplanes, out, 1, 2, bias=False), nn.BatchNorm2d(out))

    fake = fake_cls(inplanes, planes, 2, down(), DropPath(0.0)).double()
    real = real_cls(inplanes, planes, 2, down(), drop_path=TimmDropPath(0.0)).double()
    assert list(fake._modules) == list(real._modules)
    assert [type(c) for c in fake._modules.values() if not isinstance(c, DropPath)] == \
        [type(c) for c in real._modules.values() if not isinstance(c, TimmDropPath)]
    _perturb_bn(real)
    fake.load_state_dict(real.state_dict())
    assert list(fake.state_dict()) == list(real.state_dict())
    x = torch.randn(3, inplanes, 8, 8, dtype=torch.float64)
    for training in (True, False):
        fake.train(training), real.train(training)
        torch.testing.assert_close(fake(x.clone()), real(x.clone()), rtol=1e-12, atol=1e-12)


def test_explicit_schedule_list():
    model = sdkernels.convert(CifarLikeResNet(), schedule=[1.0, 0.9, 0.8, 0.7])
    assert [m.survival_prob for m in model.modules()
            if isinstance(m, sdkernels.StochasticDepthBlock)] == [1.0, 0.9, 0.8, 0.7]
    with pytest.raises(ValueError, match="4 blocks"):
        sdkernels.convert(CifarLikeResNet(), schedule=[1.0, 0.9])


class _ActiveDropBlock(nn.Module):
    """Stands for timm's DropBlock2d with a non-zero rate (random per sample)."""

    drop_prob = 0.1

    def forward(self, x):
        return x


@pytest.mark.thirdparty
def test_unsupported_block_names_the_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(PreActBlock(8)))
    with pytest.raises(ValueError, match=r"'1\.0'.*PreActBlock"):
        sdkernels.convert(model)
    # SE blocks convert (sdkernels.families); an active DropBlock cannot be exact
    sdkernels.convert(timm_resnet("basic", se=True))
    model = timm_resnet("basic")
    qual, block = sdkernels.residual_blocks(model)[0]
    block.drop_block = _ActiveDropBlock()
    with pytest.raises(ValueError, match=rf"'{qual}'.*drop_block"):
        sdkernels.convert(model)


def test_family_converted_in_eval_mode_stays_in_eval_mode():
    """A block converted by sdkernels.families (here a timm-layout SE ResNet) keeps the
    mode it had: its gates are in eval mode too, so eval output is the original's."""
    torch.manual_seed(0)
    model = timm_resnet("basic", se=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    sdkernels.convert(model, p_last=1.0, schedule="uniform")
    gates = [g for _, b in sdkernels.residual_blocks(model) for g in sdkernels.gates_of(b)]
    assert gates and not any(g.training for g in gates)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


class _DropPath(nn.Module):
    """timm's DropPath contract (drop_prob, scale_by_keep), without its randomness."""

    def __init__(self, p=0.1):
        super().__init__()
        self.drop_prob, self.scale_by_keep = p, True

    def forward(self, x):
        return x


class _ViTBlock(nn.Module):
    """timm's pre-norm ViT Block layout and forward, small."""

    def __init__(self, dim=8):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.ls1, self.drop_path1 = nn.Identity(), _DropPath()
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Linear(dim, dim)
        self.ls2, self.drop_path2 = nn.Identity(), _DropPath()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class _WindowedBlock(_ViTBlock):
    """The same children, another forward (windowed attention, as timm's SAM blocks)."""

    window_size = 2

    def forward(self, x):
        n, length, c = x.shape
        w = x.reshape(n * length // self.window_size, self.window_size, c)
        x = x + self.drop_path1(self.attn(self.norm1(w)).reshape(n, length, c))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def test_same_children_other_forward_is_refused():
    model = nn.Sequential(_ViTBlock(), _WindowedBlock())
    with pytest.raises(ValueError, match=r"'1'.*_WindowedBlock.*window_size"):
        sdkernels.convert(model)
    assert type(model[1]) is _WindowedBlock  # refused before anything was converted


def test_revert_restores_drop_paths_in_the_model_mode():
    model = nn.Sequential(_ViTBlock(), _ViTBlock())
    originals = [model[0].drop_path1, model[1].drop_path2]
    sdkernels.convert(model, schedule="keep")
    model.eval()  # after conversion: does not reach the stashed drop paths
    sdkernels.revert(model)
    assert model[0].drop_path1 is originals[0] and model[1].drop_path2 is originals[1]
    assert not any(m.training for m in model.modules())


def test_converted_blocks_store_a_stable_family_key_and_read_old_pickles():
    # the converted block keeps its family's key (not the display name, which may be
    # reworded); blocks pickled when it was the display name still run and revert
    from sdkernels.families import FAMILIES, ConvertedBlock
    torch.manual_seed(0)
    model = nn.Sequential(_ViTBlock(), _ViTBlock()).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        before = model(x)
    sdkernels.convert(model, schedule="keep")
    fam = next(f for f in FAMILIES if f.key == model[0]._sd_family)
    assert fam.key == "transformer" and isinstance(model[0], ConvertedBlock)
    assert type(model[0]).__name__ == "Gated_ViTBlock"
    model[1]._sd_family = fam.name  # as stored before keys
    old = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(old(x), before, rtol=0, atol=0)
    assert len(old[1].sd_gates()) == 2 and old[1]._sd_family == "transformer"
    sdkernels.revert(old)
    assert [type(b) for b in old] == [_ViTBlock, _ViTBlock]
    # a pickle naming a family this version lacks loads (and reverts), and its forward
    # raises a ValueError that names the family
    model[0]._sd_family = "no.such.family"
    unknown = pickle.loads(pickle.dumps(model))
    with pytest.raises(ValueError, match="no.such.family"):
        unknown(x)


def test_no_residual_blocks_is_an_error():
    with pytest.raises(ValueError, match="no residual blocks.*Sequential"):
        sdkernels.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="not a block"):
        sdkernels.convert(tv.BasicBlock(8, 8))
    with pytest.raises(TypeError):
        sdkernels.convert("resnet")


@pytest.mark.parametrize("kw, match", [
    ({"p_last": 0.0}, "p_last"), ({"p_last": 1.5}, "p_last"), ({"mode": "rows"}, "mode"),
    ({"scaling": "inverted"}, "scaling"), ({"schedule": "cosine"}, "schedule"),
    ({"dropped_grads": "maybe"}, "dropped_grads"),
])
def test_convert_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        sdkernels.convert(tv.resnet18(num_classes=10), **kw)


def test_revert_single_block_built_directly():
    b = sdkernels.BasicBlock(16, 32, 2, OptionAShortcut(16, 32), survival_prob=0.5)
    plain = sdkernels.revert(b)
    assert type(plain) is tv.BasicBlock
    assert list(plain.state_dict()) == list(b.state_dict())
    x = torch.rand(2, 16, 8, 8)
    b.eval(), plain.eval()
    # eval, "test" scaling at p=0.5 differs from the plain block; at p=1 they agree
    b.survival_prob = 1.0
    torch.testing.assert_close(plain(x), b(x))


@pytest.mark.thirdparty
@pytest.mark.parametrize("name, n_blocks, kind", [
    ("torchvision.resnet18", 8, "BasicBlock"),
    ("torchvision.resnet50", 16, "Bottleneck"),
    ("timm.resnet50", 16, "Bottleneck"),
])
def test_real_models_convert_every_block_and_revert(name, n_blocks, kind):
    # The real packages' models (equality at p=1 and the state_dict round trip are
    # checked for them above): every block converts, and revert brings back the
    # package's own block class with its attributes (timm's DropPath included).
    orig = _models()[name]()
    real_cls = type(getattr(orig, "layer1")[0])
    assert real_cls.__name__ == kind
    assert real_cls.__module__.split(".")[0] in ("torchvision", "timm")
    originals = {q: m for q, m in orig.named_modules() if type(m) is real_cls}
    assert len(originals) == n_blocks
    drop_paths = {q: getattr(m, "drop_path", None) for q, m in originals.items()}
    if name.startswith("timm"):
        assert sum(isinstance(d, nn.Module) for d in drop_paths.values()) == n_blocks - 1
    conv = sdkernels.convert(orig, p_last=0.5)
    blocks = [m for m in conv.modules() if isinstance(m, sdkernels.StochasticDepthBlock)]
    assert len(blocks) == n_blocks
    assert all(type(b) is getattr(sdkernels, kind) for b in blocks)
    assert blocks[-1].survival_prob == pytest.approx(0.5)
    assert not any(type(m) is real_cls or type(m).__name__ == "DropPath" for m in conv.modules())
    plain = sdkernels.revert(conv)
    assert [q for q, m in plain.named_modules() if type(m) is real_cls] == list(originals)
    for q, dp in drop_paths.items():
        assert getattr(plain.get_submodule(q), "drop_path", None) is dp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("where", ["layer2.0.bn2", "layer2.0.relu", "layer2.0.downsample",
                                   "layer2.0.downsample.1"])
def test_hooks_on_any_module_of_a_converted_block_run(where, training, backend):
    """A hook that changes a block's submodule output (the last BN, the ReLU after the
    add, the projection shortcut that eval would fold) changes the converted model as it
    changes the original: with hooks present the block runs its modules."""
    torch.manual_seed(0)
    ref = tv.resnet18(num_classes=10).double().train(training)
    model = copy.deepcopy(ref)
    calls = {"ref": 0, "converted": 0}

    def hook(tag):
        def h(mod, args, out):
            calls[tag] += 1
            return out * 0.5 + 1
        return h
    ref.get_submodule(where).register_forward_hook(hook("ref"))
    model.get_submodule(where).register_forward_hook(hook("converted"))
    sdkernels.convert(model, p_last=1.0, seed=0)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with sdkernels.use_backend(backend):
        out = model(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-9, atol=1e-9)
    assert calls["converted"] == calls["ref"] > 0


def test_a_block_registered_twice_is_refused_and_nothing_changes():
    model = tv.resnet18(num_classes=10)
    model.layer1[1] = model.layer1[0]  # one block under two names: shared weights
    types = [(q, type(m)) for q, m in model.named_modules(remove_duplicate=False)]
    with pytest.raises(ValueError, match=r"'layer1\.1'.*same module as 'layer1\.0'"):
        sdkernels.convert(model, p_last=0.5)
    assert [(q, type(m)) for q, m in model.named_modules(remove_duplicate=False)] == types


def test_convert_keeps_eval_mode_and_hooks():
    model = tv.resnet18(num_classes=10).eval()
    calls = []
    model.layer1[0].register_forward_hook(lambda *a: calls.append(1))
    sdkernels.convert(model, p_last=0.5, seed=0)
    assert all(not m.training for m in model.modules())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)  # eval is deterministic: no gates drawn
    assert len(calls) == 2
    assert not any(not m.training for m in sdkernels.revert(model).train().modules())
