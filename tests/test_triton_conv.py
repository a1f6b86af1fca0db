"""Triton implicit-GEMM conv kernels (sdkernels.ops.triton) against PyTorch references.

CPU CI runs this file under ``TRITON_INTERPRET=1`` (tiny shapes: the interpreter runs
every program of the grid in Python). On a CUDA machine the same tests run compiled on
the GPU, and the ``gpu``-marked ones add full ResNet shapes and the check of every
autotune config. Without triton, or with neither a GPU nor the interpreter, the whole
file skips with the reason.

Oracle: ``_oracle`` computes what the kernel is specified to compute, in float64, with
the one rounding the kernel does inside (the prologue result is rounded to the
activation dtype before the tensor-core dot, as eager PyTorch's BN output would be);
so fused results are checked to output-rounding accuracy. (The interpreter rounds
fp32 -> bf16 toward zero where the GPU rounds to nearest; the oracle mimics that.)
``test_lowp_error_vs_torch`` checks design §6's rule: fused low-precision error at most
~2x PyTorch's in the same dtype. Triton 3.9's interpreter also gets bf16 ``tl.dot``
wrong (it multiplies bit patterns): the kernel upcasts bf16 operands to fp32 for the
dot under the interpreter only (exact, bf16 products fit fp32).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import EPS, rand_on, basic_convs, bottleneck_convs

from sdkernels.ops import triton as sdtriton

if not sdtriton.is_available():
    pytest.skip(f"Triton kernels unavailable: {sdtriton.unavailable_reason()}",
                allow_module_level=True)

from sdkernels.ops.triton import block as tblock  # noqa: E402
from sdkernels.ops.triton import conv as tconv  # noqa: E402

INTERP = tconv.INTERPRET
DEV = torch.device("cpu" if INTERP else "cuda")
CL = torch.channels_last


_rand = rand_on(DEV)


def _to_dtype_like_kernel(h, dtype):
    """fp32 -> dtype as the kernel rounds: RTNE on GPU; the interpreter (triton 3.9)
    truncates fp32 -> bf16 (round toward zero), so mimic that there."""
    if INTERP and dtype == torch.bfloat16:
        bits = h.float().contiguous().view(torch.int32) & -65536  # clear the low 16 bits
        return bits.view(torch.float32).to(torch.bfloat16)  # exact: now representable
    return h.to(dtype)


def _oracle(x, w, bias=None, stride=1, padding=0, ps=None, pb=None, residual=None,
            mode="none", rs=1, relu=False):
    """(y before output rounding, conv output before bias) in float64, kernel semantics."""
    h = x
    if ps is not None:
        h = torch.relu(x.float() * ps.float().view(1, -1, 1, 1) + pb.float().view(1, -1, 1, 1))
        h = _to_dtype_like_kernel(h, x.dtype)  # the kernel feeds the dot in x's dtype
    conv = F.conv2d(h.double(), w.double(), None, stride, padding)
    y = conv
    if bias is not None:
        y = y + bias.double().view(1, -1, 1, 1)
    if mode == "add":
        y = y + residual.double()
    elif mode == "option_a":
        r = residual[:, :, ::rs, ::rs].double()
        y = y + F.pad(r, (0, 0, 0, 0, 0, y.shape[1] - r.shape[1]))
    if relu:
        y = torch.relu(y)
    return y, conv


def _assert_close_out(got, want64, dtype, what=""):
    """got (dtype) vs the float64 value before rounding: rounding + fp32 accumulation."""
    assert got.dtype == dtype
    assert got.is_contiguous(memory_format=CL), "output must be channels_last"
    assert got.shape == want64.shape
    g = got.double()
    amax = want64.abs().max().item() if want64.numel() else 0.0
    tol = EPS[dtype] * want64.abs() + 1e-4 * (1.0 + amax)
    bad = (g - want64).abs() > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off, "
                           f"max err {(g - want64).abs().max().item():.3g}")


def _assert_stats(s, ss, conv64, what=""):
    m = conv64.numel() // conv64.shape[1]
    ref_s = conv64.sum((0, 2, 3))
    ref_ss = (conv64 * conv64).sum((0, 2, 3))
    assert s.dtype == torch.float32 and ss.dtype == torch.float32
    amax = conv64.abs().max().item()
    torch.testing.assert_close(s.double() / m, ref_s / m, rtol=1e-5, atol=1e-5 * (1 + amax),
                               msg=lambda e: f"{what} mean: {e}")
    torch.testing.assert_close(ss.double() / m, ref_ss / m, rtol=1e-5,
                               atol=1e-5 * (1 + amax * amax), msg=lambda e: f"{what} sumsq: {e}")


# ---------------------------------------------------------------------------------------
# Every kernel variant, tiny shapes.

VARIANTS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "bias+relu": dict(bias=True, relu=True),
    "prologue": dict(prologue=True),
    "residual_add": dict(bias=True, mode="add", relu=True),
    "option_a": dict(bias=True, mode="option_a", relu=True),
    "stats": dict(stats=True),
    "prologue+stats": dict(prologue=True, stats=True),
    "all": dict(prologue=True, bias=True, mode="add", relu=True, stats=True),
}
CONVS = {"3x3s1": (3, 1), "3x3s2": (3, 2), "1x1s1": (1, 1), "1x1s2": (1, 2)}
# (N, Cin, H, W, Cout): channel counts on and off the 16-wide tiles; Cin <= Cout so the
# option-A shortcut (block input as residual) fits
SHAPES = [(2, 3, 5, 7, 16), (2, 16, 8, 8, 16), (2, 5, 8, 8, 20), (1, 20, 5, 7, 20),
          (2, 16, 5, 7, 5)]


def _run_variant(variant, conv, shape, dtype, allow_tf32=False):
    flags = VARIANTS[variant]
    k, s = CONVS[conv]
    n, cin, h, w, cout = shape
    if flags.get("mode") == "option_a" and cin > cout:
        cout = cin
    pad = k // 2
    x = _rand(n, cin, h, w, dtype=dtype)
    wt = _rand(cout, cin, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5)
    kw, ok = {}, {}
    if flags.get("bias"):
        kw["bias"] = ok["bias"] = _rand(cout)
    if flags.get("prologue"):
        # shift mostly positive: a prologue applied to padded zeros would show
        kw["prologue_scale"] = ok["ps"] = _rand(cin).abs() + 0.5
        kw["prologue_shift"] = ok["pb"] = _rand(cin, offset=0.5)
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    mode = flags.get("mode")
    if mode == "add":
        r = _rand(n, cout, ho, wo, dtype=dtype)
        kw.update(residual=r, residual_mode="add")
        ok.update(residual=r, mode="add")
    elif mode == "option_a":
        kw.update(residual=x, residual_mode="option_a", res_stride=s)
        ok.update(residual=x, mode="option_a", rs=s)
    kw["relu"] = ok["relu"] = flags.get("relu", False)
    stats = flags.get("stats", False)
    out = tconv.conv2d_fused(x, wt, stride=s, padding=pad, stats=stats,
                             allow_tf32=allow_tf32, **kw)
    want, conv64 = _oracle(x, wt, stride=s, padding=pad, **ok)
    tag = f"{variant} {conv} {shape} {dtype}"
    if stats:
        y, ssum, ssq = out
        _assert_stats(ssum, ssq, conv64, tag)
    else:
        y = out
    _assert_close_out(y, want, dtype, tag)


def _variant_cases():
    # every variant x every conv kind in fp32, shapes rotating through SHAPES
    for i, (v, c) in enumerate(itertools.product(VARIANTS, CONVS)):
        yield pytest.param(v, c, SHAPES[i % len(SHAPES)], torch.float32,
                           id=f"{v}-{c}-fp32-{i % len(SHAPES)}")
    # low precision: every variant with a 3x3 s1 and a 1x1 s2 conv
    for i, (v, c, dt) in enumerate(itertools.product(
            VARIANTS, ["3x3s1", "1x1s2"], [torch.float16, torch.bfloat16])):
        j = (i + 2) % len(SHAPES)
        yield pytest.param(v, c, SHAPES[j], dt, id=f"{v}-{c}-{str(dt)[6:]}-{j}")


@pytest.mark.parametrize("variant,conv,shape,dtype", list(_variant_cases()))
def test_variant(variant, conv, shape, dtype):
    _run_variant(variant, conv, shape, dtype)


def test_general_kernel_and_stride():
    """Not only 3x3/1x1: a 7x7 s2 p3 stem-like conv (Cin = 3) and a 5x3 kernel, (2, 1) stride."""
    for (cin, cout, kh, kw_, st, pad) in [(3, 16, 7, 7, 2, 3), (5, 7, 5, 3, (2, 1), (2, 1))]:
        x = _rand(2, cin, 9, 11)
        w = _rand(cout, cin, kh, kw_, scale=0.2)
        b = _rand(cout)
        y = tconv.conv2d_fused(x, w, b, st, pad, relu=True, allow_tf32=False)
        want, _ = _oracle(x, w, b, st, pad, relu=True)
        _assert_close_out(y, want, torch.float32, f"{kh}x{kw_}")


def test_padding_is_zero_after_prologue():
    """relu(0 * scale + shift) = shift > 0 must not leak into padded positions."""
    x = torch.zeros(1, 16, 4, 4, device=DEV)
    w = torch.ones(16, 16, 3, 3, device=DEV)
    ones = torch.ones(16, device=DEV)
    y = tconv.conv2d_fused(x, w, None, 1, 1, prologue_scale=ones, prologue_shift=ones)
    # every in-bounds input is relu(0 + 1) = 1: output = 16 * (number of in-bounds taps)
    taps = F.conv2d(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3), padding=1)[0, 0]
    assert torch.equal(y[0, 0].cpu(), 16 * taps)
    assert torch.equal(y.cpu(), (16 * taps).expand(1, 16, 4, 4))


def test_layouts_and_noncontiguous():
    """NCHW, channels_last and strided (sliced) inputs and residuals give the same y."""
    xb = _rand(2, 20, 8, 9)
    x_nchw = xb[:, 2:18, :, 1:]                        # non-contiguous, 16 x 8 x 8
    w = _rand(16, 16, 3, 3, scale=0.1)
    rb = _rand(2, 32, 8, 8)
    r = rb[:, ::2]                                     # non-contiguous residual
    want, _ = _oracle(x_nchw, w, None, 1, 1, residual=r, mode="add", relu=True)
    for x in (x_nchw, x_nchw.contiguous(), x_nchw.contiguous(memory_format=CL)):
        for res in (r, r.contiguous(), r.contiguous(memory_format=CL)):
            y = tconv.conv2d_fused(x, w, None, 1, 1, residual=res, residual_mode="add",
                                   relu=True, allow_tf32=False)
            _assert_close_out(y, want, torch.float32, "layouts")
    # option A from an NCHW block input
    x0 = _rand(2, 8, 8, 8)
    w2 = _rand(16, 8, 3, 3, scale=0.2)
    y = tconv.conv2d_fused(x0, w2, None, 2, 1, residual=x0, residual_mode="option_a",
                           res_stride=2, relu=True, allow_tf32=False)
    want, _ = _oracle(x0, w2, None, 2, 1, residual=x0, mode="option_a", rs=2, relu=True)
    _assert_close_out(y, want, torch.float32, "option_a nchw")


def test_batch_one_and_empty_batch():
    w = _rand(5, 3, 3, 3)
    x1 = _rand(1, 3, 3, 3)
    y, s, ss = tconv.conv2d_fused(x1, w, None, 1, 1, stats=True, allow_tf32=False)
    want, conv = _oracle(x1, w, None, 1, 1)
    _assert_close_out(y, want, torch.float32, "batch 1")
    _assert_stats(s, ss, conv, "batch 1")
    x0 = _rand(0, 3, 6, 6)
    y, s, ss = tconv.conv2d_fused(x0, w, None, 2, 1, stats=True)
    assert y.shape == (0, 5, 3, 3)
    assert torch.equal(s.cpu(), torch.zeros(5)) and torch.equal(ss.cpu(), torch.zeros(5))
    y, mean, var = tblock.conv_bn_stats(x0, w, 1, 1)
    assert y.shape == (0, 5, 6, 6) and mean.shape == (5,) and var.shape == (5,)


def test_stats_large_mean_and_deterministic():
    """Centred partials: var stays accurate when |mean| >> std (sumsq - sum^2 would not)."""
    x = _rand(2, 16, 8, 8, scale=0.01, offset=1.0)
    w = torch.full((16, 16, 1, 1), 50.0, device=DEV)  # outputs ~ 800 +- ~0.6
    # IEEE fp32 on a GPU: the tolerances below are fp32's (tf32: tests/test_triton_block.py)
    y, mean, var = tblock.conv_bn_stats(x, w, 1, 0, allow_tf32=False)
    ref_var, ref_mean = torch.var_mean(
        F.conv2d(x.double(), w.double()), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    _, mean2, var2 = tblock.conv_bn_stats(x, w, 1, 0, allow_tf32=False)
    assert torch.equal(mean, mean2) and torch.equal(var, var2)  # no atomics


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lowp_error_vs_torch(dtype):
    """design §6: fused low-precision error at most ~2x PyTorch's in the same dtype."""
    x = _rand(2, 16, 8, 8, dtype=dtype)
    w = _rand(16, 16, 3, 3, dtype=dtype, scale=1 / 12)
    b = _rand(16)
    ps, pb = _rand(16).abs() + 0.5, _rand(16)
    r = _rand(2, 16, 8, 8, dtype=dtype)
    ours = tconv.conv2d_fused(x, w, b, 1, 1, prologue_scale=ps, prologue_shift=pb,
                              residual=r, residual_mode="add", relu=True)
    # eager PyTorch in the working dtype: BN-apply + ReLU, conv, bias, add, ReLU
    h = torch.relu(x * ps.to(dtype).view(1, -1, 1, 1) + pb.to(dtype).view(1, -1, 1, 1))
    eager = torch.relu(F.conv2d(h, w, None, 1, 1) + b.to(dtype).view(1, -1, 1, 1) + r)
    exact = torch.relu(F.conv2d(torch.relu(x.double() * ps.double().view(1, -1, 1, 1)
                                           + pb.double().view(1, -1, 1, 1)),
                                w.double(), b.double(), 1, 1) + r.double())
    e_ours = (ours.double() - exact).abs().max().item()
    e_torch = (eager.double() - exact).abs().max().item()
    assert e_ours <= 2 * e_torch + 1e-6, (e_ours, e_torch)


