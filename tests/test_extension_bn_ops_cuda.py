"""GPU tests of the CUDA kernels of the training-BN ops: bn_stats, scale_bias_relu,
relu_bn_backward_reduce and bn_backward_apply (csrc/cuda/batch_norm_*), plus the
vectorised forward kernel scale_bias_relu shares with scale_bias_add_relu.

Oracles: sdkernels.ops.reference (in float64, and in the working dtype for the ~2x error
bound) and the CPU kernels of the same ops. Every test is marked gpu (tests/conftest.py
skips them without a CUDA device) and skips when the extension was built without CUDA
kernels. Nothing here touches CUDA at import or collection time.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdkernels.ops import extension
from sdkernels.ops import reference as R

STATS = "sdkernels::bn_stats"
SBR = "sdkernels::scale_bias_relu"
SBAR = "sdkernels::scale_bias_add_relu"
REDUCE = "sdkernels::relu_bn_backward_reduce"
APPLY = "sdkernels::bn_backward_apply"
OPS = (STATS, SBR, REDUCE, APPLY)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not extension.is_available(),
                       reason=f"sdkernels compiled extension not available: "
                              f"{extension.unavailable_reason()}"),
]


@pytest.fixture(autouse=True)
def _need_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    if missing:
        pytest.skip(f"sdkernels._C has no CUDA kernels for {missing} (built without CUDA?)")


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LOW = (torch.float16, torch.bfloat16)
SHAPES = [
    (1, 3, 4, 4),        # batch 1, C = 3
    (0, 3, 4, 4),        # empty batch
    (2, 3, 7, 5),        # odd / prime spatial
    (3, 5, 13, 11),
    (2, 16, 13, 11),     # vectorisable C in channels_last, odd spatial
    (4, 64, 8, 8),       # vectorisable both ways
    (2, 5, 1, 1),
    (5, 6),              # 2-D [N, C]
    (2, 3, 11),          # 3-D
    (2, 8, 4, 5, 3),     # 5-D
    (1, 1, 1, 1),
    (4, 1, 6, 6),        # C = 1
    (16, 32, 33, 31),    # several splits per channel
]
LAYOUTS = ["contiguous", "channels_last", "transposed", "misaligned"]


def _stats(*a):
    return torch.ops.sdkernels.bn_stats(*a)


def _sbr(*a):
    return torch.ops.sdkernels.scale_bias_relu(*a)


def _sbar(*a):
    return torch.ops.sdkernels.scale_bias_add_relu(*a)


def _reduce(*a):
    return torch.ops.sdkernels.relu_bn_backward_reduce(*a)


def _apply(*a):
    return torch.ops.sdkernels.bn_backward_apply(*a)


def _pc(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _fmt(t):
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(t)


def _cl_format(t):
    if t.dim() == 4:
        return torch.channels_last
    if t.dim() == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def _relayout(t, layout, device="cuda"):
    """t's values on `device` in another memory layout.

    misaligned: dense (channels_last for 4-D/5-D) but starting one element past an
    allocation, so the kernels must take their unvectorised path.
    """
    t = t.to(device)
    if layout == "channels_last":
        return t.contiguous(memory_format=_cl_format(t))
    if layout == "transposed":  # first and last dim swapped in memory: not dense
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if layout == "misaligned":
        dense = t.contiguous(memory_format=_cl_format(t))
        buf = torch.empty(dense.numel() + 1, dtype=t.dtype, device=device)
        view = buf[1:].as_strided(dense.shape, dense.stride())
        view.copy_(dense)
        return view
    return t.contiguous()


def _sdtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def _up(*ts):
    return [None if t is None else t.double() for t in ts]


def _floor(ref, rel, dtype):
    """Absolute error floor of the ~2x bound: `rel` of the result's magnitude, plus one
    unit of the output dtype's precision for float16/bfloat16 outputs (on a few elements
    eager can be exact by luck where a correctly rounded result is one ulp off)."""
    mag = ref.double().abs().max().item() if ref.numel() else 0.0
    ulp = torch.finfo(dtype).eps * mag if dtype in LOW else 0.0
    return rel * (1.0 + mag) + ulp


def _assert_within_2x(ours, eager, ref64, name, rel_floor=1e-6):
    """Error vs the float64 reference at most ~2x that of the reference op run in the
    working dtype, plus a small floor."""
    e_ours, e_eager = _max_err(ours, ref64), _max_err(eager, ref64)
    floor = _floor(ref64, rel_floor, ours.dtype)
    assert e_ours <= 2 * e_eager + floor, (name, e_ours, e_eager, floor)


def _bn_values(shape, dtype, seed=0):
    """y with a per-channel offset and spread (CPU, `dtype`), and a weight in float64."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    y = y * _pc(0.5 + torch.rand(C, generator=g, dtype=torch.float64), len(shape)) \
        + _pc(torch.randn(C, generator=g, dtype=torch.float64), len(shape))
    go = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(C, generator=g, dtype=torch.float64)
    return y.to(dtype), go.to(dtype), w


