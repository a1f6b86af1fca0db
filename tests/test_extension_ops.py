"""Tests of the compiled ops torch.ops.sdkernels.scale_bias_add_relu(_backward).

The oracle is sdkernels.ops.reference. Everything is skipped (with the reason) when the
extension is not built; the GPU class is skipped without a CUDA device.
"""
from __future__ import annotations

import pytest
import torch

from helpers import max_err as _max_err
from helpers import per_channel as _per_channel
from helpers import relayout as _relayout
from helpers import upcast as _upcast
from sdkernels.ops import extension
from sdkernels.ops import reference as R

pytestmark = pytest.mark.skipif(
    not extension.is_available(),
    reason=f"sdkernels compiled extension not available: {extension.unavailable_reason()}")

FWD = "sdkernels::scale_bias_add_relu"
BWD = "sdkernels::scale_bias_add_relu_backward"

SHAPES = [
    (1, 3, 4, 4),       # batch 1
    (0, 3, 4, 4),       # empty batch
    (2, 3, 7, 5),       # odd / prime spatial
    (3, 4, 13, 1),
    (2, 5, 1, 1),
    (5, 6),             # 2-D [N, C]
    (2, 3, 11),         # 3-D [N, C, L]
    (2, 3, 4, 5, 3),    # 5-D
    (1, 1, 1, 1),
    (4, 16, 33, 31),    # big enough for several parallel tasks
]
LAYOUTS = ["contiguous", "channels_last", "sliced", "transposed", "residual_other_format"]


def _op(*args):
    return torch.ops.sdkernels.scale_bias_add_relu(*args)


def _bop(*args):
    return torch.ops.sdkernels.scale_bias_add_relu_backward(*args)


