"""Converting ResNets to stochastic depth and back (DESIGN 6.5)."""
import copy

import pytest
import torch
from torch import nn

import sdkernels
from sdkernels.models import resnet as tv
from sdkernels.models.cifar import OptionAShortcut

from _thirdparty import (CifarLikeResNet, PreActBlock, TimmBottleneck, TimmLikeResNet)

BACKENDS = ["reference"] + (["extension"] if sdkernels.ops.extension.is_available() else [])


def _models():
    return {
        "tv_resnet18": lambda: tv.resnet18(num_classes=10),
        "tv_resnet50": lambda: tv.resnet50(num_classes=10),
        "timm_basic": lambda: TimmLikeResNet(drop_path_rate=0.2),
        "timm_bottleneck": lambda: TimmLikeResNet(block=TimmBottleneck, drop_path_rate=0.2),
        "cifar_optA": lambda: CifarLikeResNet("A"),
        "cifar_optB": lambda: CifarLikeResNet("B"),
        "sdk_cifar20_plain": lambda: sdkernels.revert(sdkernels.models.cifar_resnet(20, p_last=1.0)),
    }


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
@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("scaling", ["test", "train"])
def test_p1_equals_original_train_and_eval(name, backend, scaling):
    torch.manual_seed(0)
    orig = _perturb_bn(_models()[name]().double())
    for m in orig.modules():  # the original's own DropPath is random: off for equality
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    conv = sdkernels.convert(orig, p_last=1.0, scaling=scaling, inplace=False, seed=3)
    size = 32 if "tv_" in name else 16
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


@pytest.mark.parametrize("name", list(_models()))
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


def test_timm_drop_path_is_replaced_and_restored():
    model = TimmLikeResNet(drop_path_rate=0.3)
    dp = model.layer1[0].drop_path
    conv = sdkernels.convert(model, p_last=0.5)
    assert "drop_path" not in conv.layer1[0]._modules
    plain = sdkernels.revert(conv)
    assert plain.layer1[0].drop_path is dp


def test_explicit_schedule_list():
    model = sdkernels.convert(CifarLikeResNet(), schedule=[1.0, 0.9, 0.8, 0.7])
    assert [m.survival_prob for m in model.modules()
            if isinstance(m, sdkernels.StochasticDepthBlock)] == [1.0, 0.9, 0.8, 0.7]
    with pytest.raises(ValueError, match="4 blocks"):
        sdkernels.convert(CifarLikeResNet(), schedule=[1.0, 0.9])


def test_unsupported_block_names_the_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(PreActBlock(8)))
    with pytest.raises(ValueError, match=r"'1\.0'.*PreActBlock"):
        sdkernels.convert(model)
    se = TimmLikeResNet(se=True)
    with pytest.raises(ValueError, match=r"layer1\.0.*se"):
        sdkernels.convert(se)


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


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_real_torchvision_p1_equality(arch):
    torchvision = pytest.importorskip("torchvision")
    orig = getattr(torchvision.models, arch)(num_classes=10).cuda().double()
    _perturb_bn(orig)
    conv = sdkernels.convert(orig, p_last=1.0, inplace=False)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, device="cuda")
    for training in (True, False):
        orig.train(training), conv.train(training)
        torch.testing.assert_close(conv(x), orig(x), rtol=1e-9, atol=1e-9)
    plain = sdkernels.revert(conv)
    assert type(plain.layer1[0]) is type(orig.layer1[0])


@pytest.mark.gpu
def test_real_timm_resnet50_p1_equality():
    timm = pytest.importorskip("timm")
    orig = timm.create_model("resnet50", num_classes=10, drop_path_rate=0.1).cuda().double()
    _perturb_bn(orig)
    conv = sdkernels.convert(orig, p_last=1.0, inplace=False)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, device="cuda")
    orig.eval(), conv.eval()
    torch.testing.assert_close(conv(x), orig(x), rtol=1e-9, atol=1e-9)
    orig.train(), conv.train()
    for m in orig.modules():  # the original's DropPath is random: switch it off to compare
        if type(m).__name__ == "DropPath":
            m.drop_prob = 0.0
    torch.testing.assert_close(conv(x), orig(x), rtol=1e-9, atol=1e-9)


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
