"""Tests of the compiled training-BN ops (CPU): bn_stats, scale_bias_relu,
relu_bn_backward_reduce and bn_backward_apply.

The oracle is sdkernels.ops.reference. Skipped when the extension is not built, unless
SDKERNELS_REQUIRE_EXTENSION=1 (CI), where a missing extension fails every test.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sdkernels.ops import extension
from sdkernels.ops import reference as R

_REQUIRED = os.environ.get("SDKERNELS_REQUIRE_EXTENSION") == "1"
pytestmark = pytest.mark.skipif(
    not extension.is_available() and not _REQUIRED,
    reason=f"sdkernels compiled extension not available: {extension.unavailable_reason()}")

STATS = "sdkernels::bn_stats"
SBR = "sdkernels::scale_bias_relu"
REDUCE = "sdkernels::relu_bn_backward_reduce"
APPLY = "sdkernels::bn_backward_apply"

SHAPES = [
    (1, 3, 4, 4),       # batch 1
    (0, 3, 4, 4),       # empty batch
    (2, 3, 7, 5),       # odd / prime spatial
    (2, 5, 13, 11),
    (3, 4, 13, 1),
    (2, 5, 1, 1),
    (5, 6),             # 2-D [N, C]
    (2, 3, 11),         # 3-D [N, C, L]
    (2, 3, 4, 5, 3),    # 5-D
    (1, 1, 1, 1),
    (4, 16, 33, 31),    # several parallel tasks
    (3, 70, 5, 5),      # C not dividing the channels-last period
]
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed"]


def _stats(*a):
    return torch.ops.sdkernels.bn_stats(*a)


def _sbr(*a):
    return torch.ops.sdkernels.scale_bias_relu(*a)


def _reduce(*a):
    return torch.ops.sdkernels.relu_bn_backward_reduce(*a)


def _apply(*a):
    return torch.ops.sdkernels.bn_backward_apply(*a)


def _pc(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _relayout(t, layout):
    """Same values as t, in another memory layout (possibly non-contiguous)."""
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t
    if layout == "sliced":  # every other element of a 2x wider last dim
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed":  # first and last dim swapped in memory
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    return t.contiguous()


def _fmt(t):
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(t)


def _assert_format_like(out, x):
    """Outputs keep x's suggested memory format (dense in it)."""
    assert out.shape == x.shape
    assert out.is_contiguous(memory_format=_fmt(x))


def _sdtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def _upcast(*ts):
    return [None if t is None else t.double() for t in ts]


def make_bn_case(shape, dtype=torch.float64, layout="contiguous", seed=0, out_layout=None):
    """y, grad_out, out (= relu of the normalised y), mean, invstd, weight.

    Values are random with a per-channel offset and spread (so the statistics matter).
    out_layout puts grad_out and out in another layout than y (mixed layouts).
    """
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    y = y * _pc(0.5 + torch.rand(C, generator=g, dtype=torch.float64), len(shape)) \
        + _pc(torch.randn(C, generator=g, dtype=torch.float64), len(shape))
    go = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(C, generator=g, dtype=torch.float64)
    y, go = y.to(dtype), go.to(dtype)
    sd = _sdtype(dtype)
    mean, invstd = R.bn_stats(y, None, None, 0.1, 1e-5)
    mean, invstd = mean.to(sd), invstd.to(sd)
    out = R.scale_bias_relu(y, invstd, -mean * invstd)  # relu(xhat)
    ol = out_layout or layout
    return (_relayout(y, layout), _relayout(go, ol), _relayout(out, ol), mean, invstd,
            w.to(sd))


