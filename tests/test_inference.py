"""The folded eval path (``sdkernels.ops.folding``, ``ops.folded_eval``): math, executors,
cache invalidation."""
import copy

import pytest
import torch
from torch import nn

import sdkernels
from sdkernels.ops import folding
from sdkernels.models.cifar import OptionAShortcut

HAVE_EXT = sdkernels.ops.extension.is_available()
ext_only = pytest.mark.skipif(not HAVE_EXT, reason="compiled extension not built")


def _randomise(block):
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return block.eval()


def _block(kind, shortcut, **kw):
    if kind == "basic":
        down = {"identity": None, "optionA": OptionAShortcut(8, 16),
                "projection": nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False),
                                            nn.BatchNorm2d(16))}[shortcut]
        b = sdkernels.BasicBlock(8, 8 if down is None else 16, 1 if down is None else 2, down, **kw)
    else:
        down = {"identity": None, "optionA": OptionAShortcut(16, 32),
                "projection": nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False),
                                            nn.BatchNorm2d(32))}[shortcut]
        b = sdkernels.Bottleneck(32 if down is None else 16, 8, 1 if down is None else 2, down, **kw)
    return _randomise(b)


def test_fold_conv_bn_equals_conv_then_bn():
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=True).double()
    bn = _randomise(nn.BatchNorm2d(7).double())
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    w, b = folding.fold_conv_bn(conv.weight, bn, 0.3, conv.bias)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b, padding=1), 0.3 * bn(conv(x)))