def make_bn_case(shape, dtype, layout, out_layout=None, seed=0):
    """CUDA y, grad_out, out = relu(xhat) (the ReLU mask), mean, invstd, weight."""
    y, go, w = _bn_values(shape, dtype, seed)
    sd = _sdtype(dtype)
    mean, invstd = R.bn_stats(y, None, None, 0.1, 1e-5)
    mean, invstd = mean.to(sd), invstd.to(sd)
    out = R.scale_bias_relu(y, invstd, -mean * invstd)
    ol = out_layout or layout
    return (_relayout(y, layout), _relayout(go, ol), _relayout(out, ol), mean.cuda(),
            invstd.cuda(), w.to(sd).cuda())


def _cpu(t):
    return None if t is None else t.cpu()


# ---------------------------------------------------------------------------------------
# bn_stats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_stats_matches_reference_and_cpu(shape, layout, dtype):
    y_cpu, _, _ = _bn_values(shape, dtype)
    y = _relayout(y_cpu, layout)
    C = shape[1]
    sd = _sdtype(dtype)
    rm0 = torch.randn(C, dtype=sd, device="cuda")
    rv0 = torch.rand(C, dtype=sd, device="cuda") + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    assert mean.device == y.device and invstd.device == y.device
    assert mean.dtype == invstd.dtype == sd and mean.shape == invstd.shape == (C,)

    rm64, rv64 = rm0.double(), rv0.double()
    mean64, invstd64 = R.bn_stats(y.double(), rm64, rv64, 0.1, 1e-5)
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mean, mean64, **tol)
        torch.testing.assert_close(invstd, invstd64, **tol)
        torch.testing.assert_close(rm, rm64, **tol)
        torch.testing.assert_close(rv, rv64, **tol)
    else:
        eager = R.bn_stats(y, None, None, 0.1, 1e-5)  # float32 statistics of the same x
        _assert_within_2x(mean, eager[0], mean64, "mean")
        _assert_within_2x(invstd, eager[1], invstd64, "invstd")
        torch.testing.assert_close(rm.double(), rm64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv.double(), rv64, rtol=1e-5, atol=1e-6)
    if y.numel() == 0:  # running statistics untouched
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)

    # the CPU kernel on the same values
    rm_c, rv_c = rm0.cpu(), rv0.cpu()
    mean_c, invstd_c = _stats(y.cpu(), rm_c, rv_c, 0.1, 1e-5)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, e in ((mean, mean_c), (invstd, invstd_c), (rm, rm_c), (rv, rv_c)):
        torch.testing.assert_close(a.cpu(), e, **tol)

    # without running statistics: the same statistics, bitwise
    mean2, invstd2 = _stats(y, None, None, 0.1, 1e-5)
    assert torch.equal(mean2, mean) and torch.equal(invstd2, invstd)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (2, 3, 0, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bn_stats_empty(shape, dtype):
    y = torch.randn(shape).to(dtype).cuda()
    sd = _sdtype(dtype)
    rm, rv = torch.randn(3, dtype=sd, device="cuda"), torch.rand(3, dtype=sd, device="cuda")
    rm0, rv0 = rm.clone(), rv.clone()
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    assert torch.equal(mean, torch.zeros(3, dtype=sd, device="cuda"))
    torch.testing.assert_close(invstd, torch.full((3,), 1e-5, dtype=sd, device="cuda").rsqrt())
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (7, 3), (2, 4, 3, 2, 2), (8, 64, 14, 14)],
                         ids=str)