# ---------------------------------------------------------------------------------------
# bn_stats


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_stats_float64_matches_reference(shape, layout):
    y, *_ = make_bn_case(shape, layout=layout)
    C = shape[1]
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    mean_ref, invstd_ref = R.bn_stats(y, rm_ref, rv_ref, 0.1, 1e-5)
    for a, e in ((mean, mean_ref), (invstd, invstd_ref), (rm, rm_ref), (rv, rv_ref)):
        assert a.dtype == e.dtype == torch.float64 and a.shape == (C,)
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    # without running statistics
    mean2, invstd2 = _stats(y, None, None, 0.1, 1e-5)
    assert torch.equal(mean2, mean) and torch.equal(invstd2, invstd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(4, 8, 9, 7), (32, 16, 8, 8), (3, 5), (2, 3, 4, 5, 3)],
                         ids=str)
def test_bn_stats_low_precision(shape, layout, dtype):
    y, *_ = make_bn_case(shape, dtype=dtype, layout=layout)
    C = shape[1]
    ref64 = R.bn_stats(y.double(), None, None, 0.1, 1e-5)
    rm, rv = torch.zeros(C), torch.ones(C)
    ours = _stats(y, rm, rv, 0.1, 1e-5)
    eager = R.bn_stats(y, None, None, 0.1, 1e-5)
    for a, e, r in zip(ours, eager, ref64):
        assert a.dtype == e.dtype == torch.float32
        # Floor: a few float32 ulps. The kernels sum in float over runs of <= 16 values
        # (64 without SIMD), then in double; torch's float sums are pairwise, so its
        # error can be far below an ulp and 2x of it alone would be too strict.
        assert _max_err(a, r) <= 2 * _max_err(e, r) + 1e-6 * (1 + r.abs().max().item())
    # the running statistics are updated from the same statistics
    m = y.numel() // C
    torch.testing.assert_close(rm.double(), 0.1 * ref64[0], rtol=1e-5, atol=1e-6)
    var64 = 1 / ref64[1].double() ** 2 - 1e-5
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * var64 * m / (m - 1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bn_stats_large_mean_is_stable(layout):
    """mean 1e4, std 1 in float32: the variance keeps ~1e-3 relative accuracy (no
    cancellation as in E[x^2] - E[x]^2 in float)."""
    g = torch.Generator().manual_seed(1)
    C = 4
    y = (1e4 + torch.randn(16, C, 12, 12, generator=g, dtype=torch.float64)).float()
    y[:, 1] = (-3e4 + 2.0 * torch.randn(16, 12, 12, generator=g)).float()
    y = _relayout(y, layout)
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    var64, mean64 = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    var = 1 / invstd.double() ** 2 - 1e-5
    torch.testing.assert_close(var, var64, rtol=1e-5, atol=0)  # (need: ~1e-3)
    torch.testing.assert_close(mean.double(), mean64, rtol=1e-7, atol=0)


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (7, 3), (2, 4, 3, 2, 2)], ids=str)
def test_running_stats_match_f_batch_norm(shape, layout, dtype, momentum):
    y, *_ = make_bn_case(shape, dtype=dtype, layout=layout, seed=3)
    C = shape[1]
    g = torch.Generator().manual_seed(4)
    rm, rv = torch.randn(C, generator=g).to(dtype), torch.rand(C, generator=g).to(dtype)
    rm_bn, rv_bn = rm.clone(), rv.clone()
    mean, invstd = _stats(y, rm, rv, momentum, 1e-3)
    F.batch_norm(y, rm_bn, rv_bn, None, None, True, momentum, 1e-3)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6,
                                                                            atol=1e-6)
    torch.testing.assert_close(rm, rm_bn, **tol)
    torch.testing.assert_close(rv, rv_bn, **tol)
    # and invstd is the one F.batch_norm normalises with (biased variance)
    z = F.batch_norm(y, None, None, None, None, True, 0.0, 1e-3)
    ztol = tol if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, (y - _pc(mean, y.dim())) * _pc(invstd, y.dim()), **ztol)


