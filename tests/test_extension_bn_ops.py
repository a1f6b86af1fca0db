"""Tests of the compiled training-BN ops, CPU and CUDA kernels: bn_stats,
scale_bias_relu, relu_bn_backward_reduce and bn_backward_apply (csrc/cpu, and
csrc/cuda/batch_norm_*), plus the vectorised forward kernel scale_bias_relu shares with
scale_bias_add_relu.

Every check is one test body run per device through the `device` fixture (DEVICES): the
"cuda" cases are marked gpu (tests/conftest.py skips them without a CUDA device) and skip
when the extension was built without CUDA kernels. Checks that only make sense on CUDA
(CUDA results against the CPU kernels, streams, a second GPU, training-size and > 2^31
element tensors, CPU/CUDA device mixes) are cuda-only tests (`cuda_only`). Nothing here
touches CUDA at import or collection time.

Oracles: sdkernels.ops.reference in float64, and in the working dtype for the ~2x error
bound of the low-precision dtypes. Where a tolerance differs per device, `_tol` and the
comments say why (the CUDA reductions combine many more float partials, in another order).

Skipped when the extension is not built, unless SDKERNELS_REQUIRE_EXTENSION=1 (CI), where
a missing extension fails every test.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from helpers import (LOW, assert_format_like, max_err, memory_format, per_channel,
                     relayout, upcast)
from sdkernels.ops import extension
from sdkernels.ops import reference as R

_REQUIRED = os.environ.get("SDKERNELS_REQUIRE_EXTENSION") == "1"
pytestmark = pytest.mark.skipif(
    not extension.is_available() and not _REQUIRED,
    reason=f"sdkernels compiled extension not available: {extension.unavailable_reason()}")

STATS = "sdkernels::bn_stats"
SBR = "sdkernels::scale_bias_relu"
SBAR = "sdkernels::scale_bias_add_relu"
REDUCE = "sdkernels::relu_bn_backward_reduce"
APPLY = "sdkernels::bn_backward_apply"
OPS = (STATS, SBR, REDUCE, APPLY)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _need_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
    if missing:
        pytest.skip(f"sdkernels._C has no CUDA kernels for {missing} (built without CUDA?)")


@pytest.fixture(params=DEVICES)
def device(request):
    """Each test taking `device` runs once on "cpu" and once on "cuda" (marked gpu)."""
    if request.param == "cuda":
        _need_cuda_kernels()
    return request.param


@pytest.fixture
def _cuda():
    _need_cuda_kernels()


def cuda_only(fn):
    """A test that only makes sense on CUDA: marked gpu, skips without CUDA kernels."""
    return pytest.mark.gpu(pytest.mark.usefixtures("_cuda")(fn))


def _skip_cuda_sized_on_cpu(shape, device):
    """CUDA_SIZED costs ~1 s a case on the CPU (the float64 oracles), hundreds of cases;
    the CPU kernels' parallel split is covered by (4, 16, 33, 31)."""
    if device == "cpu" and tuple(shape) == CUDA_SIZED:
        pytest.skip("CUDA-sized shape: CPU covered by (4, 16, 33, 31)")


CUDA_SIZED = (16, 32, 33, 31)
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [
    (1, 3, 4, 4),        # batch 1
    (0, 3, 4, 4),        # empty batch
    (2, 3, 7, 5),        # odd / prime spatial
    (2, 5, 13, 11),
    (3, 5, 13, 11),
    (3, 4, 13, 1),
    (2, 16, 13, 11),     # vectorisable C in channels_last, odd spatial
    (4, 64, 8, 8),       # vectorisable both ways
    (2, 5, 1, 1),
    (5, 6),              # 2-D [N, C]
    (2, 3, 11),          # 3-D [N, C, L]
    (2, 3, 4, 5, 3),     # 5-D
    (2, 8, 4, 5, 3),     # 5-D, vectorisable C
    (1, 1, 1, 1),
    (4, 1, 6, 6),        # C = 1
    (4, 16, 33, 31),     # several parallel tasks (CPU)
    CUDA_SIZED,          # several splits per channel (CUDA; skipped on CPU)
    (3, 70, 5, 5),       # C not dividing the channels-last period
]
# dense, channels-last, strided, non-dense, and dense but one element off alignment
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed", "misaligned"]


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