def make_inputs(shape, dtype=torch.float64, param_dtype=None, layout="contiguous",
                margin=None, seed=0, device="cpu"):
    """x, scale, bias, residual with fp64 values; with `margin`, every pre-activation
    x*s+b+r is at least `margin` away from zero (so ReLU's kink is never hit)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    s = torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    if margin is not None:
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
        target = sign * (margin + torch.rand(shape, generator=g, dtype=torch.float64))
        r = target - x * _per_channel(s, x.dim()) - _per_channel(b, x.dim())
    param_dtype = param_dtype or dtype
    x, r = x.to(device=device, dtype=dtype), r.to(device=device, dtype=dtype)
    s, b = s.to(device=device, dtype=param_dtype), b.to(device=device, dtype=param_dtype)
    if layout == "residual_other_format":
        x = _relayout(x, "channels_last")
        r = _relayout(r, "transposed")
    else:
        x, r = _relayout(x, layout), _relayout(r, layout)
    return x, s, b, r


def _expected_channels_last(x):
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous())


# ---------------------------------------------------------------------------------------
# Forward / backward against the reference


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_float64_matches_reference(shape, layout):
    x, s, b, r = make_inputs(shape, layout=layout)
    out = _op(x, s, b, r)
    ref = R.scale_bias_add_relu(x, s, b, r)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if _expected_channels_last(x):
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) \
            and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_float64_matches_reference(shape, layout):
    x, s, b, r = make_inputs(shape, layout=layout)
    out = R.scale_bias_add_relu(x, s, b, r)
    grad_out = _relayout(torch.randn(shape, dtype=torch.float64), layout)
    got = _bop(grad_out, out, x, s)
    ref = R.scale_bias_add_relu_backward(grad_out, out, x, s)
    for name, a, e in zip(("grad_x", "grad_scale", "grad_bias", "grad_residual"), got, ref):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)
    if _expected_channels_last(x):
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[3].is_contiguous(memory_format=torch.channels_last)


def test_backward_expanded_grad_out():
    x, s, b, r = make_inputs((2, 3, 5, 5), layout="channels_last")
    out = _op(x, s, b, r)
    grad_out = torch.ones((), dtype=x.dtype).expand(x.shape)  # stride-0, as from .sum()
    got = _bop(grad_out, out, x, s)
    ref = R.scale_bias_add_relu_backward(grad_out, out, x, s)
    for a, e in zip(got, ref):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_float32(layout, param_dtype):
    x, s, b, r = make_inputs((4, 8, 9, 7), dtype=torch.float32, param_dtype=param_dtype,
                             layout=layout)
    torch.testing.assert_close(_op(x, s, b, r), R.scale_bias_add_relu(x, s, b, r),
                               rtol=1e-5, atol=1e-5)
    out = R.scale_bias_add_relu(x, s, b, r)
    grad_out = torch.randn(x.shape)
    got = _bop(grad_out, out, x, s)
    ref = R.scale_bias_add_relu_backward(*_upcast(grad_out, out, x, s))
    for a, e in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)


def test_float64_x_with_float32_params():
    x, s, b, r = make_inputs((2, 3, 5, 4), dtype=torch.float64, param_dtype=torch.float32)
    torch.testing.assert_close(_op(x, s, b, r), R.scale_bias_add_relu(x, s, b, r),
                               rtol=1e-12, atol=1e-12)
    out = _op(x, s, b, r)
    gx, gs, gb, gr = _bop(torch.ones_like(x), out, x, s)
    assert gx.dtype == torch.float64 and gs.dtype == gb.dtype == torch.float32
    ref = R.scale_bias_add_relu_backward(torch.ones_like(x), out, x, s.double())
    torch.testing.assert_close(gs.double(), ref[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_low_precision_error_at_most_twice_eager(dtype, param_dtype, layout):
    """Error vs. the fp64 reference is at most ~2x eager PyTorch's error in `dtype`."""
    x, s, b, r = make_inputs((4, 8, 9, 7), dtype=dtype, param_dtype=param_dtype,
                             layout=layout)
    ref64 = R.scale_bias_add_relu(*_upcast(x, s, b, r))
    err_ours = _max_err(_op(x, s, b, r), ref64)
    err_eager = _max_err(R.scale_bias_add_relu(x, s, b, r), ref64)
    assert err_ours <= 2 * err_eager + 1e-6, (err_ours, err_eager)

    out = R.scale_bias_add_relu(x, s, b, r)
    grad_out = _relayout(torch.randn(x.shape).to(dtype), layout)
    ref64 = R.scale_bias_add_relu_backward(*_upcast(grad_out, out, x, s))
    eager = R.scale_bias_add_relu_backward(grad_out, out, x, s)
    got = _bop(grad_out, out, x, s)
    for name, a, e, ref in zip(("grad_x", "grad_scale", "grad_bias", "grad_residual"),
                               got, eager, ref64):
        assert a.dtype == e.dtype, name
        assert _max_err(a, ref) <= 2 * _max_err(e, ref) + 1e-6, name


# ---------------------------------------------------------------------------------------
# Autograd


def _grads(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 4), (2, 3, 7)], ids=str)
def test_autograd_matches_reference(shape, layout):
    x, s, b, r = make_inputs(shape, layout=layout, margin=1e-3)
    grad = torch.randn(shape, dtype=torch.float64)
    out, grads = _grads(extension.scale_bias_add_relu, (x, s, b, r), grad)
    ref_out, ref_grads = _grads(R.scale_bias_add_relu, (x, s, b, r), grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "residual_other_format"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (3, 4), (2, 3, 7), (1, 2, 3, 1, 2)], ids=str)