def test_running_stats_match_f_batch_norm(shape, layout, dtype, momentum):
    y_cpu, _, _ = _bn_values(shape, dtype, seed=3)
    y = _relayout(y_cpu, layout)
    C = shape[1]
    sd = _sdtype(dtype)
    g = torch.Generator().manual_seed(4)
    rm = torch.randn(C, generator=g).to(sd).cuda()
    rv = torch.rand(C, generator=g).to(sd).cuda()
    rm_bn, rv_bn = rm.clone(), rv.clone()
    mean, invstd = _stats(y, rm, rv, momentum, 1e-3)
    F.batch_norm(y, rm_bn, rv_bn, None, None, True, momentum, 1e-3)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5,
                                                                            atol=2e-6)
    torch.testing.assert_close(rm, rm_bn, **tol)
    torch.testing.assert_close(rv, rv_bn, **tol)
    # and invstd is the one F.batch_norm normalises with (biased variance)
    z = F.batch_norm(y.double(), None, None, None, None, True, 0.0, 1e-3)
    ours = (y.double() - _pc(mean.double(), y.dim())) * _pc(invstd.double(), y.dim())
    ztol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                             atol=1e-4)
    torch.testing.assert_close(ours, z, **ztol)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float16)], ids=str)
def test_running_stats_in_other_dtypes(dtypes):
    """Low-precision x may carry running statistics in its own dtype (even mixed)."""
    rm_dt, rv_dt = dtypes
    x_dt = torch.float16 if torch.float16 in dtypes else torch.bfloat16
    y_cpu, _, _ = _bn_values((4, 5, 6, 6), x_dt)
    y = _relayout(y_cpu, "channels_last")
    rm = torch.zeros(5, dtype=rm_dt, device="cuda")
    rv = torch.ones(5, dtype=rv_dt, device="cuda")
    rm_ref, rv_ref = rm.double(), rv.double()
    _stats(y, rm, rv, 0.1, 1e-5)
    R.bn_stats(y.double(), rm_ref, rv_ref, 0.1, 1e-5)
    assert rm.dtype == rm_dt and rv.dtype == rv_dt
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-2, atol=1e-2)


def test_running_stats_float32_with_float64_x():
    y_cpu, _, _ = _bn_values((3, 4, 5, 5), torch.float64)
    y = y_cpu.cuda()
    rm, rv = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
    rm_ref, rv_ref = rm.double(), rv.double()
    _stats(y, rm, rv, 0.1, 1e-5)
    R.bn_stats(y, rm_ref, rv_ref, 0.1, 1e-5)
    assert rm.dtype == rv.dtype == torch.float32
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_stats_large_mean_is_stable(layout):
    """mean 1e4 (and -3e4), std 1-2 in float32: no E[x^2] - E[x]^2 cancellation."""
    g = torch.Generator().manual_seed(1)
    C = 8
    y = (1e4 + torch.randn(16, C, 12, 12, generator=g, dtype=torch.float64)).float()
    y[:, 1] = (-3e4 + 2.0 * torch.randn(16, 12, 12, generator=g)).float()
    y = _relayout(y, layout)
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    var = 1 / invstd.double() ** 2 - 1e-5
    torch.testing.assert_close(var, var64, rtol=1e-3, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)


def test_bn_stats_nonfinite_first_value():
    y = torch.randn(4, 2, 3, 3)
    y[0, 0, 0, 0] = float("inf")
    for layout in ("contiguous", "channels_last"):
        mean, invstd = _stats(_relayout(y, layout), None, None, 0.1, 1e-5)
        assert mean[0].item() == float("inf")
        assert torch.isfinite(mean[1]) and torch.isfinite(invstd[1])


def test_bn_stats_one_value_per_channel():
    y = torch.randn(1, 3, dtype=torch.float64, device="cuda")
    rm = torch.zeros(3, dtype=torch.float64, device="cuda")
    rv = torch.ones(3, dtype=torch.float64, device="cuda")
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    torch.testing.assert_close(mean, y[0])
    torch.testing.assert_close(invstd, torch.full_like(mean, 1e-5).rsqrt())
    torch.testing.assert_close(rv, torch.full_like(rv, 0.9))  # M == 1: var itself (0)