@pytest.mark.parametrize("stat_dtype", [torch.bfloat16, torch.float32])
def test_running_stats_in_low_precision(stat_dtype):
    """bfloat16 x may carry bfloat16 or float32 running statistics (nn.BatchNorm2d
    converted with .to(bfloat16), or kept in float32)."""
    y, *_ = make_bn_case((4, 5, 6, 6), dtype=torch.bfloat16, layout="channels_last")
    rm, rv = torch.zeros(5, dtype=stat_dtype), torch.ones(5, dtype=stat_dtype)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    _stats(y, rm, rv, 0.1, 1e-5)
    R.bn_stats(y, rm_ref, rv_ref, 0.1, 1e-5)
    assert rm.dtype == rv.dtype == stat_dtype
    tol = 1e-2 if stat_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(rm, rm_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, rv_ref, rtol=tol, atol=tol)


def test_bn_stats_one_value_per_channel():
    """M == 1: the running variance takes var itself (0 here), as the schema says."""
    y = torch.randn(1, 3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    mean_ref, invstd_ref = R.bn_stats(y, rm_ref, rv_ref, 0.1, 1e-5)
    torch.testing.assert_close(mean, y[0])
    torch.testing.assert_close(invstd, torch.full((3,), 1e-5, dtype=torch.float64).rsqrt())
    for a, e in ((mean, mean_ref), (invstd, invstd_ref), (rm, rm_ref), (rv, rv_ref)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, torch.full((3,), 0.9, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 3), (2, 3, 0, 4)], ids=str)
def test_bn_stats_empty(shape, dtype):
    y = torch.randn(shape).to(dtype)
    rm, rv = torch.randn(3), torch.rand(3)
    rm0, rv0 = rm.clone(), rv.clone()
    mean, invstd = _stats(y, rm, rv, 0.1, 1e-5)
    mean_ref, invstd_ref = R.bn_stats(y, None, None, 0.1, 1e-5)
    assert mean.dtype == invstd.dtype == _sdtype(dtype)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(invstd, invstd_ref)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_zero_channels():
    y = torch.randn(2, 0, 3)
    e = torch.empty(0)
    mean, invstd = _stats(y, e.clone(), e.clone(), 0.1, 1e-5)
    assert mean.shape == invstd.shape == (0,)
    assert _sbr(y, e, e).shape == y.shape
    s1, s2, dy = _reduce(y, y, y, e, e, True)
    assert s1.shape == s2.shape == (0,) and dy.shape == y.shape
    assert _apply(y, y, y, e, e, e, e, e).shape == y.shape


def test_bn_stats_nan_propagates():
    y = torch.randn(4, 2, 3, 3).contiguous(memory_format=torch.channels_last)
    y[1, 1, 2, 0] = float("nan")
    mean, invstd = _stats(y, None, None, 0.1, 1e-5)
    assert torch.isnan(mean[1]) and torch.isnan(invstd[1])
    assert torch.isfinite(mean[0]) and torch.isfinite(invstd[0])


def test_bn_stats_nonfinite_first_value():
    """The per-channel shift skips a non-finite first value (the result is still the
    non-finite one F.batch_norm gives, not a NaN made by the shift)."""
    y = torch.randn(4, 2, 3, 3)
    y[0, 0, 0, 0] = float("inf")
    mean, _ = _stats(y, None, None, 0.1, 1e-5)
    assert mean[0].item() == float("inf") and torch.isfinite(mean[1])


# ---------------------------------------------------------------------------------------
# scale_bias_relu