def test_gradcheck_float64(shape, layout):
    x, s, b, r = make_inputs(shape, layout=layout, margin=1e-2)
    inputs = [t.detach().requires_grad_(True) for t in (x, s, b, r)]
    assert torch.autograd.gradcheck(_op, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("which", range(4))
def test_needs_input_grad(which):
    x, s, b, r = make_inputs((2, 3, 4, 4), margin=1e-3)
    inputs = [x, s, b, r]
    inputs[which] = inputs[which].clone().requires_grad_(True)
    _op(*inputs).sum().backward()
    for i, t in enumerate(inputs):
        assert (t.grad is not None) == (i == which)
    ref = [t.detach().clone().requires_grad_(True) for t in (x, s, b, r)]
    R.scale_bias_add_relu(*ref).sum().backward()
    torch.testing.assert_close(inputs[which].grad, ref[which].grad, rtol=1e-10, atol=1e-10)


def test_param_grads_have_scale_dtype():
    x, s, b, r = make_inputs((2, 3, 4, 4), dtype=torch.bfloat16, param_dtype=torch.float32)
    inputs = [t.clone().requires_grad_(True) for t in (x, s, b, r)]
    _op(*inputs).sum().backward()
    assert inputs[0].grad.dtype == inputs[3].grad.dtype == torch.bfloat16
    assert inputs[1].grad.dtype == inputs[2].grad.dtype == torch.float32


def test_double_backward_raises():
    x, s, b, r = make_inputs((2, 3, 4, 4), margin=1e-3)
    x.requires_grad_(True)
    s.requires_grad_(True)
    (gx,) = torch.autograd.grad(_op(x, s, b, r).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gx.sum(), s)


def test_backward_is_deterministic_across_thread_counts():
    x, s, b, r = make_inputs((8, 16, 40, 40), dtype=torch.float32, layout="channels_last")
    out = _op(x, s, b, r)
    grad = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    old = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            results.append(_bop(grad, out, x, s))
            results.append(_bop(grad, out, x, s))
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert torch.equal(a, e)


# ---------------------------------------------------------------------------------------
# opcheck (schema, fake kernel, autograd registration, AOT dispatch)

OPCHECK_CASES = [
    ((2, 3, 5, 4), torch.float32, None, "contiguous"),
    ((2, 3, 5, 4), torch.float32, None, "channels_last"),
    ((2, 3, 7, 5), torch.float64, None, "residual_other_format"),
    ((3, 4), torch.float32, None, "contiguous"),
    ((2, 3, 11), torch.float32, None, "transposed"),
    ((2, 4, 3, 3), torch.bfloat16, torch.float32, "channels_last"),
    ((1, 3, 13, 1), torch.float16, None, "contiguous"),
]


@pytest.mark.parametrize("shape,dtype,param_dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_forward(shape, dtype, param_dtype, layout):
    x, s, b, r = make_inputs(shape, dtype=dtype, param_dtype=param_dtype, layout=layout,
                             margin=1e-2)
    args = tuple(t.requires_grad_(True) for t in (x, s, b, r))
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_add_relu.default, args)
    # and without autograd
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_add_relu.default,
                          tuple(t.detach() for t in args))


@pytest.mark.parametrize("shape,dtype,param_dtype,layout", OPCHECK_CASES, ids=str)
def test_opcheck_backward(shape, dtype, param_dtype, layout):
    x, s, b, r = make_inputs(shape, dtype=dtype, param_dtype=param_dtype, layout=layout)
    out = R.scale_bias_add_relu(x, s, b, r)
    grad_out = _relayout(torch.randn(shape).to(dtype), layout)
    torch.library.opcheck(torch.ops.sdkernels.scale_bias_add_relu_backward.default,
                          (grad_out, out, x, s))


def test_fake_tensor_mode_output_metadata():
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, s, b, r = make_inputs((2, 3, 5, 4), layout="channels_last")
    with FakeTensorMode() as mode:
        fx, fs, fb, fr = (mode.from_tensor(t) for t in (x, s, b, r))
        out = _op(fx, fs, fb, fr)
        grads = _bop(out, out, fx, fs)
    real = _op(x, s, b, r)
    assert out.shape == real.shape and out.stride() == real.stride()
    assert grads[0].stride() == real.stride() and grads[1].shape == (3,)