def _sdtype(dtype):
    """dtype of the statistics (mean, invstd, sums) for x of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu(t):
    return None if t is None else t.cpu()


def _floor(device, ref, rel, dtype):
    """Absolute error floor of the ~2x bound (see _assert_within_2x)."""
    mag = ref.double().abs().max().item() if ref.numel() else 0.0
    if device == "cpu":
        return rel * (1.0 + mag)
    # CUDA: plus one unit of the output dtype's precision for float16/bfloat16 outputs
    # (on a few elements eager can be exact by luck where a correctly rounded result is
    # one ulp off).
    ulp = torch.finfo(dtype).eps * mag if dtype in LOW else 0.0
    return rel * (1.0 + mag) + ulp


def _assert_within_2x(ours, eager, ref64, name, device, rel_floor=1e-6):
    """Error vs the float64 reference at most ~2x that of the reference op run in the
    working dtype, plus a small floor. The floor is a few float32 ulps: the kernels sum in
    float over short runs, then in double (CPU) or merge float partials (CUDA); torch's
    float sums are pairwise, so its error can be far below an ulp and 2x of it alone
    would be too strict."""
    e_ours, e_eager = max_err(ours, ref64), max_err(eager, ref64)
    floor = _floor(device, ref64, rel_floor, ours.dtype)
    assert e_ours <= 2 * e_eager + floor, (name, e_ours, e_eager, floor)


def make_bn_case(shape, dtype=torch.float64, layout="contiguous", seed=0, out_layout=None,
                 device="cpu"):
    """y, grad_out, out (= relu of the normalised y, the ReLU mask), mean, invstd, weight,
    on `device`.

    Values are random with a per-channel offset and spread (so the statistics matter).
    out_layout puts grad_out and out in another layout than y (mixed layouts).
    """
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    y = y * per_channel(0.5 + torch.rand(C, generator=g, dtype=torch.float64), len(shape)) \
        + per_channel(torch.randn(C, generator=g, dtype=torch.float64), len(shape))
    go = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(C, generator=g, dtype=torch.float64)
    y, go = y.to(dtype), go.to(dtype)
    sd = _sdtype(dtype)
    mean, invstd = R.bn_stats(y, None, None, 0.1, 1e-5)
    mean, invstd = mean.to(sd), invstd.to(sd)
    out = R.scale_bias_relu(y, invstd, -mean * invstd)  # relu(xhat)
    ol = out_layout or layout
    return (relayout(y, layout, device), relayout(go, ol, device), relayout(out, ol, device),
            mean.to(device), invstd.to(device), w.to(sd).to(device))


# ---------------------------------------------------------------------------------------
# bn_stats

STATS_SHAPES = SHAPES + [(4, 8, 9, 7), (32, 16, 8, 8), (3, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", STATS_SHAPES, ids=str)
def test_bn_stats_matches_reference(shape, layout, dtype, device):
    _skip_cuda_sized_on_cpu(shape, device)
    y, *_ = make_bn_case(shape, dtype=dtype, layout=layout, device=device)
    C = shape[1]
    sd = _sdtype(dtype)
    g = torch.Generator().manual_seed(2)
    rm0 = torch.randn(C, generator=g, dtype=sd).to(device)
    rv0 = (torch.rand(C, generator=g, dtype=sd) + 0.5).to(device)
    rm, rv = rm0.clone(), rv0.clone()
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    for t in (mean, invstd, rm, rv):
        assert t.dtype == sd and t.shape == (C,) and t.device == y.device

    rm64, rv64 = rm0.double(), rv0.double()
    mean64, invstd64 = R.bn_stats(y.double(), rm64, rv64, 0.1, 1e-5)
    if dtype == torch.float64:
        # CUDA: 1e-10, its fp64 reductions merge many more partials in another order
        tol = 1e-12 if device == "cpu" else 1e-10
        for a, e in ((mean, mean64), (invstd, invstd64), (rm, rm64), (rv, rv64)):
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    else:
        eager = R.bn_stats(y, None, None, 0.1, 1e-5)  # float32 statistics of the same x
        _assert_within_2x(mean, eager[0], mean64, "mean", device)
        _assert_within_2x(invstd, eager[1], invstd64, "invstd", device)
        # the running statistics are updated from the same statistics
        torch.testing.assert_close(rm.double(), rm64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rv.double(), rv64, rtol=1e-5, atol=1e-6)
    if y.numel() == 0:  # running statistics untouched
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)

    # without running statistics: the same statistics, bitwise
    mean2, invstd2 = _stats(y, None, None, 0.1, 1e-5)
    assert torch.equal(mean2, mean) and torch.equal(invstd2, invstd)


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_stats_cuda_matches_cpu_kernel(shape, layout, dtype):
    y, *_ = make_bn_case(shape, dtype=dtype, layout=layout, device="cuda")
    C = shape[1]
    sd = _sdtype(dtype)
    rm0 = torch.randn(C, dtype=sd, device="cuda")
    rv0 = torch.rand(C, dtype=sd, device="cuda") + 0.5
    rm, rv = rm0.clone(), rv0.clone()
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    rm_c, rv_c = rm0.cpu(), rv0.cpu()
    mean_c, invstd_c = _stats(y.cpu(), rm_c, rv_c, 0.1, 1e-5)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for a, e in ((mean, mean_c), (invstd, invstd_c), (rm, rm_c), (rv, rv_c)):
        torch.testing.assert_close(a.cpu(), e, **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_stats_large_mean_is_stable(layout, device):
    """mean 1e4 (and -3e4), std 1-2 in float32: the variance keeps ~1e-3 relative
    accuracy (no cancellation as in E[x^2] - E[x]^2 in float)."""
    g = torch.Generator().manual_seed(1)
    C = 8
    y = (1e4 + torch.randn(16, C, 12, 12, generator=g, dtype=torch.float64)).float()
    y[:, 1] = (-3e4 + 2.0 * torch.randn(16, 12, 12, generator=g)).float()
    y = relayout(y, layout, device)
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    var = 1 / invstd.double() ** 2 - 1e-5
    # need: ~1e-3. The CPU kernels shift by a first value and sum in double, so they do
    # far better; the CUDA kernels merge float partials (Welford/Chan).
    rtol = 1e-5 if device == "cpu" else 1e-3
    torch.testing.assert_close(var, var64, rtol=rtol, atol=0)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)


RUNNING_SHAPES = [(4, 6, 5, 3), (7, 3), (2, 4, 3, 2, 2), (8, 64, 14, 14)]


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", RUNNING_SHAPES, ids=str)
def test_running_stats_match_f_batch_norm(shape, layout, dtype, momentum, device):
    y, *_ = make_bn_case(shape, dtype=dtype, layout=layout, seed=3, device=device)
    C = shape[1]
    sd = _sdtype(dtype)
    g = torch.Generator().manual_seed(4)
    rm = torch.randn(C, generator=g).to(sd).to(device)
    rv = torch.rand(C, generator=g).to(sd).to(device)
    rm_bn, rv_bn = rm.clone(), rv.clone()
    mean, invstd = _stats(y, rm, rv, momentum, 1e-3)
    F.batch_norm(y, rm_bn, rv_bn, None, None, True, momentum, 1e-3)
    if dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
    elif device == "cpu":
        tol = dict(rtol=2e-6, atol=1e-6)
    else:  # float32 reductions on the GPU, by torch and by us, in different orders
        tol = dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(rm, rm_bn, **tol)
    torch.testing.assert_close(rv, rv_bn, **tol)
    # and invstd is the one F.batch_norm normalises with (biased variance), in float64
    z = F.batch_norm(y.double(), None, None, None, None, True, 0.0, 1e-3)
    ours = (y.double() - per_channel(mean.double(), y.dim())) \
        * per_channel(invstd.double(), y.dim())
    if dtype == torch.float64:  # CUDA: 1e-10 (see test_bn_stats_matches_reference)
        ztol = dict(rtol=1e-12, atol=1e-12) if device == "cpu" else dict(rtol=1e-10,
                                                                         atol=1e-10)
    else:
        ztol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, z, **ztol)
    if device == "cpu" and dtype == torch.float32:
        # and in float32, against F.batch_norm's own float32 normalisation
        zf = F.batch_norm(y, None, None, None, None, True, 0.0, 1e-3)
        torch.testing.assert_close(zf, (y - per_channel(mean, y.dim()))
                                   * per_channel(invstd, y.dim()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stat_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_running_stats_in_low_precision(stat_dtype, device):
    """bfloat16 x may carry bfloat16 or float32 running statistics (nn.BatchNorm2d
    converted with .to(bfloat16), or kept in float32)."""
    y, *_ = make_bn_case((4, 5, 6, 6), dtype=torch.bfloat16, layout="channels_last",
                         device=device)
    rm = torch.zeros(5, dtype=stat_dtype, device=device)
    rv = torch.ones(5, dtype=stat_dtype, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    _stats(y, rm, rv, 0.1, 1e-5)
    R.bn_stats(y, rm_ref, rv_ref, 0.1, 1e-5)
    assert rm.dtype == rv.dtype == stat_dtype
    tol = 1e-2 if stat_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(rm, rm_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, rv_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16),
                                    (torch.float16, torch.float16)], ids=str)
def test_running_stats_in_other_dtypes(dtypes, device):
    """Low-precision x may carry running statistics in its own dtype (even mixed)."""
    rm_dt, rv_dt = dtypes
    x_dt = torch.float16 if torch.float16 in dtypes else torch.bfloat16
    y, *_ = make_bn_case((4, 5, 6, 6), dtype=x_dt, layout="channels_last", device=device)
    rm = torch.zeros(5, dtype=rm_dt, device=device)
    rv = torch.ones(5, dtype=rv_dt, device=device)
    rm_ref, rv_ref = rm.double(), rv.double()
    _stats(y, rm, rv, 0.1, 1e-5)
    R.bn_stats(y.double(), rm_ref, rv_ref, 0.1, 1e-5)
    assert rm.dtype == rm_dt and rv.dtype == rv_dt
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-2, atol=1e-2)


def test_running_stats_float32_with_float64_x(device):
    y, *_ = make_bn_case((3, 4, 5, 5), dtype=torch.float64, device=device)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    rm_ref, rv_ref = rm.double(), rv.double()
    _stats(y, rm, rv, 0.1, 1e-5)
    R.bn_stats(y, rm_ref, rv_ref, 0.1, 1e-5)
    assert rm.dtype == rv.dtype == torch.float32
    torch.testing.assert_close(rm.double(), rm_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=1e-6, atol=1e-7)


def test_bn_stats_one_value_per_channel(device):
    """M == 1: the running variance takes var itself (0 here), as the schema says."""
    y = torch.randn(1, 3, dtype=torch.float64, device=device)
    rm = torch.zeros(3, dtype=torch.float64, device=device)
    rv = torch.ones(3, dtype=torch.float64, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    mean_ref, invstd_ref = R.bn_stats(y, rm_ref, rv_ref, 0.1, 1e-5)
    torch.testing.assert_close(mean, y[0])
    torch.testing.assert_close(invstd, torch.full_like(mean, 1e-5).rsqrt())
    for a, e in ((mean, mean_ref), (invstd, invstd_ref), (rm, rm_ref), (rv, rv_ref)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, torch.full_like(rv, 0.9))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (2, 3, 0, 4)], ids=str)
def test_bn_stats_empty(shape, dtype, device):
    y = torch.randn(shape).to(dtype).to(device)
    sd = _sdtype(dtype)
    for rdt in dict.fromkeys((torch.float32, sd)):  # float32, and x's statistics dtype
        rm = torch.randn(3, dtype=rdt, device=device)
        rv = torch.rand(3, dtype=rdt, device=device)
        rm0, rv0 = rm.clone(), rv.clone()
        mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
        mean_ref, invstd_ref = R.bn_stats(y, None, None, 0.1, 1e-5)
        assert mean.dtype == invstd.dtype == sd
        torch.testing.assert_close(mean, mean_ref)
        torch.testing.assert_close(invstd, invstd_ref)
        assert torch.equal(mean, torch.zeros(3, dtype=sd, device=device))
        torch.testing.assert_close(invstd, torch.full((3,), 1e-5, dtype=sd,
                                                      device=device).rsqrt())
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_zero_channels(device):
    y = torch.randn(2, 0, 3, device=device)
    e = torch.empty(0, device=device)
    mean, invstd = _stats(y, e.clone(), e.clone(), 0.1, 1e-5)
    assert mean.shape == invstd.shape == (0,)
    assert _sbr(y, e, e).shape == y.shape
    s1, s2, dy = _reduce(y, y, y, e, e, True)
    assert s1.shape == s2.shape == (0,) and dy.shape == y.shape
    assert _apply(y, y, y, e, e, e, e, e).shape == y.shape


def test_bn_stats_nan_propagates(device):
    y = torch.randn(4, 2, 3, 3).contiguous(memory_format=torch.channels_last).to(device)
    y[1, 1, 2, 0] = float("nan")
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    assert torch.isnan(mean[1]) and torch.isnan(invstd[1])
    assert torch.isfinite(mean[0]) and torch.isfinite(invstd[0])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_stats_nonfinite_first_value(layout, device):
    """The per-channel shift skips a non-finite first value (the result is still the
    non-finite one F.batch_norm gives, not a NaN made by the shift)."""
    y = torch.randn(4, 2, 3, 3)
    y[0, 0, 0, 0] = float("inf")
    mean, invstd = _stats(relayout(y, layout, device), None, None, 0.1, 1e-5)
    assert mean[0].item() == float("inf")
    assert torch.isfinite(mean[1]) and torch.isfinite(invstd[1])


# ---------------------------------------------------------------------------------------
# scale_bias_relu (and the shared forward of scale_bias_add_relu)


def make_sbr_inputs(shape, dtype=torch.float64, param_dtype=None, layout="contiguous",
                    margin=None, seed=0, device="cpu"):
    """x, scale, bias and a residual r (for scale_bias_add_relu) on `device`; with
    `margin`, every pre-activation x*s+b is at least `margin` from 0."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    s = torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    if margin is not None:  # keep every pre-activation at least `margin` from 0
        v = x * per_channel(s, x.dim()) + per_channel(b, x.dim())
        v = torch.where(v.abs() < margin, torch.sign(v + 1e-30) * margin, v)
        x = (v - per_channel(b, x.dim())) / per_channel(s, x.dim())
    pd = param_dtype or dtype
    return (relayout(x.to(dtype), layout, device), s.to(pd).to(device),
            b.to(pd).to(device), relayout(r.to(dtype), layout, device))