def make_sbr_inputs(shape, dtype=torch.float64, param_dtype=None, layout="contiguous",
                    margin=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    s = torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    if margin is not None:  # keep every pre-activation at least `margin` from 0
        v = x * _pc(s, x.dim()) + _pc(b, x.dim())
        v = torch.where(v.abs() < margin, torch.sign(v + 1e-30) * margin, v)
        x = (v - _pc(b, x.dim())) / _pc(s, x.dim())
    param_dtype = param_dtype or dtype
    return (_relayout(x.to(dtype), layout), s.to(param_dtype), b.to(param_dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scale_bias_relu_float64_matches_reference(shape, layout):
    x, s, b = make_sbr_inputs(shape, layout=layout)
    out = _sbr(x, s, b)
    torch.testing.assert_close(out, R.scale_bias_relu(x, s, b), rtol=1e-14, atol=1e-14)
    _assert_format_like(out, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(4, 8, 9, 7), (3, 70, 5, 5), (6, 5)], ids=str)
def test_scale_bias_relu_low_precision(shape, layout, param_dtype, dtype):
    x, s, b = make_sbr_inputs(shape, dtype=dtype, param_dtype=param_dtype, layout=layout)
    ref64 = R.scale_bias_relu(*_upcast(x, s, b))
    out = _sbr(x, s, b)
    assert out.dtype == dtype
    _assert_format_like(out, x)
    eager = R.scale_bias_relu(x, s, b)
    assert _max_err(out, ref64) <= 2 * _max_err(eager, ref64) + 1e-6


def test_scale_bias_relu_keeps_nan():
    x = torch.tensor([[float("nan"), -1.0, 2.0]]).reshape(1, 1, 3)
    out = _sbr(x, torch.ones(1), torch.zeros(1))
    assert torch.isnan(out[0, 0, 0]) and out[0, 0, 1] == 0 and out[0, 0, 2] == 2


def _grads(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 4), (2, 3, 7), (1, 2, 3, 1, 2)], ids=str)
def test_scale_bias_relu_autograd(shape, layout):
    x, s, b = make_sbr_inputs(shape, layout=layout, margin=1e-3)
    grad = _relayout(torch.randn(shape, dtype=torch.float64), layout)
    out, grads = _grads(extension.scale_bias_relu, (x, s, b), grad)
    ref_out, ref_grads = _grads(R.scale_bias_relu, (x, s, b), grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-14, atol=1e-14)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 4), (2, 3, 7), (1, 2, 3, 1, 2)], ids=str)