# ---------------------------------------------------------------------------------------
# torch.compile: proves the fake kernel and the autograd registration


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()

    def fn(x, s, b, r):
        return torch.ops.sdkernels.scale_bias_add_relu(x * 2.0, s, b, r).sum(dim=(0, 2))

    compiled = torch.compile(fn, fullgraph=True)
    x, s, b, r = make_inputs((2, 3, 5, 4), dtype=torch.float32, margin=1e-2)
    eager_in = [t.clone().requires_grad_(True) for t in (x, s, b, r)]
    comp_in = [t.clone().requires_grad_(True) for t in (x, s, b, r)]
    grad = torch.randn(3, 4)
    eager_out = fn(*eager_in)
    comp_out = compiled(*comp_in)
    torch.testing.assert_close(comp_out, eager_out)
    eager_out.backward(grad)
    comp_out.backward(grad)
    for a, e in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, e.grad)


# ---------------------------------------------------------------------------------------
# Bad input: RuntimeError naming the op, eager (C++ checks) and on meta (fake kernel)


def _bad_forward_cases():
    def f(shape=(2, 3, 4, 4), C=3, dtype=torch.float32, **kw):
        return dict(x=torch.randn(shape).to(dtype), scale=torch.randn(C),
                    bias=torch.randn(C), residual=torch.randn(shape).to(dtype), **kw)
    cases = {}
    c = f(dtype=torch.int32)
    cases["int32_x"] = (c, "float32, float64, bfloat16 or float16")
    c = f()
    c["residual"] = torch.randn(2, 3, 4, 5)
    cases["residual_shape"] = (c, "residual")
    c = f()
    c["residual"] = c["residual"].double()
    cases["residual_dtype"] = (c, "residual")
    c = f()
    c["scale"] = torch.randn(4)
    cases["scale_length"] = (c, "scale")
    c = f()
    c["bias"] = torch.randn(2)
    cases["bias_length"] = (c, "bias")
    c = f()
    c["scale"] = torch.randn(1, 3)
    cases["scale_2d"] = (c, "scale")
    c = f()
    c["bias"] = torch.randn(())
    cases["bias_0d"] = (c, "bias")
    c = f()
    c["scale"] = c["scale"].double()
    c["bias"] = c["bias"].double()
    cases["scale_dtype"] = (c, "scale")
    c = f(dtype=torch.float64)
    c["bias"] = c["bias"].double()
    cases["scale_bias_dtype_differ"] = (c, "same dtype")
    c = f(shape=(3,))
    cases["x_1d"] = (c, "at least 2-D")
    c = f(shape=())
    cases["x_0d"] = (c, "at least 2-D")
    return cases


BAD_FWD = _bad_forward_cases()


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", sorted(BAD_FWD))
def test_bad_forward_input(case, device):
    kw, what = BAD_FWD[case]
    args = [kw[k].to(device) for k in ("x", "scale", "bias", "residual")]
    with pytest.raises(RuntimeError, match=FWD) as info:
        _op(*args)
    assert what in str(info.value)


def test_bad_forward_mismatched_devices():
    x = torch.randn(2, 3, 4, 4)
    s, b = torch.randn(3), torch.randn(3)
    with pytest.raises(RuntimeError, match=f"{FWD}.*device"):
        _op(x.to("meta"), s, b, x.to("meta"))
    with pytest.raises(RuntimeError, match=f"{FWD}.*device"):
        _op(x, s, b.to("meta"), x)
    with pytest.raises(RuntimeError, match=f"{FWD}.*device"):
        _op(x, s, b, x.to("meta"))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_backward_input(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    s = torch.randn(3, device=device)
    with pytest.raises(RuntimeError, match=f"{BWD}.*grad_out"):
        _bop(torch.randn(2, 3, 4, 5, device=device), x, x, s)
    with pytest.raises(RuntimeError, match=f"{BWD}.*out"):
        _bop(x, x.double(), x, s)
    with pytest.raises(RuntimeError, match=f"{BWD}.*scale"):
        _bop(x, x, x, torch.randn(5, device=device))
    with pytest.raises(RuntimeError, match=f"{BWD}.*at least 2-D"):
        _bop(s, s, s, s)
    with pytest.raises(RuntimeError, match=f"{BWD}.*float32, float64, bfloat16 or float16"):
        xi = x.to(torch.int32)
        _bop(xi, xi, xi, s)


def test_bad_backward_mismatched_devices():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=f"{BWD}.*device"):
        _bop(x, x, x, torch.randn(3, device="meta"))