# ---------------------------------------------------------------------------------------
# scale_bias_relu (and the shared forward of scale_bias_add_relu)


def make_sbr_inputs(shape, dtype, param_dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    s = torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    pd = param_dtype or dtype
    return (_relayout(x.to(dtype), layout), s.to(pd).cuda(), b.to(pd).cuda(),
            _relayout(r.to(dtype), layout))


@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scale_bias_relu_matches_reference_and_cpu(shape, layout, dtype, param_dtype):
    x, s, b, r = make_sbr_inputs(shape, dtype, param_dtype, layout)
    out = _sbr(x, s, b)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.is_contiguous(memory_format=_fmt(x))
    ref64 = R.scale_bias_relu(*_up(x, s, b))
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=1e-14, atol=1e-14)
    elif dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref64, rtol=1e-6, atol=1e-6)
    else:
        _assert_within_2x(out, R.scale_bias_relu(x, s, b), ref64, "scale_bias_relu")
    out_cpu = _sbr(x.cpu(), s.cpu(), b.cpu())
    lp = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(out.cpu(), out_cpu, rtol=lp, atol=lp)

    # scale_bias_add_relu runs the same kernel with the residual
    out2 = _sbar(x, s, b, r)
    ref64 = R.scale_bias_add_relu(*_up(x, s, b, r))
    if dtype in LOW:
        _assert_within_2x(out2, R.scale_bias_add_relu(x, s, b, r), ref64, "add_relu")
    else:
        torch.testing.assert_close(out2.double(), ref64, rtol=1e-6, atol=1e-6)


def test_scale_bias_relu_keeps_nan():
    x = torch.tensor([[1.0, float("nan"), -1.0, 2.0]] * 2, device="cuda")  # [2, 4]
    s = torch.ones(4, device="cuda")
    b = torch.zeros(4, device="cuda")
    out = _sbr(x, s, b)
    assert torch.isnan(out[:, 1]).all() and out[0, 2].item() == 0.0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_scale_bias_relu_autograd(layout):
    x, s, b, _ = make_sbr_inputs((4, 16, 9, 7), torch.float32, None, layout)
    grad = torch.randn(x.shape, device="cuda")
    ins = [t.clone().requires_grad_(True) for t in (x, s, b)]
    ref = [t.clone().requires_grad_(True) for t in (x, s, b)]
    _sbr(*ins).backward(grad)
    R.scale_bias_relu(*ref).backward(grad)
    for a, e in zip(ins, ref):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# relu_bn_backward_reduce and bn_backward_apply


BWD_LAYOUTS = ["contiguous", "channels_last", "transposed", "misaligned", "mixed"]


def _layouts(layout):
    """(y layout, grad_out/out layout)."""
    if layout == "mixed":
        return "channels_last", "contiguous"
    return layout, layout


