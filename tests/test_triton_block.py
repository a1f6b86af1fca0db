"""sdkernels.ops.triton.block (block_eval, conv_bn_stats) against PyTorch references,
in fp32 with both dot precisions.

In fp32 both functions take ``allow_tf32`` (passed to ``conv2d_fused``); None follows
``torch.backends.cudnn.allow_tf32``, True by default. TF32 cuts each dot operand to a
10-bit mantissa (relative error up to ~2^-11..2^-10 per product), so on a GPU the TF32
results are checked with a ~5e-3 relative tolerance and the IEEE ones (allow_tf32=False)
with fp32-accumulation tolerances. Every test passes the precision explicitly, so none
depends on the global flag.

CPU CI runs this file under ``TRITON_INTERPRET=1`` (tiny shapes); the interpreter
computes the dot in IEEE fp32 whatever the setting, so both settings run there and meet
the tight bound as well. On a CUDA machine the same tests run compiled on the GPU.
Without triton, or with neither a GPU nor the interpreter, the whole file skips.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import EPS, rand_on, basic_convs, block_cases, bottleneck_convs

from sdkernels.ops import triton as sdtriton

if not sdtriton.is_available():
    pytest.skip(f"Triton kernels unavailable: {sdtriton.unavailable_reason()}",
                allow_module_level=True)

from sdkernels.ops.triton import block as tblock  # noqa: E402
from sdkernels.ops.triton import conv as tconv  # noqa: E402

INTERP = tconv.INTERPRET
DEV = torch.device("cpu" if INTERP else "cuda")
CL = torch.channels_last
CONVS = {"3x3s1": (3, 1), "3x3s2": (3, 2), "1x1s1": (1, 1)}
# Relative tolerances of fp32 results by dot precision (see the module docstring).
TF32_RTOL = 5e-3
PRECISIONS = [pytest.param(False, id="ieee"), pytest.param(True, id="tf32")]


_rand = rand_on(DEV)


def _close(got, want, rtol, what):
    """|got - want| <= rtol * (|want| + max|want|): relative to the result's scale (an
    elementwise relative bound is meaningless where a conv output crosses zero)."""
    want = want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * (1.0 + scale),
                               msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------
# block_eval

def _basic(cin, cout, s, dtype):
    return basic_convs(_rand, cin, cout, s, dtype)


def _bottleneck(cin, planes, s, dtype):
    return bottleneck_convs(_rand, cin, planes, s, dtype)


BLOCK_CASES = block_cases(_rand)


def _block_ref64(x, convs, sc):
    return tblock.block_eval_reference(
        x.double(), [(w.double(), b, s, p) for w, b, s, p in convs],
        sc if sc[0] != "projection" else ("projection", (sc[1][0].double(),) + tuple(sc[1][1:])))


@pytest.mark.parametrize("allow_tf32", PRECISIONS)
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_eval_fp32(case, allow_tf32):
    make_convs, make_sc, shape = BLOCK_CASES[case]
    convs, sc = make_convs(torch.float32), make_sc(torch.float32)
    x = torch.relu(_rand(*shape))
    got = tblock.block_eval(x, convs, sc, allow_tf32=allow_tf32)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=CL)
    # IEEE: fp32 accumulation over K <= 144 terms per conv, 2-3 convs chained
    rtol = TF32_RTOL if allow_tf32 and not INTERP else 2e-5
    _close(got, _block_ref64(x, convs, sc), rtol, f"block_eval {case}")


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_eval_bf16(case):
    """bf16: no TF32 question (allow_tf32 is ignored); activations rounded to bf16
    between the convs."""
    make_convs, make_sc, shape = BLOCK_CASES[case]
    convs, sc = make_convs(torch.bfloat16), make_sc(torch.bfloat16)
    x = torch.relu(_rand(*shape)).bfloat16()
    got = tblock.block_eval(x, convs, sc)
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=CL)
    assert torch.equal(got, tblock.block_eval(x, convs, sc, allow_tf32=True))
    ref = _block_ref64(x, convs, sc)
    tol = 4 * EPS[torch.bfloat16]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * (1 + ref.abs().max().item()))


# ---------------------------------------------------------------------------------------
# conv_bn_stats

@pytest.mark.parametrize("allow_tf32", PRECISIONS)
@pytest.mark.parametrize("prologue", [False, True])
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_bn_stats_fp32(conv, prologue, allow_tf32):
    k, s = CONVS[conv]
    x = _rand(2, 16, 8, 8)
    w = _rand(20, 16, k, k, scale=0.2)
    pro = (_rand(16).abs() + 0.5, _rand(16)) if prologue else None
    y, mean, var = tblock.conv_bn_stats(x, w, s, k // 2, prologue=pro, allow_tf32=allow_tf32)
    assert mean.dtype == var.dtype == torch.float32
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    ry, _, _ = tblock.conv_bn_stats_reference(x.double(), w.double(), s, k // 2, pro)
    var_t, mean_t = torch.var_mean(ry, dim=(0, 2, 3), correction=0)
    tf32 = allow_tf32 and not INTERP
    rtol = TF32_RTOL if tf32 else 1e-5
    _close(y, ry, rtol, "y")
    _close(mean, mean_t, rtol, "mean")
    _close(var, var_t, rtol, "var")
    # Whatever the precision, the statistics are those of the conv that produced y (the
    # exact fp32 accumulators before rounding y, which fp32 does not round): tight.
    var_y, mean_y = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    _close(mean, mean_y, 1e-5, "mean vs y")
    _close(var, var_y, 1e-5, "var vs y")


def test_conv_bn_stats_large_mean_and_deterministic():
    """Centred partials: var stays accurate when |mean| >> std (sumsq - sum^2 would not).
    IEEE only: TF32 rounds x ~ 1 to ~1e-3, the size of the spread measured here."""
    x = _rand(2, 16, 8, 8, scale=0.01, offset=1.0)
    w = torch.full((16, 16, 1, 1), 50.0, device=DEV)  # outputs ~ 800 +- ~0.6
    y, mean, var = tblock.conv_bn_stats(x, w, 1, 0, allow_tf32=False)
    ref_var, ref_mean = torch.var_mean(
        F.conv2d(x.double(), w.double()), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    _, mean2, var2 = tblock.conv_bn_stats(x, w, 1, 0, allow_tf32=False)
    assert torch.equal(mean, mean2) and torch.equal(var, var2)  # no atomics


# ---------------------------------------------------------------------------------------
# The keyword: None follows the cuDNN flag; an explicit value overrides it.

@pytest.mark.parametrize("flag", [False, True])
def test_allow_tf32_none_follows_cudnn_flag(flag):
    x = _rand(2, 8, 6, 6)
    w = _rand(8, 8, 3, 3, scale=0.2)
    convs, sc = _basic(8, 8, 1, torch.float32), ("identity",)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=flag):
        y0, m0, v0 = tblock.conv_bn_stats(x, w, 1, 1)
        b0 = tblock.block_eval(x, convs, sc)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=not flag):
        y1, m1, v1 = tblock.conv_bn_stats(x, w, 1, 1, allow_tf32=flag)
        b1 = tblock.block_eval(x, convs, sc, allow_tf32=flag)
    assert torch.equal(y0, y1) and torch.equal(m0, m1) and torch.equal(v0, v1)
    assert torch.equal(b0, b1)


@pytest.mark.gpu
@pytest.mark.skipif(INTERP, reason="the interpreter computes IEEE fp32 for both settings")
def test_gpu_tf32_and_ieee_differ():
    """The keyword reaches the kernel: TF32 and IEEE give different fp32 results."""
    x = _rand(8, 32, 16, 16)
    w = _rand(32, 32, 3, 3, scale=1 / 17)
    y_t, _, _ = tblock.conv_bn_stats(x, w, 1, 1, allow_tf32=True)
    y_i, _, _ = tblock.conv_bn_stats(x, w, 1, 1, allow_tf32=False)
    assert not torch.equal(y_t, y_i)
    convs = _basic(32, 32, 1, torch.float32)
    xr = torch.relu(x)
    assert not torch.equal(tblock.block_eval(xr, convs, ("identity",), allow_tf32=True),
                           tblock.block_eval(xr, convs, ("identity",), allow_tf32=False))