# ---------------------------------------------------------------------------------------
# Introspection


def test_introspection():
    assert extension.is_available() and extension.unavailable_reason() is None
    assert extension.library_path() and "_C" in extension.library_path()
    assert isinstance(extension.built_with_cuda(), bool)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(FWD, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(BWD, "CPU")


def test_import_without_library_degrades_cleanly():
    """If sdkernels._C cannot be loaded, `import sdkernels` still works and says why."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['sdkernels._C'] = None\n"
            "import sdkernels\n"
            "from sdkernels.ops import extension as e\n"
            "assert not e.is_available() and not e.built_with_cuda()\n"
            "assert e.library_path() is None and 'sdkernels._C' in e.unavailable_reason()\n"
            "try:\n"
            "    e.scale_bias_add_relu(*[None] * 4)\n"
            "except RuntimeError as exc:\n"
            "    assert 'not available' in str(exc)\n"
            "else:\n"
            "    raise AssertionError('no error')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------
# CUDA launch plans, host side (csrc/cuda/channel_plan.h: plain C++, no GPU needed)

_PLAN_TEST_CPP = r"""
#include "cuda/channel_plan.h"

#include <cstdint>
#include <cstdio>
#include <type_traits>

using namespace sdkernels::cuda;
namespace d = sdkernels::cuda::detail;

// The reduction plan takes no alignment argument: aligned and misaligned inputs of one
// shape cannot get different splits or vector widths (hence summation orders).
static_assert(std::is_invocable_v<decltype(&plan_channel_reduce), int64_t, int64_t, int64_t,
                                  bool, int>);
static_assert(!std::is_invocable_v<decltype(&plan_channel_reduce), int64_t, int64_t,
                                   int64_t, bool, int, bool>);

int main() {
  const int64_t Ns[] = {1, 2, 7, 32, 256};
  const int64_t Cs[] = {1, 3, 8, 16, 24, 64, 256, 2048};
  const int64_t inners[] = {1, 5, 8, 49, 784, 3136};
  const int sizes[] = {2, 4, 8};
  long checked = 0;
  for (int64_t N : Ns) for (int64_t C : Cs) for (int64_t inner : inners)
  for (int cl = 0; cl < 2; ++cl) for (int es : sizes) {
    const int64_t numel = N * C * inner;
    const ChannelReducePlan p = plan_channel_reduce(numel, C, inner, cl != 0, es);
    const bool ecl = d::effective_channels_last(C, inner, cl != 0);
    const int64_t run = ecl ? C : inner;
    const int vmax = 16 / es;
    const int64_t M = numel / C;
    const int64_t total = ecl ? M : M / p.vec;
    const int64_t chunk = d::ceil_div(total, p.splits);
    bool ok = (p.vec == 1 || p.vec == vmax) && run % p.vec == 0 &&
              (p.vec == vmax) == (run % vmax == 0) &&
              p.splits >= 1 && p.splits <= d::kMaxSplits && p.splits <= 65535 &&
              (p.splits - 1) * chunk < total &&  // no empty split
              p.splits == d::reduce_splits(numel, C, inner, cl != 0, p.vec) &&
              // elementwise: the same width when aligned, scalar when not
              d::vec_width(es, C, inner, cl != 0, true) == p.vec &&
              d::vec_width(es, C, inner, cl != 0, false) == 1;
    if (!ok) {
      std::printf("BAD N=%lld C=%lld inner=%lld cl=%d es=%d vec=%d splits=%lld\n",
                  (long long)N, (long long)C, (long long)inner, cl, es, p.vec,
                  (long long)p.splits);
      return 1;
    }
    ++checked;
  }
  std::printf("OK %ld\n", checked);
  return 0;
}
"""


def test_cuda_reduce_plan_is_shape_only_host():
    """channel_plan.h builds with a plain host compiler (no CUDA, no torch headers), the
    reduction plan has no alignment input, and its splits / vector widths are valid."""
    import os
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") \
        or shutil.which("clang++")
    if not cxx:
        pytest.skip("no host C++ compiler")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "plan_test.cpp", Path(tmp) / "plan_test"
        src.write_text(_PLAN_TEST_CPP)
        cc = subprocess.run([cxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(csrc),
                             str(src), "-o", str(exe)], capture_output=True, text=True)
        assert cc.returncode == 0, cc.stderr
        run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.startswith("OK "), run.stdout + run.stderr


# ---------------------------------------------------------------------------------------
# CUDA (needs a GPU and an extension built with CUDA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCUDA:
    @pytest.fixture(autouse=True)
    def _need_cuda_build(self):
        if not extension.built_with_cuda():
            pytest.skip("sdkernels._C was built without CUDA kernels")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32_params", "same"])
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last", "residual_other_format"])
    @pytest.mark.parametrize("shape", [(4, 8, 9, 7), (2, 64, 56, 56), (3, 5), (0, 3, 4, 4)],
                             ids=str)
    def test_forward_backward_match_reference(self, shape, layout, param_dtype, dtype):
        x, s, b, r = make_inputs(shape, dtype=dtype, param_dtype=param_dtype, layout=layout,
                                 device="cuda")
        out = _op(x, s, b, r)
        ref64 = R.scale_bias_add_relu(*_upcast(x, s, b, r))
        eager = R.scale_bias_add_relu(x, s, b, r)
        if _expected_channels_last(x):
            assert out.is_contiguous(memory_format=torch.channels_last)
        if dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref64, rtol=1e-5, atol=1e-5)
        else:
            assert _max_err(out, ref64) <= 2 * _max_err(eager, ref64) + 1e-6
        # backward on the same out, so the ReLU mask is shared
        grad_out = _relayout(torch.randn(shape, device="cuda").to(dtype), layout)
        got = _bop(grad_out, eager, x, s)
        ref64 = R.scale_bias_add_relu_backward(*_upcast(grad_out, eager, x, s))
        ref_eager = R.scale_bias_add_relu_backward(grad_out, eager, x, s)
        for name, a, e, ref in zip(("grad_x", "grad_scale", "grad_bias", "grad_residual"),
                                   got, ref_eager, ref64):
            assert a.dtype == e.dtype and a.device == e.device, name
            if dtype == torch.float32:
                torch.testing.assert_close(a.double(), ref, rtol=1e-4, atol=1e-3, msg=name)
            else:
                assert _max_err(a, ref) <= 2 * _max_err(e, ref) + 1e-6, name

    def test_autograd_and_determinism(self):
        x, s, b, r = make_inputs((4, 32, 17, 17), dtype=torch.float32, margin=1e-2,
                                 layout="channels_last", device="cuda")
        grad = torch.randn(x.shape, device="cuda")
        out, grads = _grads(extension.scale_bias_add_relu, (x, s, b, r), grad)
        _, ref_grads = _grads(R.scale_bias_add_relu, (x, s, b, r), grad)
        for a, e in zip(grads, ref_grads):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-3)
        g1 = _bop(grad, out.detach(), x, s)
        g2 = _bop(grad, out.detach(), x, s)
        for a, e in zip(g1, g2):
            assert torch.equal(a, e)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                       torch.bfloat16], ids=str)
    @pytest.mark.parametrize("shape", [(8, 256, 14, 14), (4, 64, 28, 28), (16, 24, 5, 5),
                                       (2, 3, 7, 5), (3, 2048, 1, 1)], ids=str)
    def test_channels_last_backward_matches_reference(self, shape, dtype):
        """channels_last backward (coalesced row reduction, fused grad_x / grad_residual
        stores): vectorised C (256, 64, 24 for 16-bit, 2048), scalar C (3)."""
        x, s, b, r = make_inputs(shape, dtype=dtype, layout="channels_last", seed=1,
                                 device="cuda")
        out = R.scale_bias_add_relu(x, s, b, r).contiguous(memory_format=torch.channels_last)
        g = torch.Generator().manual_seed(2)
        grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(
            device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
        got = _bop(grad_out, out, x, s)
        ref64 = R.scale_bias_add_relu_backward(*_upcast(grad_out, out, x, s))
        eager = R.scale_bias_add_relu_backward(grad_out, out, x, s)
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[3].is_contiguous(memory_format=torch.channels_last)
        # grad_x = g * s and grad_residual = g: one rounding of an exact product / a copy
        mask = out > 0
        assert torch.equal(got[3], torch.where(mask, grad_out, torch.zeros_like(grad_out)))
        for name, a, e, ref in zip(("grad_x", "grad_scale", "grad_bias", "grad_residual"),
                                   got, eager, ref64):
            assert a.dtype == e.dtype and a.shape == e.shape, name
            if dtype == torch.float64:
                torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-10, msg=name)
            elif dtype == torch.float32:
                # sums over up to 1568 terms, fp32 partials merged in double
                torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-4, msg=name)
            else:
                assert _max_err(a, ref) <= 2 * _max_err(e, ref) + 1e-6, name

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
    @pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
    def test_misaligned_inputs_reduce_bitwise_equal(self, layout, dtype):
        """An aligned copy and a view starting one element into its storage (not 16-byte
        aligned: scalar loads) are reduced in the same order: bitwise equal grads."""
        shape = (8, 64, 14, 16)  # C and inner both multiples of every vector width
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x, s, b, r = make_inputs(shape, dtype=dtype, layout="contiguous", seed=3,
                                 device="cuda")
        x = x.contiguous(memory_format=fmt)
        out = R.scale_bias_add_relu(x, s, b, r).contiguous(memory_format=fmt)
        grad_out = torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt)

        def misaligned(t):
            buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
            v = buf[1:].as_strided(t.shape, t.stride())
            v.copy_(t)
            assert v.data_ptr() % 16 != 0 and v.storage_offset() == 1
            return v

        aligned = _bop(grad_out, out, x, s)
        mis = _bop(misaligned(grad_out), misaligned(out), misaligned(x), s)
        for name, a, m in zip(("grad_x", "grad_scale", "grad_bias", "grad_residual"),
                              aligned, mis):
            assert torch.equal(a, m), name

    def test_gradcheck_float64(self):
        x, s, b, r = make_inputs((2, 3, 5, 4), margin=1e-2, device="cuda")
        inputs = [t.detach().requires_grad_(True) for t in (x, s, b, r)]
        assert torch.autograd.gradcheck(_op, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)

    def test_opcheck(self):
        x, s, b, r = make_inputs((2, 3, 5, 4), dtype=torch.float32, margin=1e-2,
                                 layout="channels_last", device="cuda")
        torch.library.opcheck(torch.ops.sdkernels.scale_bias_add_relu.default,
                              tuple(t.requires_grad_(True) for t in (x, s, b, r)))

    def test_device_mismatch(self):
        x = torch.randn(2, 3, 4, 4, device="cuda")
        with pytest.raises(RuntimeError, match=f"{FWD}.*device"):
            _op(x, torch.randn(3), torch.randn(3, device="cuda"), x)