@pytest.mark.parametrize("want_dy", [True, False], ids=["dy", "no_dy"])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", BWD_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reduce_matches_reference_and_cpu(shape, layout, dtype, with_out, want_dy):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, _ = make_bn_case(shape, dtype, yl, ol)
    o = out if with_out else None
    sd, sdx, dy = _reduce(go, o, y, mean, invstd, want_dy)
    C = shape[1]
    assert sd.shape == sdx.shape == (C,) and sd.dtype == sdx.dtype == mean.dtype
    assert sd.device == y.device
    ref_sd, ref_sdx, ref_dy = R.relu_bn_backward_reduce(*_up(go, o, y, mean, invstd), True)
    if dtype == torch.float64:
        torch.testing.assert_close(sd, ref_sd, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sdx, ref_sdx, rtol=1e-10, atol=1e-10)
    else:
        e_sd, e_sdx, _ = R.relu_bn_backward_reduce(go, o, y, mean, invstd, False)
        _assert_within_2x(sd, e_sd, ref_sd, "sum_dy", 1e-5)
        _assert_within_2x(sdx, e_sdx, ref_sdx, "sum_dy_xhat", 1e-5)
    if want_dy:
        assert dy.shape == y.shape and dy.dtype == y.dtype
        assert dy.is_contiguous(memory_format=_fmt(y))
        assert torch.equal(dy.double(), ref_dy)  # masking is exact
    else:
        assert dy.shape == (0,) and dy.dtype == y.dtype and dy.device == y.device
    # the CPU kernel
    c_sd, c_sdx, c_dy = _reduce(_cpu(go), _cpu(o), y.cpu(), mean.cpu(), invstd.cpu(), want_dy)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                            atol=1e-3)
    torch.testing.assert_close(sd.cpu(), c_sd, **tol)
    torch.testing.assert_close(sdx.cpu(), c_sdx, **tol)
    if want_dy:
        assert torch.equal(dy.cpu(), c_dy)


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", BWD_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_apply_matches_reference_and_cpu(shape, layout, dtype, with_out, weighted):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype, yl, ol)
    o = out if with_out else None
    wt = w if weighted else None
    sd, sdx, _ = R.relu_bn_backward_reduce(go, o, y, mean, invstd, False)
    gy = _apply(go, o, y, mean, invstd, wt, sd, sdx)
    assert gy.shape == y.shape and gy.dtype == y.dtype and gy.device == y.device
    assert gy.is_contiguous(memory_format=_fmt(y))
    ref64 = R.bn_backward_apply(*_up(go, o, y, mean, invstd, wt, sd, sdx))
    if dtype == torch.float64:
        torch.testing.assert_close(gy, ref64, rtol=1e-10, atol=1e-10)
    else:
        eager = R.bn_backward_apply(go, o, y, mean, invstd, wt, sd, sdx)
        _assert_within_2x(gy, eager, ref64, "grad_y")
    gy_c = _apply(_cpu(go), _cpu(o), y.cpu(), mean.cpu(), invstd.cpu(), _cpu(wt), sd.cpu(),
                  sdx.cpu())
    lp = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}.get(dtype, 1e-10)
    torch.testing.assert_close(gy.cpu(), gy_c, rtol=lp, atol=lp)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decomposition_matches_batch_norm_backward(layout, dtype):
    """bn_stats + relu_bn_backward_reduce + bn_backward_apply = autograd of
    relu(F.batch_norm(y, weight, bias, training=True))."""
    y_cpu, go_cpu, w64 = _bn_values((8, 32, 9, 9), dtype, seed=5)
    y, go = _relayout(y_cpu, layout), _relayout(go_cpu, layout)
    w = w64.float().cuda()
    bias = torch.randn(32, device="cuda")
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    out = _sbr(y, w * invstd, bias - w * invstd * mean)
    sd, sdx, _ = _reduce(go, out, y, mean, invstd, False)
    gy = _apply(go, out, y, mean, invstd, w, sd, sdx)
    # float64 autograd of F.batch_norm behind the same ReLU mask (taking the mask from
    # `out` keeps pre-activations within rounding of 0 from flipping it)
    y64 = y.double().requires_grad_(True)
    z64 = F.batch_norm(y64, None, None, w.double(), bias.double(), True, 0.0, 1e-5)
    z64.backward(torch.where(out > 0, go, torch.zeros_like(go)).double())
    tol = 1e-3 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(gy.double(), y64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_ops_empty_batch(dtype):
    y, go, out, mean, invstd, w = make_bn_case((0, 3, 4, 4), dtype, "channels_last")
    sd, sdx, dy = _reduce(go, out, y, mean, invstd, True)
    assert torch.equal(sd, torch.zeros_like(sd)) and torch.equal(sdx, torch.zeros_like(sdx))
    assert dy.shape == y.shape
    assert _apply(go, out, y, mean, invstd, w, sd, sdx).shape == y.shape


def test_expanded_grad_out():
    """A stride-0 grad_out (from .sum()) is made dense first."""
    y, _, out, mean, invstd, w = make_bn_case((2, 8, 5, 5), torch.float32, "channels_last")
    go = torch.ones((), device="cuda").expand(y.shape)
    got = _reduce(go, out, y, mean, invstd, True)
    ref = R.relu_bn_backward_reduce(go, out, y, mean, invstd, True)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_apply(go, out, y, mean, invstd, w, got[0], got[1]),
                               R.bn_backward_apply(go, out, y, mean, invstd, w, ref[0], ref[1]),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Training-size shape, determinism, streams and devices


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_large_bf16_shape(layout):
    """[128, 256, 56, 56] bf16, the largest block shape of a ResNet-50 training step."""
    shape = (128, 256, 56, 56)
    g = torch.Generator(device="cuda").manual_seed(0)
    y = (torch.randn(shape, device="cuda", generator=g) * 2 + 0.5).to(torch.bfloat16)
    y = y.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else y
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    e_mean, e_invstd = R.bn_stats(y, None, None, 0.1, 1e-5)
    _assert_within_2x(mean, e_mean, mean64, "mean")
    _assert_within_2x(invstd, e_invstd, (var64 + 1e-5).rsqrt(), "invstd")

    w = torch.randn(256, device="cuda")
    out = _sbr(y, w * invstd, -w * invstd * mean)
    del var64, mean64
    ref = R.scale_bias_relu(y.float(), w * invstd, -w * invstd * mean)
    _assert_within_2x(out, R.scale_bias_relu(y, w * invstd, -w * invstd * mean), ref, "sbr")
    del ref
    go = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    go = go.contiguous(memory_format=_fmt(y))
    sd, sdx, dy = _reduce(go, out, y, mean, invstd, True)
    r_sd, r_sdx, _ = R.relu_bn_backward_reduce(*_up(go, out, y, mean, invstd), False)
    e_sd, e_sdx, _ = R.relu_bn_backward_reduce(go, out, y, mean, invstd, False)
    _assert_within_2x(sd, e_sd, r_sd, "sum_dy", 1e-5)
    _assert_within_2x(sdx, e_sdx, r_sdx, "sum_dy_xhat", 1e-5)
    del r_sd, r_sdx
    assert torch.equal(dy, torch.where(out > 0, go, torch.zeros_like(go)))
    del dy
    gy = _apply(go, out, y, mean, invstd, w, sd, sdx)
    ref = R.bn_backward_apply(*_up(go, out, y, mean, invstd, w, sd, sdx))
    eager = R.bn_backward_apply(go, out, y, mean, invstd, w, sd, sdx)
    _assert_within_2x(gy, eager, ref, "grad_y")
    assert gy.is_contiguous(memory_format=_fmt(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
def test_deterministic(layout, dtype):
    """Two calls give bitwise equal results (fixed split, fixed-order merges)."""
    y, go, out, mean, invstd, w = make_bn_case((32, 64, 28, 28), dtype, layout)
    runs = []
    for _ in range(2):
        m, i = _stats(y, None, None, 0.1, 1e-5)
        sd, sdx, dy = _reduce(go, out, y, mean, invstd, True)
        gy = _apply(go, out, y, mean, invstd, w, sd, sdx)
        runs.append((m, i, sd, sdx, dy, gy, _sbr(y, invstd, -mean * invstd)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _misaligned_copy(t):
    """t's values in a view starting one element into its storage (same strides): never
    16-byte aligned, so the kernels cannot use 16-byte vector accesses on it."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = buf[1:].as_strided(t.shape, t.stride())
    v.copy_(t)
    assert v.storage_offset() == 1 and v.data_ptr() % 16 != 0
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(32, 64, 28, 28), (4, 16, 8, 8)], ids=str)
def test_misaligned_reductions_bitwise_equal_aligned(shape, layout, dtype):
    """The reduction split and order depend on shape and dtype only: an aligned copy and a
    misaligned view (storage_offset 1) give bitwise equal statistics and sums."""
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype, layout)
    m_a, i_a = _stats(y, None, None, 0.1, 1e-5)
    ym, gom, outm = _misaligned_copy(y), _misaligned_copy(go), _misaligned_copy(out)
    m_m, i_m = _stats(ym, None, None, 0.1, 1e-5)
    assert torch.equal(m_a, m_m) and torch.equal(i_a, i_m)
    for with_out in (True, False):
        o_a, o_m = (out, outm) if with_out else (None, None)
        sd_a, sdx_a, dy_a = _reduce(go, o_a, y, mean, invstd, True)
        sd_m, sdx_m, dy_m = _reduce(gom, o_m, ym, mean, invstd, True)
        assert torch.equal(sd_a, sd_m) and torch.equal(sdx_a, sdx_m), with_out
        assert torch.equal(dy_a, dy_m), with_out


def test_runs_on_the_current_stream():
    y, go, out, mean, invstd, w = make_bn_case((16, 32, 17, 17), torch.float32,
                                               "channels_last")
    expected = (_stats(y, None, None, 0.1, 1e-5), _reduce(go, out, y, mean, invstd, True))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = (_stats(y, None, None, 0.1, 1e-5), _reduce(go, out, y, mean, invstd, True))
    s.synchronize()
    for a, e in zip(got[0] + got[1], expected[0] + expected[1]):
        assert torch.equal(a, e)


@pytest.mark.skipif(torch.cuda.device_count() < 2 if torch.cuda.is_available() else True,
                    reason="needs two CUDA devices")
def test_second_device():
    """Inputs on cuda:1 while cuda:0 is current: kernels run on x's device."""
    y, go, out, mean, invstd, w = make_bn_case((4, 16, 9, 9), torch.float32, "channels_last")
    dev = torch.device("cuda", 1)
    args1 = [t.to(dev) for t in (y, go, out, mean, invstd, w)]
    with torch.cuda.device(0):
        m1, i1 = _stats(args1[0], None, None, 0.1, 1e-5)
        sd1, sdx1, dy1 = _reduce(args1[1], args1[2], args1[0], args1[3], args1[4], True)
        gy1 = _apply(args1[1], args1[2], args1[0], args1[3], args1[4], args1[5], sd1, sdx1)
    assert m1.device == dev and gy1.device == dev and dy1.device == dev
    m0, i0 = _stats(y, None, None, 0.1, 1e-5)
    torch.testing.assert_close(m1.cpu(), m0.cpu())
    torch.testing.assert_close(i1.cpu(), i0.cpu())


@pytest.mark.slow
def test_more_than_2_31_elements():
    """numel > 2^31: 64-bit element offsets (bf16, 4.3 GB per tensor)."""
    shape = (8, 64, 2049, 2049)
    assert torch.Size(shape).numel() > 2 ** 31
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2 ** 30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    y = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    y = y.contiguous(memory_format=torch.channels_last)
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    var_r, mean_r = torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_r, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(invstd, (var_r + 1e-5).rsqrt(), rtol=1e-3, atol=1e-4)
    del var_r, mean_r
    s = torch.rand(64, device="cuda") + 0.5
    b = torch.randn(64, device="cuda")
    out = _sbr(y, s, b)
    # check the tail (beyond element 2^31 in memory) and a head slice
    for sl in (slice(0, 1), slice(7, 8)):
        torch.testing.assert_close(out[sl].float(), R.scale_bias_relu(y[sl].float(), s, b),
                                   rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------------------------------
# opcheck on CUDA inputs

OPCHECK_CASES = [
    ((2, 3, 5, 4), torch.float32, "contiguous"),
    ((2, 16, 5, 4), torch.float32, "channels_last"),
    ((2, 3, 7, 5), torch.float64, "mixed"),
    ((3, 4), torch.float32, "contiguous"),
    ((2, 8, 4, 4), torch.bfloat16, "channels_last"),
    ((1, 3, 13, 1), torch.float16, "contiguous"),
    ((0, 3, 4, 4), torch.float32, "contiguous"),
]
NO_AOT_BACKWARD = ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck(op, args, grad_inputs=()):
    torch.library.opcheck(op, args)
    if grad_inputs:
        args = list(args)
        for k in grad_inputs:
            args[k] = args[k].clone().requires_grad_(True)
        torch.library.opcheck(op, tuple(args), test_utils=NO_AOT_BACKWARD)


@pytest.mark.parametrize("with_running", [True, False], ids=["running", "no_running"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_bn_stats(shape, dtype, layout, with_running):
    y, *_ = make_bn_case(shape, dtype, _layouts(layout)[0])
    C = shape[1]
    sd = _sdtype(dtype)
    rm, rv = ((torch.zeros(C, dtype=sd, device="cuda"), torch.ones(C, dtype=sd, device="cuda"))
              if with_running else (None, None))
    _opcheck(torch.ops.sdkernels.bn_stats.default, (y, rm, rv, 0.1, 1e-5), grad_inputs=(0,))


@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_scale_bias_relu(shape, dtype, layout, param_dtype):
    x, s, b, _ = make_sbr_inputs(shape, dtype, param_dtype, _layouts(layout)[0])
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_relu.default, (x, s, b))
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_relu.default,
                          tuple(t.clone().requires_grad_(True) for t in (x, s, b)))


@pytest.mark.parametrize("want_dy", [True, False])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_reduce(shape, dtype, layout, with_out, want_dy):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, _ = make_bn_case(shape, dtype, yl, ol)
    _opcheck(torch.ops.sdkernels.relu_bn_backward_reduce.default,
             (go, out if with_out else None, y, mean, invstd, want_dy), grad_inputs=(0, 2))


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_apply(shape, dtype, layout, with_out, weighted):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype, yl, ol)
    sd, sdx, _ = R.relu_bn_backward_reduce(go, out, y, mean, invstd, False)
    _opcheck(torch.ops.sdkernels.bn_backward_apply.default,
             (go, out if with_out else None, y, mean, invstd, w if weighted else None,
              sd, sdx), grad_inputs=(0, 2))


# ---------------------------------------------------------------------------------------
# Inputs on different devices: a clear RuntimeError naming the op, never a crash


def _mixed_device_cases():
    """(name, op, make_args, match) with make_args() -> args mixing CUDA and CPU."""
    def stats_cpu_running():
        x = torch.randn(2, 3, 4, 4, device="cuda")
        return (x, torch.zeros(3), torch.ones(3), 0.1, 1e-5)

    def stats_cpu_x():
        return (torch.randn(2, 3, 4, 4), torch.zeros(3, device="cuda"),
                torch.ones(3, device="cuda"), 0.1, 1e-5)

    def sbr_cpu_params():
        return (torch.randn(2, 3, 4, 4, device="cuda"), torch.ones(3), torch.zeros(3))

    def reduce_cpu_stats():
        y = torch.randn(2, 3, 4, 4, device="cuda")
        return (y, y, y, torch.zeros(3), torch.ones(3), True)

    def reduce_cpu_grad():
        y = torch.randn(2, 3, 4, 4, device="cuda")
        return (y.cpu(), None, y, torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"),
                False)

    def apply_cpu_weight():
        y = torch.randn(2, 3, 4, 4, device="cuda")
        z = torch.zeros(3, device="cuda")
        return (y, y, y, z, z + 1, torch.ones(3), z, z)

    def apply_cpu_sums():
        y = torch.randn(2, 3, 4, 4, device="cuda")
        z = torch.zeros(3, device="cuda")
        return (y, None, y, z, z + 1, None, torch.zeros(3), torch.zeros(3))

    return [
        ("stats_cpu_running", _stats, stats_cpu_running, f"{STATS}.*running_mean.*device"),
        ("stats_cpu_x", _stats, stats_cpu_x, f"{STATS}.*running_mean.*device"),
        ("sbr_cpu_params", _sbr, sbr_cpu_params, f"{SBR}.*scale.*device"),
        ("reduce_cpu_stats", _reduce, reduce_cpu_stats, f"{REDUCE}.*mean.*device"),
        ("reduce_cpu_grad", _reduce, reduce_cpu_grad, f"{REDUCE}.*grad_out.*device"),
        ("apply_cpu_weight", _apply, apply_cpu_weight, f"{APPLY}.*weight.*device"),
        ("apply_cpu_sums", _apply, apply_cpu_sums, f"{APPLY}.*sum_dy.*device"),
    ]


@pytest.mark.parametrize("case", _mixed_device_cases(), ids=lambda c: c[0])
def test_mixed_devices_raise(case):
    _, op, make_args, match = case
    with pytest.raises(RuntimeError, match=match):
        op(*make_args())