SBR_SHAPES = SHAPES + [(4, 8, 9, 7), (6, 5)]


@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SBR_SHAPES, ids=str)
def test_scale_bias_relu_matches_reference(shape, layout, dtype, param_dtype, device):
    _skip_cuda_sized_on_cpu(shape, device)
    x, s, b, r = make_sbr_inputs(shape, dtype, param_dtype, layout, device=device)
    out = _sbr(x, s, b)
    assert out.dtype == x.dtype and out.device == x.device
    assert_format_like(out, x)
    ref64 = R.scale_bias_relu(*upcast(x, s, b))
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=1e-14, atol=1e-14)
    else:
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref64, rtol=1e-6, atol=1e-6)
        eager = R.scale_bias_relu(x, s, b)
        if device == "cpu":
            assert max_err(out, ref64) <= 2 * max_err(eager, ref64) + 1e-6
        else:
            _assert_within_2x(out, eager, ref64, "scale_bias_relu", device)

    # scale_bias_add_relu runs the same kernel with the residual
    out2 = _sbar(x, s, b, r)
    ref64 = R.scale_bias_add_relu(*upcast(x, s, b, r))
    if dtype in LOW:
        _assert_within_2x(out2, R.scale_bias_add_relu(x, s, b, r), ref64, "add_relu", device)
    else:
        torch.testing.assert_close(out2.double(), ref64, rtol=1e-6, atol=1e-6)