def test_scale_bias_relu_gradcheck(shape, layout):
    x, s, b = make_sbr_inputs(shape, layout=layout, margin=1e-2)
    inputs = [t.detach().requires_grad_(True) for t in (x, s, b)]
    assert torch.autograd.gradcheck(_sbr, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("which", range(3))
def test_scale_bias_relu_needs_input_grad(which):
    x, s, b = make_sbr_inputs((2, 3, 4, 4), margin=1e-3)
    inputs = [x, s, b]
    inputs[which] = inputs[which].clone().requires_grad_(True)
    _sbr(*inputs).sum().backward()
    for i, t in enumerate(inputs):
        assert (t.grad is not None) == (i == which)


def test_scale_bias_relu_param_grad_dtypes():
    x, s, b = make_sbr_inputs((2, 3, 4, 4), dtype=torch.bfloat16, param_dtype=torch.float32)
    inputs = [t.clone().requires_grad_(True) for t in (x, s, b)]
    _sbr(*inputs).sum().backward()
    assert inputs[0].grad.dtype == torch.bfloat16
    assert inputs[1].grad.dtype == inputs[2].grad.dtype == torch.float32


def test_scale_bias_relu_double_backward_raises():
    x, s, b = make_sbr_inputs((2, 3, 4, 4), margin=1e-3)
    x.requires_grad_(True)
    s.requires_grad_(True)
    (gx,) = torch.autograd.grad(_sbr(x, s, b).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.sum(), s)


# ---------------------------------------------------------------------------------------
# relu_bn_backward_reduce and bn_backward_apply


MIXED = ["contiguous", "channels_last", "sliced", "transposed", "mixed_cl_y", "mixed_nchw_y"]


def _layouts(name):
    """(y layout, grad_out/out layout)."""
    return {"mixed_cl_y": ("channels_last", "transposed"),
            "mixed_nchw_y": ("contiguous", "channels_last")}.get(name, (name, name))


@pytest.mark.parametrize("want_dy", [True, False])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("layout", MIXED)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reduce_float64_matches_reference(shape, layout, with_out, want_dy):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, _ = make_bn_case(shape, layout=yl, out_layout=ol)
    out = out if with_out else None
    got = _reduce(go, out, y, mean, invstd, want_dy)
    ref = R.relu_bn_backward_reduce(go, out, y, mean, invstd, want_dy)
    for name, a, e in zip(("sum_dy", "sum_dy_xhat", "dy"), got, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)
    if want_dy:
        _assert_format_like(got[2], y)
    else:
        assert got[2].shape == (0,) and got[2].dtype == y.dtype


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("layout", MIXED)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_apply_float64_matches_reference(shape, layout, with_out, weighted):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, w = make_bn_case(shape, layout=yl, out_layout=ol)
    out = out if with_out else None
    w = w if weighted else None
    sd, sdx, _ = R.relu_bn_backward_reduce(go, out, y, mean, invstd, False)
    got = _apply(go, out, y, mean, invstd, w, sd, sdx)
    ref = R.bn_backward_apply(go, out, y, mean, invstd, w, sd, sdx)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    _assert_format_like(got, y)


def test_expanded_grad_out():
    """A stride-0 grad_out (as from .sum()) is read correctly."""
    y, _, out, mean, invstd, w = make_bn_case((2, 3, 5, 5), layout="channels_last")
    go = torch.ones((), dtype=y.dtype).expand(y.shape)
    for a, e in zip(_reduce(go, out, y, mean, invstd, True),
                    R.relu_bn_backward_reduce(go, out, y, mean, invstd, True)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    sd, sdx, _ = _reduce(go, out, y, mean, invstd, False)
    torch.testing.assert_close(_apply(go, out, y, mean, invstd, w, sd, sdx),
                               R.bn_backward_apply(go, out, y, mean, invstd, w, sd, sdx),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "mixed_cl_y"])
@pytest.mark.parametrize("shape", [(4, 8, 9, 7), (32, 16, 8, 8), (3, 70, 5, 5), (6, 5)],
                         ids=str)
def test_backward_ops_low_precision(shape, layout, dtype):
    """Error vs the fp64 reference is at most ~2x the reference's error in `dtype`."""
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype=dtype, layout=yl, out_layout=ol)
    up = _upcast(go, out, y, mean, invstd, w)

    got = _reduce(go, out, y, mean, invstd, True)
    eager = R.relu_bn_backward_reduce(go, out, y, mean, invstd, True)
    ref64 = R.relu_bn_backward_reduce(*up[:5], True)
    for name, a, e, r in zip(("sum_dy", "sum_dy_xhat", "dy"), got, eager, ref64):
        assert a.dtype == e.dtype, name
        # floor for the sums: a few float32 ulps of the result (see above)
        floor = 1e-6 * (1 + r.abs().max().item()) if name != "dy" else 0.0
        assert _max_err(a, r) <= 2 * _max_err(e, r) + floor, name

    sd, sdx = ref64[0].float(), ref64[1].float()
    got = _apply(go, out, y, mean, invstd, w, sd, sdx)
    eager = R.bn_backward_apply(go, out, y, mean, invstd, w, sd, sdx)
    ref64 = R.bn_backward_apply(*up, sd.double(), sdx.double())
    assert got.dtype == dtype
    _assert_format_like(got, y)
    assert _max_err(got, ref64) <= 2 * _max_err(eager, ref64) + 2.5e-7 * (
        1 + ref64.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (0, 5)], ids=str)
def test_backward_ops_empty_batch(shape, dtype):
    y = torch.randn(shape).to(dtype)
    st = torch.zeros(shape[1])
    s1, s2, dy = _reduce(y, y, y, st, st + 1, True)
    assert torch.equal(s1, st) and torch.equal(s2, st) and dy.shape == y.shape
    assert _apply(y, None, y, st, st + 1, None, st, st).shape == y.shape