# ---------------------------------------------------------------------------------------
# Bad input: clear errors naming the function.

def _bad(exc, match, *args, **kw):
    with pytest.raises(exc, match=match) as ei:
        tconv.conv2d_fused(*args, **kw)
    assert "conv2d_fused" in str(ei.value)


def test_errors():
    x = _rand(2, 4, 6, 6)
    w = _rand(8, 4, 3, 3)
    _bad(TypeError, "dtype", x.double(), w.double())
    _bad(TypeError, "dtype", x.to(torch.int32), w)
    _bad(TypeError, "weight dtype", x, w.half())
    _bad(ValueError, "grouped", x, _rand(8, 2, 3, 3))
    _bad(ValueError, "input channels", x, _rand(8, 3, 3, 3))
    _bad(ValueError, "4-D", x[0], w)
    _bad(ValueError, "residual shape", x, w, None, 1, 1, residual=_rand(2, 8, 5, 5),
         residual_mode="add")
    _bad(ValueError, "option-A", x, w, None, 1, 1, residual=_rand(2, 9, 6, 6),
         residual_mode="option_a")
    _bad(ValueError, "needs a residual", x, w, residual_mode="add")
    _bad(ValueError, "residual_mode", x, w, residual=x, residual_mode="mul")
    _bad(ValueError, "both", x, w, prologue_scale=torch.ones(4, device=DEV))
    _bad(ValueError, r"shape \[4\]", x, w, prologue_scale=torch.ones(5, device=DEV),
         prologue_shift=torch.ones(5, device=DEV))
    _bad(ValueError, "smaller than the kernel", _rand(1, 4, 2, 2), w)
    _bad(TypeError, "stride", x, w, None, "2")
    with pytest.raises(ValueError, match="block_eval"):
        tblock.block_eval(x, [(w, None, 1, 1)], ("bogus",))
    with pytest.raises(ValueError, match="block_eval"):
        tblock.block_eval(x, [], ("identity",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CPU and CUDA tensors")
def test_error_wrong_device():
    x = _rand(2, 4, 6, 6)
    _bad(ValueError, "weight is on", x, torch.randn(8, 4, 3, 3))


# ---------------------------------------------------------------------------------------
# Blocks.

def _basic(cin, cout, s, dtype):
    return basic_convs(_rand, cin, cout, s, dtype)


def _bottleneck(cin, planes, s, dtype):
    return bottleneck_convs(_rand, cin, planes, s, dtype)



def test_block_eval_fp32_weights_for_bf16_block():
    convs = _basic(16, 16, 1, torch.float32)
    x = torch.relu(_rand(2, 16, 5, 5)).bfloat16()
    got = tblock.block_eval(x, convs, ("identity",))
    assert got.dtype == torch.bfloat16


@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("conv", ["3x3s1", "3x3s2", "1x1s1"])
def test_conv_bn_stats(conv, prologue):
    k, s = CONVS[conv]
    x = _rand(2, 16, 8, 8)
    w = _rand(20, 16, k, k, scale=0.2)
    pro = (_rand(16).abs() + 0.5, _rand(16)) if prologue else None
    y, mean, var = tblock.conv_bn_stats(x, w, s, k // 2, prologue=pro, allow_tf32=False)
    ry, rmean, rvar = tblock.conv_bn_stats_reference(x.double(), w.double(), s, k // 2, pro)
    torch.testing.assert_close(y.double(), ry, rtol=1e-5, atol=1e-5)
    var_t, mean_t = torch.var_mean(ry, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), var_t, rtol=1e-5, atol=1e-5)
    # The kernel's statistics are float32: compare at float32 precision (float64's
    # default 1e-7 failed by 2e-7 on an AVX2 machine, on the code before and after).
    torch.testing.assert_close(mean.double(), rmean, rtol=1.3e-6, atol=1e-6)
    assert mean.dtype == var.dtype == torch.float32


def test_conv_bn_stats_bf16_vs_var_mean():
    x = _rand(2, 16, 8, 8, dtype=torch.bfloat16)
    w = _rand(16, 16, 3, 3, dtype=torch.bfloat16, scale=0.1)
    y, mean, var = tblock.conv_bn_stats(x, w, 1, 1)
    var_t, mean_t = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    # stats of the exact fp32 conv, y rounded to bf16: agree to bf16 rounding
    torch.testing.assert_close(mean, mean_t, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(var, var_t, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------
# torch.library registration and torch.compile.

def _op_args(x, w, b):
    return (x, w, b, None, None, None, 1, 1, 1, 1, 0, 1, True, True, False)


def test_op_registered_and_opcheck():
    op = torch.ops.sdkernels_triton.conv2d_fused.default
    x = _rand(2, 5, 6, 6).contiguous(memory_format=CL)
    w = _rand(16, 5, 3, 3, scale=0.2)
    b = _rand(16)
    torch.library.opcheck(op, _op_args(x, w, b))
    # the eager fast path (direct launch) and the dispatched op agree bitwise
    via_op = op(*_op_args(x, w, b))
    direct = tconv.conv2d_fused(x, w, b, 1, 1, relu=True, stats=True, allow_tf32=False)
    assert torch.equal(via_op[0], direct[0]) and torch.equal(via_op[1], direct[1])


def test_no_autograd_is_a_clear_error():
    x = _rand(1, 3, 4, 4).requires_grad_()
    y = tconv.conv2d_fused(x, _rand(16, 3, 3, 3), None, 1, 1)
    with pytest.raises(RuntimeError, match="conv2d_fused"):
        y.sum().backward()


def test_torch_compile_fullgraph():
    """fullgraph compile of code calling the op (GPU: a triton_op whose kernel launch
    inductor sees; interpreter: the same op as an opaque custom op)."""
    torch._dynamo.reset()
    x = _rand(2, 5, 6, 6)
    w = _rand(16, 5, 3, 3, scale=0.2)
    b = _rand(16)

    def f(x, w, b):
        y, s, ss = tconv.conv2d_fused(x, w, b, 1, 1, relu=True, stats=True, allow_tf32=False)
        return y * 2, s, ss

    got = torch.compile(f, fullgraph=True)(x, w, b)
    want = f(x, w, b)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_interpreter_config_check():
    """check_autotune_configs itself (with this process's configs) on one tiny shape."""
    shapes = [(2, 5, 5, 7, 20, 3, 2)]
    assert tconv.check_autotune_configs(DEV, dtypes=(torch.float32,), shapes=shapes) == []


@pytest.mark.skipif(not INTERP, reason="on a GPU test_gpu_every_autotune_config does this")
def test_gpu_configs_logic_under_interpreter():
    """The H100 tile configs (BLOCK_M up to 256: one stats partial per tile, a partial
    buffer sized for the smallest BLOCK_M) run through the interpreter: the tiling logic,
    not the compiled code, at one odd shape."""
    shapes = [(2, 19, 9, 7, 33, 3, 2)]
    assert tconv.check_autotune_configs(DEV, dtypes=(torch.float32,), shapes=shapes,
                                        configs=tconv._GPU_CONFIGS) == []


# ---------------------------------------------------------------------------------------
# GPU: full shapes, every autotune config.

FULL_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (Cin, Cout, HW, k, stride) of the convs in CIFAR BasicBlocks and ResNet-50 Bottlenecks
FULL_CONVS = [
    (16, 16, 32, 3, 1), (16, 32, 32, 3, 2), (32, 32, 16, 3, 1), (32, 64, 16, 3, 2),
    (64, 64, 8, 3, 1),
    (3, 64, 224, 7, 2),                                           # ResNet stem
    (256, 64, 56, 1, 1), (64, 64, 56, 3, 1), (64, 256, 56, 1, 1),
    (512, 128, 28, 1, 1), (128, 128, 28, 3, 1), (256, 128, 56, 3, 2), (256, 512, 56, 1, 2),
    (1024, 256, 14, 1, 1), (256, 256, 14, 3, 1), (256, 1024, 14, 1, 1),
    (2048, 512, 7, 1, 1), (512, 512, 7, 3, 1), (512, 2048, 7, 1, 1),
]


def _ids(c):
    return f"{c[0]}to{c[1]}@{c[2]}-k{c[3]}s{c[4]}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cfg", FULL_CONVS, ids=_ids)
def test_gpu_full_shapes(cfg, dtype):
    cin, cout, hw, k, s = cfg
    n = 128 if hw <= 56 else 32
    x = torch.relu(_rand(n, cin, hw, hw, dtype=dtype)).contiguous(memory_format=CL)
    w = _rand(cout, cin, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5)
    b = _rand(cout, scale=0.1)
    ps, pb = _rand(cin).abs() + 0.5, _rand(cin, scale=0.1)
    ho = (hw + 2 * (k // 2) - k) // s + 1
    r = _rand(n, cout, ho, ho, dtype=dtype).contiguous(memory_format=CL)
    # fp32: IEEE on both sides here (TF32 has its own test below)
    y, ssum, ssq = tconv.conv2d_fused(x, w, b, s, k // 2, prologue_scale=ps, prologue_shift=pb,
                                      residual=r, residual_mode="add", relu=True, stats=True,
                                      allow_tf32=False)
    # fp32 reference of the same semantics; PyTorch in the working dtype for the 2x rule
    h = torch.relu(x.float() * ps.view(1, -1, 1, 1) + pb.view(1, -1, 1, 1))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        conv32 = F.conv2d(h.to(dtype).float(), w.float(), None, s, k // 2)
        eager = torch.relu(F.conv2d(h.to(dtype), w, None, s, k // 2)
                           + b.to(dtype).view(1, -1, 1, 1) + r)
    exact = torch.relu(conv32 + b.view(1, -1, 1, 1) + r.float())
    e_ours = (y.float() - exact).abs().max().item()
    e_torch = (eager.float() - exact).abs().max().item()
    assert e_ours <= 2 * e_torch + 1e-4 * (1 + exact.abs().max().item()), (e_ours, e_torch)
    var_t, mean_t = torch.var_mean(conv32.double(), dim=(0, 2, 3), correction=0)
    m = conv32.numel() // cout
    mean = ssum.double() / m
    var = ssq.double() / m - mean * mean
    sd = var_t.max().sqrt().item()
    torch.testing.assert_close(mean, mean_t, rtol=1e-3, atol=1e-3 * sd)
    torch.testing.assert_close(var, var_t, rtol=1e-3, atol=1e-3 * sd * sd)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind,c,hw", [("basic", 16, 32), ("basic", 32, 16), ("basic", 64, 8),
                                       ("bottleneck", 64, 56), ("bottleneck", 128, 28),
                                       ("bottleneck", 256, 14), ("bottleneck", 512, 7)])
def test_gpu_block_eval_full(kind, c, hw, dtype):
    n = 128
    if kind == "basic":
        convs, shape = _basic(c, c, 1, dtype), (n, c, hw, hw)
    else:
        convs, shape = _bottleneck(4 * c, c, 1, dtype), (n, 4 * c, hw, hw)
    x = torch.relu(_rand(*shape, dtype=dtype)).contiguous(memory_format=CL)
    got = tblock.block_eval(x, convs, ("identity",))
    exact = tblock.block_eval_reference(x.double(), [(w.double(), b, s, p) for w, b, s, p in convs],
                                        ("identity",))
    e_ours = (got.double() - exact).abs().max().item()
    tol = {torch.float32: 2e-2, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    assert e_ours <= tol * (1 + exact.abs().max().item()), e_ours


@pytest.mark.gpu
def test_gpu_tf32_default():
    """fp32 follows torch.backends.cudnn.allow_tf32 (default True, as F.conv2d does):
    within the TF32 error bound (each operand cut to a 10-bit mantissa, truncated or
    rounded, so every product is off by at most ~2^-9 of |x||w|); allow_tf32=False is
    IEEE fp32 (worst-case fp32 accumulation over K = 576 terms: 576 * 2^-24 < 1e-4)."""
    x = _rand(128, 64, 16, 16)
    w = _rand(64, 64, 3, 3, scale=1 / 24)
    exact = F.conv2d(x.double(), w.double(), None, 1, 1)
    bound = F.conv2d(x.double().abs(), w.double().abs(), None, 1, 1)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        ours = tconv.conv2d_fused(x, w, None, 1, 1)
    assert ((ours.double() - exact).abs() <= 2.0 ** -9 * bound + 1e-5).all()
    ieee = tconv.conv2d_fused(x, w, None, 1, 1, allow_tf32=False)
    assert ((ieee.double() - exact).abs() <= 1e-4 * bound + 1e-6).all()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        follows = tconv.conv2d_fused(x, w, None, 1, 1)
    assert torch.equal(follows, ieee)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_every_autotune_config():
    """No miscompiled variant: every config on odd shapes, all dtypes, all epilogues."""
    failures = tconv.check_autotune_configs("cuda")
    assert failures == [], "\n".join(failures[:20])


# ---------------------------------------------------------------------------------------
# Host-side logic (issue 13 part 8): CPU tests of arithmetic, no kernel or tiny ones.

def _merge_reference(means, m2s, counts):
    """Chan's merge in float64 over tiles of the given counts."""
    cnt = torch.tensor(counts, dtype=torch.float64)[:, None]
    total = (means * cnt).sum(0)
    mean = total / cnt.sum()
    return total, (m2s + cnt * (means - mean) ** 2).sum(0)


def test_merge_stats_past_2_24_rows():
    """M > 2^24: counts must be exact integers (float32 counts rounded the last slice's
    count to 0 and gave inf/NaN statistics). Unused partial rows (count 0) hold garbage
    and must be ignored."""
    tile, c = 256, 3
    m = 2 ** 24 + 37
    used = -(-m // tile)
    counts = [tile] * (used - 1) + [m - (used - 1) * tile]
    assert counts[-1] == 37
    g = torch.Generator().manual_seed(5)
    means = torch.randn(used, c, generator=g, dtype=torch.float64) * 0.1 + 2.0
    m2s = torch.rand(used, c, generator=g, dtype=torch.float64) * torch.tensor(
        counts, dtype=torch.float64)[:, None]
    unused = 40  # the buffer is sized for the smallest BLOCK_M: trailing rows stay unused
    psum = torch.full((used + unused, c), float("nan"))
    pm2 = torch.full((used + unused, c), float("nan"))
    psum[:used] = (means * torch.tensor(counts, dtype=torch.float64)[:, None]).float()
    pm2[:used] = m2s.float()
    pcnt = torch.zeros(used + unused, dtype=torch.int32)
    pcnt[:used] = torch.tensor(counts, dtype=torch.int32)
    total, m2 = tconv._merge_stats(psum, pm2, pcnt, m)
    assert torch.isfinite(total).all() and torch.isfinite(m2).all()
    ref_total, ref_m2 = _merge_reference(psum[:used].double() / torch.tensor(
        counts, dtype=torch.float64)[:, None], pm2[:used].double(), counts)
    torch.testing.assert_close(total.double() / m, ref_total / m, rtol=1e-5, atol=0)
    torch.testing.assert_close(m2.double() / m, ref_m2 / m, rtol=1e-4, atol=0)
    # deterministic: same partials, same bits
    t2, m22 = tconv._merge_stats(psum, pm2, pcnt, m)
    assert torch.equal(total, t2) and torch.equal(m2, m22)


def test_index_range_check():
    """Offsets inside one image are 32-bit: a clear ValueError past 2^31 elements, before
    anything is allocated (an expanded tensor has 2^32 logical elements, no storage)."""
    ok = dict(n=256, cin=256, h=56, w=56, cout=256, kh=3, kw=3, ho=56, wo=56)
    tconv._check_index_range(**ok)
    for key, val in [("cin", 2 ** 12), ("n", 2 ** 12)]:
        big = dict(ok, h=1024, w=1024, ho=1024, wo=1024, **{key: val})
        with pytest.raises(ValueError, match="32-bit"):
            tconv._check_index_range(**big)
    with pytest.raises(ValueError, match="weight"):
        tconv._check_index_range(**dict(ok, cin=2 ** 16, cout=2 ** 12))
    with pytest.raises(ValueError, match="residual"):
        tconv._check_index_range(**ok, residual_shape=(256, 2 ** 11, 1024, 1024))
    x = torch.zeros(1, 1, 1, 1, device=DEV).expand(1, 2 ** 12, 2 ** 10, 2 ** 10)
    w = torch.zeros(16, 2 ** 12, 1, 1, device=DEV)
    _bad(ValueError, "32-bit", x, w)


def test_autotune_key_and_m_bucket():
    keys = tconv._conv_fwd_autotuned.keys
    for k in ["DOT_PRECISION", "RES_MODE", "HAS_BIAS", "RELU", "STATS", "PROLOGUE", "CIN",
              "COUT", "KH", "KW", "SH", "SW", "PH", "PW", "M_BUCKET"]:
        assert k in keys, k
    assert "M" not in keys  # every new batch size would re-tune
    assert [tconv._next_pow2(v) for v in (1, 2, 3, 1000, 1024, 1025)] == [
        1, 2, 4, 1024, 1024, 2048]


def test_device_guard(monkeypatch):
    """Triton launches on the current device: the launch must run under x's device."""
    entered = []

    class _Dev:
        def __init__(self, d):
            self.d = d

        def __enter__(self):
            entered.append(self.d)

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(torch.cuda, "device", _Dev)
    with tconv._device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with tconv._device_guard(torch.device("cpu")):
        pass
    assert len(entered) == 1
    # and _launch uses it, with x's device
    seen = []
    real = tconv._device_guard
    monkeypatch.setattr(tconv, "_device_guard", lambda d: seen.append(d) or real(d))
    x = _rand(1, 3, 4, 4)
    tconv.conv2d_fused(x, _rand(16, 3, 3, 3), None, 1, 1)
    assert seen == [x.device]


def test_smem_limit_from_device(monkeypatch):
    """The pruning limit is the device's opt-in shared memory (an A100 has 163 KiB, less
    than the old fixed 200 KiB), not a constant."""
    class _Props:
        shared_memory_per_block_optin = 166912

    monkeypatch.setattr(tconv, "_smem_cache", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: _Props())
    assert tconv._smem_limit(torch.device("cuda", 3)) == 166912
    assert tconv._smem_limit(torch.device("cpu")) == tconv._SMEM_FALLBACK
    cfgs = tconv._GPU_CONFIGS
    # fp32 (4-byte) 128x128x64 with 3 stages needs 196608 bytes: not on an A100
    big = [c for c in cfgs if tconv.smem_estimate(c, 4) > 166912]
    assert big
    kept = tconv._fitting_configs(cfgs, 512, 512, 4, 1, 166912)
    assert kept and not any(c in kept for c in big)
    assert all(tconv.smem_estimate(c, 4) <= 166912 for c in kept)


def test_deterministic_mode(monkeypatch):
    """Pinned configs: a pure function of shape and device (same on every rank)."""
    monkeypatch.delenv("SDKERNELS_TRITON_DETERMINISTIC", raising=False)
    assert not tconv.deterministic_mode()
    monkeypatch.setenv("SDKERNELS_TRITON_DETERMINISTIC", "1")
    assert tconv.deterministic_mode()
    cfgs = tconv._GPU_CONFIGS
    pick = tconv._heuristic_config(16, 16, 128 * 32 * 32, 2, 0, 232448, cfgs)
    assert pick.kwargs["BLOCK_N"] == 16 and pick.kwargs["BLOCK_K"] == 16  # CIFAR stage 1
    assert tconv._heuristic_config(16, 16, 128 * 32 * 32, 2, 0, 232448, cfgs) is pick
    wide = tconv._heuristic_config(256, 256, 128 * 14 * 14, 2, 0, 232448, cfgs)
    assert wide.kwargs["BLOCK_N"] == 128 and wide.kwargs["BLOCK_K"] == 64
    for cin, cout, m in [(3, 64, 10 ** 6), (2048, 512, 6272), (64, 64, 100)]:
        for es, dp in [(2, 0), (4, 1), (4, 2)]:
            c = tconv._heuristic_config(cin, cout, m, es, dp, 166912, cfgs)
            assert tconv.config_selectable(c, es, dp, 166912)
    # the pinned launch path (raw kernel + config) computes the same thing
    x = _rand(2, 5, 6, 6)
    w = _rand(16, 5, 3, 3, scale=0.2)
    y, s, ss = tconv.conv2d_fused(x, w, None, 1, 1, stats=True, allow_tf32=False)
    monkeypatch.delenv("SDKERNELS_TRITON_DETERMINISTIC")
    y2, s2, ss2 = tconv.conv2d_fused(x, w, None, 1, 1, stats=True, allow_tf32=False)
    assert torch.equal(y, y2) and torch.equal(s, s2) and torch.equal(ss, ss2)


def test_aot_variants_match_the_kernel():
    """The AOT variant list (tools/gpu_static_report.py) describes the real kernel."""
    names = list(tconv._conv_fwd_kernel.arg_names)
    vs = tconv.aot_variants()
    assert len(vs) == 16 and len({v["name"] for v in vs}) == 16
    cfg_keys = set(tconv._GPU_CONFIGS[0].kwargs)
    for v in vs:
        assert list(v["signature"]) == names
        const = {a for a, t in v["signature"].items() if t == "constexpr"}
        assert const == set(v["constexprs"]) | cfg_keys
        assert set(v["divisible_by_16"]) <= set(names)
    combos = {(v["signature"]["x_ptr"], v["dot_precision"], v["constexprs"]["PROLOGUE"],
               bool(v["divisible_by_16"])) for v in vs}
    assert len(combos) == 16


def test_alignment_class_and_unaligned_configs():
    """Unaligned problems (Cin = 3, odd channels, misaligned tensors) compile a variant
    with scalar loads: only the small tiles that the static report shows spill-free."""
    x = torch.empty(64, device=DEV)
    ok = dict(x_ptr=x, w_ptr=x, y_ptr=x, res_ptr=x, CIN=64, COUT=128, srn=0, srh=0, srw=0)
    assert tconv._is_aligned_call(ok)
    assert not tconv._is_aligned_call(dict(ok, CIN=3))
    assert not tconv._is_aligned_call(dict(ok, x_ptr=x[1:]))
    assert not tconv._is_aligned_call(dict(ok, x_ptr=x[1:]), by_offset=True)
    small = tconv._fitting_configs(tconv._GPU_CONFIGS, 256, 256, 2, 0, 232448, aligned=False)
    assert small
    for c in small:
        kw = c.kwargs
        assert (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] <= 20 * 32 * c.num_warps
    big = tconv._fitting_configs(tconv._GPU_CONFIGS, 256, 256, 2, 0, 232448, aligned=True)
    assert len(big) > len(small)


@pytest.mark.skipif(not INTERP, reason="launches raw configs on CPU tensors")
def test_stats_rows_of_an_earlier_config_are_not_counted():
    # Autotuning benchmarks every candidate on the same buffers: a config with a smaller
    # BLOCK_M leaves more stats rows behind than the chosen one writes. The autotuner
    # zeroes the counts before each run (reset_to_zero), and zeroed rows are skipped.
    assert "pcnt_ptr" in tconv._conv_fwd_autotuned.reset_to_zero
    x = _rand(2, 16, 8, 8).contiguous(memory_format=CL)
    w = _rand(16, 16, 3, 3, scale=0.2).contiguous(memory_format=CL)
    m = 2 * 8 * 8
    y = torch.empty((2, 16, 8, 8), memory_format=CL)
    psum, pm2, pcnt = tconv._stat_buffers(m, 16, x.device)
    dummy = torch.empty(1)
    want = F.conv2d(x.double(), w.double(), padding=1).sum((0, 2, 3))

    def launch(bm):
        tconv._launch(tconv._conv_fwd_kernel, x, w, None, None, None, None, 1, 1, 1, 1, 0, 1,
                      False, True, False, y, psum, pm2, pcnt, dummy, BLOCK_M=bm, BLOCK_N=16,
                      BLOCK_K=16, num_warps=1, num_stages=1)

    launch(32)
    pcnt.zero_()  # what reset_to_zero does before the chosen config's run
    launch(64)
    total, _ = tconv._merge_stats(psum, pm2, pcnt, m)
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-4)