@cuda_only
@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scale_bias_relu_cuda_matches_cpu_kernel(shape, layout, dtype, param_dtype):
    x, s, b, _ = make_sbr_inputs(shape, dtype, param_dtype, layout, device="cuda")
    out = _sbr(x, s, b)
    out_cpu = _sbr(x.cpu(), s.cpu(), b.cpu())
    lp = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(out.cpu(), out_cpu, rtol=lp, atol=lp)


def test_scale_bias_relu_keeps_nan(device):
    x = torch.tensor([[float("nan"), -1.0, 2.0]], device=device).reshape(1, 1, 3)
    out = _sbr(x, torch.ones(1, device=device), torch.zeros(1, device=device))
    assert torch.isnan(out[0, 0, 0]) and out[0, 0, 1] == 0 and out[0, 0, 2] == 2
    x = torch.tensor([[1.0, float("nan"), -1.0, 2.0]] * 2, device=device)  # [2, 4]
    out = _sbr(x, torch.ones(4, device=device), torch.zeros(4, device=device))
    assert torch.isnan(out[:, 1]).all() and out[0, 2].item() == 0.0


def _grads(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 4), (2, 3, 7), (1, 2, 3, 1, 2)], ids=str)
def test_scale_bias_relu_autograd(shape, layout, device):
    x, s, b, _ = make_sbr_inputs(shape, layout=layout, margin=1e-3, device=device)
    grad = relayout(torch.randn(shape, dtype=torch.float64), layout, device)
    out, grads = _grads(extension.scale_bias_relu, (x, s, b), grad)
    ref_out, ref_grads = _grads(R.scale_bias_relu, (x, s, b), grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-14, atol=1e-14)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_scale_bias_relu_autograd_float32(layout, device):
    x, s, b, _ = make_sbr_inputs((4, 16, 9, 7), torch.float32, None, layout, device=device)
    grad = torch.randn(x.shape, device=device)
    ins = [t.clone().requires_grad_(True) for t in (x, s, b)]
    ref = [t.clone().requires_grad_(True) for t in (x, s, b)]
    _sbr(*ins).backward(grad)
    R.scale_bias_relu(*ref).backward(grad)
    for a, e in zip(ins, ref):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 4), (2, 3, 7), (1, 2, 3, 1, 2)], ids=str)
def test_scale_bias_relu_gradcheck(shape, layout, device):
    x, s, b, _ = make_sbr_inputs(shape, layout=layout, margin=1e-2, device=device)
    inputs = [t.detach().requires_grad_(True) for t in (x, s, b)]
    assert torch.autograd.gradcheck(_sbr, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("which", range(3))
def test_scale_bias_relu_needs_input_grad(which, device):
    x, s, b, _ = make_sbr_inputs((2, 3, 4, 4), margin=1e-3, device=device)
    inputs = [x, s, b]
    inputs[which] = inputs[which].clone().requires_grad_(True)
    _sbr(*inputs).sum().backward()
    for i, t in enumerate(inputs):
        assert (t.grad is not None) == (i == which)


def test_scale_bias_relu_param_grad_dtypes(device):
    x, s, b, _ = make_sbr_inputs((2, 3, 4, 4), dtype=torch.bfloat16,
                                 param_dtype=torch.float32, device=device)
    inputs = [t.clone().requires_grad_(True) for t in (x, s, b)]
    _sbr(*inputs).sum().backward()
    assert inputs[0].grad.dtype == torch.bfloat16
    assert inputs[1].grad.dtype == inputs[2].grad.dtype == torch.float32


def test_scale_bias_relu_double_backward_raises(device):
    x, s, b, _ = make_sbr_inputs((2, 3, 4, 4), margin=1e-3, device=device)
    x.requires_grad_(True)
    s.requires_grad_(True)
    (gx,) = torch.autograd.grad(_sbr(x, s, b).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.sum(), s)


# ---------------------------------------------------------------------------------------
# relu_bn_backward_reduce and bn_backward_apply

BWD_SHAPES = SHAPES + [(4, 8, 9, 7), (32, 16, 8, 8), (6, 5)]
BWD_LAYOUTS = LAYOUTS + ["mixed_cl_y", "mixed_nchw_y", "mixed_cl_y_nchw_out"]


def _layouts(name):
    """(y layout, grad_out/out layout)."""
    return {"mixed_cl_y": ("channels_last", "transposed"),
            "mixed_nchw_y": ("contiguous", "channels_last"),
            "mixed_cl_y_nchw_out": ("channels_last", "contiguous")}.get(name, (name, name))


@pytest.mark.parametrize("want_dy", [True, False], ids=["dy", "no_dy"])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", BWD_LAYOUTS)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=str)
def test_reduce_matches_reference(shape, layout, dtype, with_out, want_dy, device):
    _skip_cuda_sized_on_cpu(shape, device)
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, _ = make_bn_case(shape, dtype, yl, out_layout=ol,
                                               device=device)
    o = out if with_out else None
    sd, sdx, dy = _reduce(go, o, y, mean, invstd, want_dy)
    C = shape[1]
    assert sd.shape == sdx.shape == (C,) and sd.dtype == sdx.dtype == mean.dtype
    assert sd.device == y.device
    ref_sd, ref_sdx, ref_dy = R.relu_bn_backward_reduce(*upcast(go, o, y, mean, invstd), True)
    if dtype == torch.float64:
        torch.testing.assert_close(sd, ref_sd, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sdx, ref_sdx, rtol=1e-10, atol=1e-10)
    else:
        e_sd, e_sdx, _ = R.relu_bn_backward_reduce(go, o, y, mean, invstd, False)
        # floor for the sums: a few float32 ulps of the result on the CPU; 10x that on
        # CUDA, whose float32 partial sums are merged across many more blocks
        rel = 1e-6 if device == "cpu" else 1e-5
        _assert_within_2x(sd, e_sd, ref_sd, "sum_dy", device, rel)
        _assert_within_2x(sdx, e_sdx, ref_sdx, "sum_dy_xhat", device, rel)
    if want_dy:
        assert dy.dtype == y.dtype and dy.device == y.device
        assert_format_like(dy, y)
        assert torch.equal(dy.double(), ref_dy)  # masking is exact
    else:
        assert dy.shape == (0,) and dy.dtype == y.dtype and dy.device == y.device


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", BWD_LAYOUTS)
@pytest.mark.parametrize("shape", BWD_SHAPES, ids=str)
def test_apply_matches_reference(shape, layout, dtype, with_out, weighted, device):
    _skip_cuda_sized_on_cpu(shape, device)
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype, yl, out_layout=ol,
                                               device=device)
    o = out if with_out else None
    wt = w if weighted else None
    sd, sdx, _ = R.relu_bn_backward_reduce(go, o, y, mean, invstd, False)
    gy = _apply(go, o, y, mean, invstd, wt, sd, sdx)
    assert gy.dtype == y.dtype and gy.device == y.device
    assert_format_like(gy, y)
    ref64 = R.bn_backward_apply(*upcast(go, o, y, mean, invstd, wt, sd, sdx))
    if dtype == torch.float64:
        torch.testing.assert_close(gy, ref64, rtol=1e-10, atol=1e-10)
    else:
        eager = R.bn_backward_apply(go, o, y, mean, invstd, wt, sd, sdx)
        # CPU: the tighter floor it has always met; CUDA: a few float32 ulps
        rel = 2.5e-7 if device == "cpu" else 1e-6
        _assert_within_2x(gy, eager, ref64, "grad_y", device, rel)