@ext_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("shortcut", ["identity", "optionA", "projection"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("scaling", ["test", "train"])
def test_eval_matches_module_path(kind, shortcut, fmt, dtype, scaling):
    block = _block(kind, shortcut, survival_prob=0.6, scaling=scaling).double()
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    x64 = torch.rand(3, block.conv1.in_channels, 9, 7, dtype=torch.float64)
    with torch.no_grad(), sdkernels.use_backend("reference"):
        exact = block(x64)
    lowp = copy.deepcopy(block).to(dtype)
    x = x64.to(dtype).contiguous(memory_format=mf)
    with torch.no_grad():
        with sdkernels.use_backend("reference"):
            eager = lowp(x)
        with sdkernels.use_backend("extension"):
            fused = lowp(x)
    assert fused.dtype == dtype and fused.is_contiguous(memory_format=torch.channels_last)
    err_eager = (eager.double() - exact).abs().max().item()
    err_fused = (fused.double() - exact).abs().max().item()
    assert err_fused <= 2 * err_eager + 1e-6 * exact.abs().max().item(), (err_fused, err_eager)


@ext_only
def test_cache_reused_and_invalidated():
    block = _block("basic", "projection", survival_prob=0.7)
    x = torch.rand(2, 8, 6, 6)

    def fused():
        with torch.no_grad(), sdkernels.use_backend("extension"):
            return block(x)

    def expected():
        with torch.no_grad(), sdkernels.use_backend("reference"):
            return block(x)
    fused()
    first = block._fold_cache.value
    fused()
    assert block._fold_cache.value is first  # unchanged: reused
    changes = [
        lambda: block.conv1.weight.mul_(1.5),                   # optimizer-style in-place
        lambda: block.bn2.running_var.mul_(2.0),                # BN buffer
        lambda: block.downsample[1].running_mean.add_(0.1),     # projection shortcut's BN
        lambda: block.load_state_dict(_block("basic", "projection").state_dict()),
        lambda: setattr(block, "survival_prob", 0.3),           # gate scale
    ]
    for change in changes:
        with torch.no_grad():
            change()
        out = fused()
        assert block._fold_cache.value is not first
        first = block._fold_cache.value
        torch.testing.assert_close(out, expected(), atol=1e-5, rtol=1e-5)
    # Writes through .data bypass the version counter: clear_cache is the way out.
    block.conv2.weight.data.mul_(0.5)
    folding.clear_cache(block)
    assert block._fold_cache.value is None
    torch.testing.assert_close(fused(), expected(), atol=1e-5, rtol=1e-5)


@ext_only
def test_eval_with_gradients_uses_module_path():
    block = _block("basic", "identity", survival_prob=0.5)
    x = torch.rand(2, 8, 5, 5, requires_grad=True)
    with sdkernels.use_backend("extension"):
        y = block(x)
    y.sum().backward()
    assert block.conv1.weight.grad is not None and x.grad is not None
    assert block._fold_cache.value is None


@ext_only
def test_eval_under_autocast():
    block = _block("basic", "identity", survival_prob=0.5)
    x = torch.rand(2, 8, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with sdkernels.use_backend("extension"):
            y = block(x)
        with sdkernels.use_backend("reference"):
            y_ref = block(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), atol=0.05, rtol=0.05)


@ext_only
def test_whole_model_eval_matches():
    model = sdkernels.models.cifar_resnet(20, p_last=0.5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise(m)
    model.eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        with sdkernels.use_backend("reference"):
            ref = model(x)
        with sdkernels.use_backend("extension"):
            out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# sdkernels::scale_bias_relu_ (the CPU executor's in-place epilogue)

def _sbr_ref(x, scale, bias, residual):
    c = [1, -1] + [1] * (x.dim() - 2)
    v = x.double() * scale.double().reshape(c) + bias.double().reshape(c)
    if residual is not None:
        v = v + residual.double()
    return torch.relu(v)


@ext_only
@pytest.mark.parametrize("with_res", [False, True], ids=["bias_relu", "bias_add_relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,fmt", [((2, 3, 5, 7), "nchw"), ((2, 3, 5, 7), "cl"),
                                       ((1, 16, 13, 1), "cl"), ((3, 5), "nchw"),
                                       ((0, 4, 3, 3), "nchw"), ((2, 64, 8, 8), "cl"),
                                       ((2, 7, 3, 11), "nchw")], ids=str)
def test_scale_bias_relu_inplace(shape, fmt, dtype, with_res):
    mf = torch.channels_last if fmt == "cl" else torch.contiguous_format
    x = torch.randn(shape).to(dtype)
    x = x.contiguous(memory_format=mf) if x.dim() == 4 else x
    c = shape[1]
    scale, bias = torch.rand(c) + 0.5, torch.randn(c) * 0.1
    res = torch.randn(shape).to(dtype) if with_res else None  # NCHW: converted inside
    want = _sbr_ref(x, scale, bias, res)
    ptr, ver = x.data_ptr(), x._version
    assert torch.ops.sdkernels.scale_bias_relu_(x, scale, bias, res) is None
    assert x.data_ptr() == ptr and x._version > ver  # in place, version bumped
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 1e-2)
    torch.testing.assert_close(x.double(), want, atol=tol, rtol=tol)


@ext_only
def test_scale_bias_relu_inplace_residual_is_x_and_errors():
    x = torch.randn(2, 3, 4, 4)
    want = torch.relu(2 * x + 0.5)
    torch.ops.sdkernels.scale_bias_relu_(x, torch.ones(3), torch.full((3,), 0.5), x)
    torch.testing.assert_close(x, want)
    op = "sdkernels::scale_bias_relu_"
    with pytest.raises(RuntimeError, match=f"{op}: expected x dense"):
        torch.ops.sdkernels.scale_bias_relu_(torch.randn(2, 3, 4, 8)[..., ::2], torch.ones(3),
                                             torch.zeros(3))
    with pytest.raises(RuntimeError, match=f"{op}: expected residual with x's shape"):
        torch.ops.sdkernels.scale_bias_relu_(torch.randn(2, 3, 4, 4), torch.ones(3),
                                             torch.zeros(3), torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError, match="sdkernels::scale_bias_relu: expected scale of length"):
        torch.ops.sdkernels.scale_bias_relu_(torch.randn(2, 3, 4, 4), torch.ones(4),
                                             torch.zeros(3))
    with pytest.raises(RuntimeError, match="sdkernels::scale_bias_relu: expected x to be float32"):
        torch.ops.sdkernels.scale_bias_relu_(torch.ones(2, 3, 4, 4, dtype=torch.int32),
                                             torch.ones(3), torch.zeros(3))


@ext_only
@pytest.mark.parametrize("with_res", [False, True])
def test_scale_bias_relu_inplace_opcheck(with_res):
    x = torch.randn(2, 3, 5, 4).contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 3, 5, 4) if with_res else None
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_relu_.default,
                          (x, torch.rand(3) + 0.5, torch.randn(3), res))


@ext_only
def test_scale_bias_relu_inplace_refuses_autograd():
    w = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = w * 1.0
    with pytest.raises(RuntimeError, match="sdkernels::scale_bias_relu_: not differentiable"):
        torch.ops.sdkernels.scale_bias_relu_(y, torch.ones(3), torch.zeros(3))
    with torch.no_grad():
        torch.ops.sdkernels.scale_bias_relu_(y, torch.ones(3), torch.zeros(3))


@ext_only
def test_frozen_eval_model_input_gradients_match_modules():
    """Saliency / adversarial use: frozen eval model, gradient w.r.t. the input."""
    from sdkernels.models import cifar_resnet
    m = cifar_resnet(8, p_last=0.5).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    ref = copy.deepcopy(m)
    x1 = torch.randn(2, 3, 16, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    with sdkernels.use_backend("extension"):
        m(x1).square().sum().backward()
    with sdkernels.use_backend("reference"):
        ref(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