# ---------------------------------------------------------------------------------------
# The whole decomposition reproduces autograd through relu(F.batch_norm(...))


@pytest.mark.parametrize("weighted", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(4, 5, 7, 6), (8, 3), (3, 4, 5, 3, 2), (1, 3, 5, 5)],
                         ids=str)
def test_decomposition_matches_autograd(shape, layout, weighted):
    g = torch.Generator().manual_seed(7)
    C = shape[1]
    y = _relayout(torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5, layout)
    gamma = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5) if weighted else None
    beta = 0.3 * torch.randn(C, generator=g, dtype=torch.float64) if weighted else None
    grad = _relayout(torch.randn(shape, generator=g, dtype=torch.float64), layout)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
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


# ---------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_across_thread_counts(dtype, layout):
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


# ---------------------------------------------------------------------------------------
# Autograd registration of the non-differentiable ops (C++ NotImplemented kernels)


def test_bn_ops_are_not_differentiable():
    y, go, out, mean, invstd, w = make_bn_case((2, 3, 4, 4))
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
    ((2, 3, 7, 5), torch.float64, "mixed_cl_y"),
    ((3, 4), torch.float32, "contiguous"),
    ((2, 3, 11), torch.float32, "transposed"),
    ((2, 4, 3, 3), torch.bfloat16, "channels_last"),
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
def test_opcheck_bn_stats(shape, dtype, layout, with_running):
    y, *_ = make_bn_case(shape, dtype=dtype, layout=_layouts(layout)[0])
    C = shape[1]
    rm, rv = (torch.zeros(C), torch.ones(C)) if with_running else (None, None)
    _opcheck(torch.ops.sdkernels.bn_stats.default, (y, rm, rv, 0.1, 1e-5), grad_inputs=(0,))


@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_scale_bias_relu(shape, dtype, layout, param_dtype):
    x, s, b = make_sbr_inputs(shape, dtype=dtype, param_dtype=param_dtype,
                              layout=_layouts(layout)[0], margin=1e-2)
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_relu.default, (x, s, b))
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_relu.default,
                          tuple(t.clone().requires_grad_(True) for t in (x, s, b)))


@pytest.mark.parametrize("want_dy", [True, False])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_reduce(shape, dtype, layout, with_out, want_dy):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, _ = make_bn_case(shape, dtype=dtype, layout=yl, out_layout=ol)
    _opcheck(torch.ops.sdkernels.relu_bn_backward_reduce.default,
             (go, out if with_out else None, y, mean, invstd, want_dy), grad_inputs=(0, 2))


@pytest.mark.parametrize("weighted", [True, False], ids=["weight", "no_weight"])
@pytest.mark.parametrize("with_out", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("shape,dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_apply(shape, dtype, layout, with_out, weighted):
    yl, ol = _layouts(layout)
    y, go, out, mean, invstd, w = make_bn_case(shape, dtype=dtype, layout=yl, out_layout=ol)
    sd, sdx, _ = R.relu_bn_backward_reduce(go, out, y, mean, invstd, False)
    _opcheck(torch.ops.sdkernels.bn_backward_apply.default,
             (go, out if with_out else None, y, mean, invstd, w if weighted else None,
              sd, sdx), grad_inputs=(0, 2))


def test_fake_tensor_mode_output_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode
    y, go, out, mean, invstd, w = make_bn_case((2, 3, 5, 4), dtype=torch.bfloat16,
                                               layout="channels_last",
                                               out_layout="contiguous")
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


def test_torch_compile_fullgraph():
    """Fake kernels (incl. the in-place running-stat update) trace without graph breaks."""
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
# Bad input: RuntimeError naming the op, eager (C++ checks) and on meta (fake kernel)


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


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, device):
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


def test_python_wrappers():
    y, go, out, mean, invstd, w = make_bn_case((2, 3, 4, 4))
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
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sdkernels::{name}", "CPU")