@cuda_only
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", BWD_LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_ops_cuda_match_cpu_kernels(shape, layout, dtype, with_out):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype, yl, out_layout=ol,
                                               device="cuda")
    o = out if with_out else None
    for want_dy in (True, False):
        sd, sdx, dy = _reduce(go, o, y, mean, invstd, want_dy)
        c_sd, c_sdx, c_dy = _reduce(_cpu(go), _cpu(o), y.cpu(), mean.cpu(), invstd.cpu(),
                                    want_dy)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                                atol=1e-3)
        torch.testing.assert_close(sd.cpu(), c_sd, **tol)
        torch.testing.assert_close(sdx.cpu(), c_sdx, **tol)
        if want_dy:
            assert torch.equal(dy.cpu(), c_dy)
    sd, sdx, _ = R.relu_bn_backward_reduce(go, o, y, mean, invstd, False)
    lp = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}.get(dtype, 1e-10)
    for wt in (w, None):
        gy = _apply(go, o, y, mean, invstd, wt, sd, sdx)
        gy_c = _apply(_cpu(go), _cpu(o), y.cpu(), mean.cpu(), invstd.cpu(), _cpu(wt),
                      sd.cpu(), sdx.cpu())
        torch.testing.assert_close(gy.cpu(), gy_c, rtol=lp, atol=lp)


@pytest.mark.parametrize("shape,dtype", [((2, 3, 5, 5), torch.float64),
                                         ((2, 8, 5, 5), torch.float32)], ids=str)
def test_expanded_grad_out(shape, dtype, device):
    """A stride-0 grad_out (as from .sum()) is read correctly."""
    y, _, out, mean, invstd, w = make_bn_case(shape, dtype, "channels_last", device=device)
    go = torch.ones((), dtype=y.dtype, device=device).expand(y.shape)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, e in zip(_reduce(go, out, y, mean, invstd, True),
                    R.relu_bn_backward_reduce(go, out, y, mean, invstd, True)):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    sd, sdx, _ = _reduce(go, out, y, mean, invstd, False)
    torch.testing.assert_close(_apply(go, out, y, mean, invstd, w, sd, sdx),
                               R.bn_backward_apply(go, out, y, mean, invstd, w, sd, sdx),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 5)], ids=str)
def test_backward_ops_empty_batch(shape, dtype, layout, device):
    y = relayout(torch.randn(shape).to(dtype), layout, device)
    st = torch.zeros(shape[1], dtype=_sdtype(dtype), device=device)
    s1, s2, dy = _reduce(y, y, y, st, st + 1, True)
    assert torch.equal(s1, st) and torch.equal(s2, st) and dy.shape == y.shape
    assert _apply(y, None, y, st, st + 1, None, st, st).shape == y.shape
    assert _apply(y, y, y, st, st + 1, st + 1, st, st).shape == y.shape


# ---------------------------------------------------------------------------------------
# The whole decomposition reproduces autograd through relu(F.batch_norm(...))


@pytest.mark.parametrize("weighted", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(4, 5, 7, 6), (8, 3), (3, 4, 5, 3, 2), (1, 3, 5, 5)],
                         ids=str)
def test_decomposition_matches_autograd(shape, layout, weighted, device):
    g = torch.Generator().manual_seed(7)
    C = shape[1]
    y = relayout(torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5, layout,
                 device)
    gamma = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5) if weighted else None
    beta = 0.3 * torch.randn(C, generator=g, dtype=torch.float64) if weighted else None
    gamma = None if gamma is None else gamma.to(device)
    beta = None if beta is None else beta.to(device)
    grad = relayout(torch.randn(shape, generator=g, dtype=torch.float64), layout, device)
    rm = torch.zeros(C, dtype=torch.float64, device=device)
    rv = torch.ones(C, dtype=torch.float64, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()

    # autograd through eager BN + ReLU
    leaves = [t.clone().requires_grad_(True) for t in (y, gamma, beta) if t is not None]
    z = torch.relu(F.batch_norm(leaves[0], rm_ref, rv_ref, *(leaves[1:] or [None, None]),
                                True, 0.1, 1e-5))
    z.backward(grad)

    # the compiled ops
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    scale = invstd if gamma is None else gamma * invstd
    shift = -mean * scale if beta is None else beta - mean * scale
    out = _sbr(y, scale, shift)
    sum_dy, sum_dy_xhat, _ = _reduce(grad, out, y, mean, invstd, False)
    grad_y = _apply(grad, out, y, mean, invstd, gamma, sum_dy, sum_dy_xhat)

    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out, z.detach(), **tol)
    torch.testing.assert_close(grad_y, leaves[0].grad, **tol)
    if weighted:
        torch.testing.assert_close(sum_dy_xhat, leaves[1].grad, **tol)  # d gamma
        torch.testing.assert_close(sum_dy, leaves[2].grad, **tol)       # d beta
    torch.testing.assert_close(rm, rm_ref, **tol)
    torch.testing.assert_close(rv, rv_ref, **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decomposition_matches_batch_norm_backward(layout, dtype, device):
    """bn_stats + relu_bn_backward_reduce + bn_backward_apply in float32/bfloat16 =
    float64 autograd of relu(F.batch_norm(y, weight, bias, training=True))."""
    y, go, _, _, _, w64 = make_bn_case((8, 32, 9, 9), dtype, layout, seed=5, device=device)
    w = w64.float()
    bias = torch.randn(32).to(device)
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


# ---------------------------------------------------------------------------------------
# Determinism, alignment, training-size shapes, streams and devices


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_across_thread_counts(dtype, layout):
    """CPU only: the results do not depend on the number of intra-op threads."""
    y, go, out, mean, invstd, w = make_bn_case((8, 16, 40, 40), dtype=dtype, layout=layout)

    def run():
        rm, rv = torch.zeros(16), torch.ones(16)
        st = _stats(y, rm, rv, 0.1, 1e-5)
        red = _reduce(go, out, y, mean, invstd, True)
        gy = _apply(go, out, y, mean, invstd, w, red[0], red[1])
        return (*st, rm, rv, *red, gy, _sbr(y, invstd, w))

    old = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            results.append(run())
            results.append(run())
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
def test_deterministic(layout, dtype, device):
    """Two calls give bitwise equal results (fixed split, fixed-order merges)."""
    y, go, out, mean, invstd, w = make_bn_case((32, 64, 28, 28), dtype, layout,
                                               device=device)
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
def test_misaligned_reductions_bitwise_equal_aligned(shape, layout, dtype, device):
    """The reduction split and order depend on shape and dtype only: an aligned copy and a
    misaligned view (storage_offset 1) give bitwise equal statistics and sums."""
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype, layout, device=device)
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


@cuda_only
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_large_bf16_shape(layout):
    """[128, 256, 56, 56] bf16, the largest block shape of a ResNet-50 training step."""
    dev = "cuda"
    shape = (128, 256, 56, 56)
    g = torch.Generator(device=dev).manual_seed(0)
    y = (torch.randn(shape, device=dev, generator=g) * 2 + 0.5).to(torch.bfloat16)
    y = y.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else y
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    e_mean, e_invstd = R.bn_stats(y, None, None, 0.1, 1e-5)
    _assert_within_2x(mean, e_mean, mean64, "mean", dev)
    _assert_within_2x(invstd, e_invstd, (var64 + 1e-5).rsqrt(), "invstd", dev)

    w = torch.randn(256, device=dev)
    out = _sbr(y, w * invstd, -w * invstd * mean)
    del var64, mean64
    ref = R.scale_bias_relu(y.float(), w * invstd, -w * invstd * mean)
    _assert_within_2x(out, R.scale_bias_relu(y, w * invstd, -w * invstd * mean), ref, "sbr",
                      dev)
    del ref
    go = torch.randn(shape, device=dev, generator=g).to(torch.bfloat16)
    go = go.contiguous(memory_format=memory_format(y))
    sd, sdx, dy = _reduce(go, out, y, mean, invstd, True)
    r_sd, r_sdx, _ = R.relu_bn_backward_reduce(*upcast(go, out, y, mean, invstd), False)
    e_sd, e_sdx, _ = R.relu_bn_backward_reduce(go, out, y, mean, invstd, False)
    _assert_within_2x(sd, e_sd, r_sd, "sum_dy", dev, 1e-5)
    _assert_within_2x(sdx, e_sdx, r_sdx, "sum_dy_xhat", dev, 1e-5)
    del r_sd, r_sdx
    assert torch.equal(dy, torch.where(out > 0, go, torch.zeros_like(go)))
    del dy
    gy = _apply(go, out, y, mean, invstd, w, sd, sdx)
    ref = R.bn_backward_apply(*upcast(go, out, y, mean, invstd, w, sd, sdx))
    eager = R.bn_backward_apply(go, out, y, mean, invstd, w, sd, sdx)
    _assert_within_2x(gy, eager, ref, "grad_y", dev)
    assert gy.is_contiguous(memory_format=memory_format(y))


@cuda_only
def test_runs_on_the_current_stream():
    y, go, out, mean, invstd, w = make_bn_case((16, 32, 17, 17), torch.float32,
                                               "channels_last", device="cuda")
    expected = (_stats(y, None, None, 0.1, 1e-5), _reduce(go, out, y, mean, invstd, True))
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = (_stats(y, None, None, 0.1, 1e-5), _reduce(go, out, y, mean, invstd, True))
    s.synchronize()
    for a, e in zip(got[0] + got[1], expected[0] + expected[1]):
        assert torch.equal(a, e)


@cuda_only
def test_second_device():
    """Inputs on cuda:1 while cuda:0 is current: kernels run on x's device."""
    if torch.cuda.device_count() < 2:  # asked at run time, never at collection
        pytest.skip("needs two CUDA devices")
    y, go, out, mean, invstd, w = make_bn_case((4, 16, 9, 9), torch.float32, "channels_last",
                                               device="cuda")
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


@cuda_only
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
# Autograd registration of the non-differentiable ops (C++ NotImplemented kernels)


def test_bn_ops_are_not_differentiable(device):
    y, go, out, mean, invstd, w = make_bn_case((2, 3, 4, 4), device=device)
    yg = y.clone().requires_grad_(True)
    m, i = _stats(yg, None, None, 0.1, 1e-5)  # the forward runs
    with pytest.raises(RuntimeError, match=f"derivative for {STATS} is not implemented"):
        (m.sum() + i.sum()).backward()
    s1, s2, dy = _reduce(go, out, yg, mean, invstd, True)
    with pytest.raises(RuntimeError, match=f"derivative for {REDUCE} is not implemented"):
        s2.sum().backward()
    gy = _apply(go, out, yg, mean, invstd, w, s1.detach(), s2.detach())
    with pytest.raises(RuntimeError, match=f"derivative for {APPLY} is not implemented"):
        gy.sum().backward()
    # without grad (inside a hand-written backward) nothing is recorded
    with torch.no_grad():
        assert _stats(yg, None, None, 0.1, 1e-5)[0].grad_fn is None
    assert _stats(y, None, None, 0.1, 1e-5)[0].grad_fn is None


# ---------------------------------------------------------------------------------------
# opcheck (schema, fake kernel, autograd registration, AOT dispatch)

OPCHECK_CASES = [
    ((2, 3, 5, 4), torch.float32, "contiguous"),
    ((2, 3, 5, 4), torch.float32, "channels_last"),
    ((2, 16, 5, 4), torch.float32, "channels_last"),
    ((2, 3, 7, 5), torch.float64, "mixed_cl_y"),
    ((2, 3, 7, 5), torch.float64, "mixed_cl_y_nchw_out"),
    ((3, 4), torch.float32, "contiguous"),
    ((2, 3, 11), torch.float32, "transposed"),
    ((2, 4, 3, 3), torch.bfloat16, "channels_last"),
    ((2, 8, 4, 4), torch.bfloat16, "channels_last"),
    ((1, 3, 13, 1), torch.float16, "contiguous"),
    ((0, 3, 4, 4), torch.float32, "contiguous"),
]
# The non-differentiable ops raise on backward, which test_aot_dispatch_dynamic runs
# when inputs require grad; with grad-requiring inputs they get the other checks.
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
def test_opcheck_bn_stats(shape, dtype, layout, with_running, device):
    y, *_ = make_bn_case(shape, dtype=dtype, layout=_layouts(layout)[0], device=device)
    C = shape[1]
    sd = _sdtype(dtype)
    for rdt in dict.fromkeys((torch.float32, sd)):  # float32, and x's statistics dtype
        rm, rv = ((torch.zeros(C, dtype=rdt, device=device),
                   torch.ones(C, dtype=rdt, device=device)) if with_running else (None, None))
        _opcheck(torch.ops.sdkernels.bn_stats.default, (y, rm, rv, 0.1, 1e-5),
                 grad_inputs=(0,))
        if not with_running:
            break


@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_scale_bias_relu(shape, dtype, layout, param_dtype, device):
    x, s, b, _ = make_sbr_inputs(shape, dtype=dtype, param_dtype=param_dtype,
                                 layout=_layouts(layout)[0], margin=1e-2, device=device)
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_relu.default, (x, s, b))
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_relu.default,
                          tuple(t.clone().requires_grad_(True) for t in (x, s, b)))


@pytest.mark.parametrize("want_dy", [True, False])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_reduce(shape, dtype, layout, with_out, want_dy, device):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, _ = make_bn_case(shape, dtype=dtype, layout=yl, out_layout=ol,
                                               device=device)
    _opcheck(torch.ops.sdkernels.relu_bn_backward_reduce.default,
             (go, out if with_out else None, y, mean, invstd, want_dy), grad_inputs=(0, 2))


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_apply(shape, dtype, layout, with_out, weighted, device):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype=dtype, layout=yl, out_layout=ol,
                                               device=device)
    sd, sdx, _ = R.relu_bn_backward_reduce(go, out, y, mean, invstd, False)
    _opcheck(torch.ops.sdkernels.bn_backward_apply.default,
             (go, out if with_out else None, y, mean, invstd, w if weighted else None,
              sd, sdx), grad_inputs=(0, 2))


def test_fake_tensor_mode_output_metadata(device):
    from torch._subclasses.fake_tensor import FakeTensorMode
    y, go, out, mean, invstd, w = make_bn_case((2, 3, 5, 4), dtype=torch.bfloat16,
                                               layout="channels_last",
                                               out_layout="contiguous", device=device)
    real = (_stats(y, None, None, 0.1, 1e-5), _sbr(y, invstd, w),
            _reduce(go, out, y, mean, invstd, True), _reduce(go, None, y, mean, invstd, False),
            _apply(go, out, y, mean, invstd, w, mean, invstd))
    with FakeTensorMode() as mode:
        fy, fgo, fout, fm, fi, fw = (mode.from_tensor(t) for t in (y, go, out, mean, invstd, w))
        fake = (_stats(fy, None, None, 0.1, 1e-5), _sbr(fy, fi, fw),
                _reduce(fgo, fout, fy, fm, fi, True), _reduce(fgo, None, fy, fm, fi, False),
                _apply(fgo, fout, fy, fm, fi, fw, fm, fi))
    flat_real = [t for r in real for t in (r if isinstance(r, tuple) else (r,))]
    flat_fake = [t for r in fake for t in (r if isinstance(r, tuple) else (r,))]
    for a, e in zip(flat_fake, flat_real):
        assert a.shape == e.shape and a.dtype == e.dtype and a.stride() == e.stride()
        assert a.device == e.device


def test_torch_compile_fullgraph():
    """Fake kernels (incl. the in-place running-stat update) trace without graph breaks.
    CPU only: tracing does not depend on the device, and inductor's CUDA backend needs
    Triton."""
    torch._dynamo.reset()

    def fn(y, go, rm, rv, gamma):
        mean, invstd = torch.ops.sdkernels.bn_stats(y, rm, rv, 0.1, 1e-5)
        scale = gamma * invstd
        out = torch.ops.sdkernels.scale_bias_relu(y, scale, -mean * scale)
        sd, sdx, _ = torch.ops.sdkernels.relu_bn_backward_reduce(go, out, y, mean, invstd,
                                                                 False)
        gy = torch.ops.sdkernels.bn_backward_apply(go, out, y, mean, invstd, gamma, sd, sdx)
        return out, gy, sd, sdx

    y, go, _, _, _, w = make_bn_case((4, 3, 5, 4), dtype=torch.float32,
                                     layout="channels_last")
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_c, rv_c = rm.clone(), rv.clone()
    eager = fn(y, go, rm, rv, w.abs())
    comp = torch.compile(fn, fullgraph=True)(y, go, rm_c, rv_c, w.abs())
    for a, e in zip(comp, eager):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(rm_c, rm)
    torch.testing.assert_close(rv_c, rv)


# ---------------------------------------------------------------------------------------
# Bad input: RuntimeError naming the op, eager (C++ checks, per device) and on meta (fake
# kernel)


def _bad_cases():
    x = torch.randn(2, 3, 4, 4)
    st = torch.zeros(3)
    xi = x.to(torch.int32)
    cases = {
        # bn_stats
        "stats_int_x": (STATS, lambda d: _stats(xi.to(d), None, None, 0.1, 1e-5),
                        "float32, float64, bfloat16 or float16"),
        "stats_1d_x": (STATS, lambda d: _stats(st.to(d), None, None, 0.1, 1e-5),
                       "at least 2-D"),
        "stats_one_running": (STATS, lambda d: _stats(x.to(d), st.to(d), None, 0.1, 1e-5),
                              "both given or both None"),
        "stats_running_length": (STATS, lambda d: _stats(x.to(d), torch.zeros(4, device=d),
                                                         torch.zeros(4, device=d), 0.1,
                                                         1e-5), "running_mean"),
        "stats_running_dtype": (STATS, lambda d: _stats(x.to(d), st.double().to(d),
                                                        st.double().to(d), 0.1, 1e-5),
                                "running_mean"),
        "stats_running_noncontig": (STATS, lambda d: _stats(
            x.to(d), torch.zeros(6, device=d)[::2], torch.zeros(6, device=d)[::2], 0.1,
            1e-5), "contiguous"),
        "stats_momentum_high": (STATS, lambda d: _stats(x.to(d), None, None, 1.5, 1e-5),
                                "momentum in [0, 1], got 1.5"),
        "stats_momentum_negative": (STATS, lambda d: _stats(x.to(d), None, None, -0.1, 1e-5),
                                    "momentum in [0, 1]"),
        "stats_eps": (STATS, lambda d: _stats(x.to(d), None, None, 0.1, 0.0), "eps > 0"),
        # scale_bias_relu
        "sbr_int_x": (SBR, lambda d: _sbr(xi.to(d), st.to(d), st.to(d)),
                      "float32, float64, bfloat16 or float16"),
        "sbr_scale_length": (SBR, lambda d: _sbr(x.to(d), torch.zeros(4, device=d),
                                                 st.to(d)), "scale"),
        "sbr_bias_2d": (SBR, lambda d: _sbr(x.to(d), st.to(d), torch.zeros(1, 3, device=d)),
                        "bias"),
        "sbr_scale_dtype": (SBR, lambda d: _sbr(x.to(d), st.double().to(d),
                                                st.double().to(d)), "scale"),
        "sbr_mixed_param_dtypes": (SBR, lambda d: _sbr(x.double().to(d), st.to(d),
                                                       st.double().to(d)), "same dtype"),
        "sbr_0d_x": (SBR, lambda d: _sbr(torch.zeros((), device=d), st.to(d), st.to(d)),
                     "at least 2-D"),
        # relu_bn_backward_reduce
        "reduce_int_y": (REDUCE, lambda d: _reduce(xi.to(d), None, xi.to(d), st.to(d),
                                                   st.to(d), True),
                         "float32, float64, bfloat16 or float16"),
        "reduce_grad_shape": (REDUCE, lambda d: _reduce(torch.zeros(2, 3, 4, 5, device=d),
                                                        None, x.to(d), st.to(d), st.to(d),
                                                        True), "grad_out"),
        "reduce_out_dtype": (REDUCE, lambda d: _reduce(x.to(d), x.double().to(d), x.to(d),
                                                       st.to(d), st.to(d), True), "out"),
        "reduce_mean_dtype": (REDUCE, lambda d: _reduce(x.to(d), None, x.to(d),
                                                        st.double().to(d), st.to(d), True),
                              "mean"),
        "reduce_stat_for_double_y": (REDUCE, lambda d: _reduce(
            x.double().to(d), None, x.double().to(d), st.double().to(d), st.to(d), True),
            "expected invstd to be Double"),
        "reduce_invstd_length": (REDUCE, lambda d: _reduce(x.to(d), None, x.to(d), st.to(d),
                                                           torch.zeros(2, device=d), True),
                                 "invstd"),
        # bn_backward_apply
        "apply_int_y": (APPLY, lambda d: _apply(xi.to(d), None, xi.to(d), st.to(d),
                                                st.to(d), None, st.to(d), st.to(d)),
                        "float32, float64, bfloat16 or float16"),
        "apply_weight_dtype": (APPLY, lambda d: _apply(x.to(d), None, x.to(d), st.to(d),
                                                       st.to(d), st.double().to(d),
                                                       st.to(d), st.to(d)), "weight"),
        "apply_bf16_weight": (APPLY, lambda d: _apply(
            x.bfloat16().to(d), None, x.bfloat16().to(d), st.to(d), st.to(d),
            st.bfloat16().to(d), st.to(d), st.to(d)), "expected weight to be Float"),
        "apply_sum_dy_length": (APPLY, lambda d: _apply(x.to(d), None, x.to(d), st.to(d),
                                                        st.to(d), None,
                                                        torch.zeros(4, device=d), st.to(d)),
                                "sum_dy"),
        "apply_sum_dy_xhat_dtype": (APPLY, lambda d: _apply(
            x.to(d), None, x.to(d), st.to(d), st.to(d), None, st.to(d), st.double().to(d)),
            "sum_dy_xhat"),
        "apply_out_shape": (APPLY, lambda d: _apply(x.to(d), torch.zeros(2, 3, 4, device=d),
                                                    x.to(d), st.to(d), st.to(d), None,
                                                    st.to(d), st.to(d)), "out"),
    }
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("device", DEVICES + ["meta"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, device):
    if device == "cuda":
        _need_cuda_kernels()
    op, call, what = BAD[case]
    with pytest.raises(RuntimeError, match=op) as info:
        call(device)
    assert what in str(info.value)


def test_bad_input_mismatched_devices():
    """CPU x with meta statistics (the only second device on a CPU-only machine)."""
    x = torch.randn(2, 3, 4, 4)
    st = torch.zeros(3)
    with pytest.raises(RuntimeError, match=f"{STATS}.*device"):
        _stats(x, st.to("meta"), st.to("meta"), 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=f"{SBR}.*device"):
        _sbr(x, st, st.to("meta"))
    with pytest.raises(RuntimeError, match=f"{REDUCE}.*device"):
        _reduce(x, x.to("meta"), x, st, st, True)
    with pytest.raises(RuntimeError, match=f"{APPLY}.*device"):
        _apply(x, None, x, st, st, None, st.to("meta"), st)


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


@cuda_only
@pytest.mark.parametrize("case", _mixed_device_cases(), ids=lambda c: c[0])
def test_mixed_devices_raise(case):
    """Inputs on CUDA and CPU: a clear RuntimeError naming the op, never a crash."""
    _, op, make_args, match = case
    with pytest.raises(RuntimeError, match=match):
        op(*make_args())


def test_python_wrappers(device):
    y, go, out, mean, invstd, w = make_bn_case((2, 3, 4, 4), device=device)
    for a, e in zip(extension.bn_stats(y, None, None, 0.1, 1e-5), _stats(y, None, None, 0.1,
                                                                          1e-5)):
        assert torch.equal(a, e)
    assert torch.equal(extension.scale_bias_relu(y, invstd, w), _sbr(y, invstd, w))
    red = extension.relu_bn_backward_reduce(go, out, y, mean, invstd, True)
    for a, e in zip(red, _reduce(go, out, y, mean, invstd, True)):
        assert torch.equal(a, e)
    assert torch.equal(extension.bn_backward_apply(go, out, y, mean, invstd, w, *red[:2]),
                       _apply(go, out, y, mean, invstd, w, *red[:2]))
    for name in ("bn_stats", "scale_bias_relu", "relu_bn_backward_reduce",
                 "bn_backward_apply"):
        assert name in extension.__all__
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sdkernels::{name}",
                                                              device.upper())
