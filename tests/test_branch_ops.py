"""The compiled whole-branch training ops and the layout op (CPU).

``sdkernels::residual_branch_forward`` / ``_backward`` run a residual branch's training
step in two calls (csrc/cpu/residual_branch.cpp); ``sdkernels::relayout`` is their
NCHW <-> channels_last copy. The ops are checked here on their own (against
``x.contiguous`` and against the op-by-op recomputing function on the reference ops,
opcheck, bad input); tests/test_fused_block.py checks the blocks that use them against
the module path.
"""
import pytest
import torch
from torch import nn

import sdkernels
from sdkernels import ops
from sdkernels.ops import fused_block

HAVE_EXT = sdkernels.ops.extension.is_available()
pytestmark = pytest.mark.skipif(not HAVE_EXT, reason="compiled extension not built")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 16, 32, 32), (2, 13, 11, 17), (1, 64, 8, 8),
          (4, 9, 1, 6), (0, 4, 3, 3), (2, 8, 9, 8)]


# ---------------------------------------------------------------------------------------
# relayout

@pytest.mark.parametrize("dtype", DTYPES + [torch.int64, torch.uint8])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relayout_matches_contiguous(shape, dtype):
    x = (torch.randn(shape) * 50).to(dtype)
    for src_cl in (False, True):
        src = x.contiguous(memory_format=torch.channels_last) if src_cl else x.contiguous()
        for to_cl in (False, True):
            fmt = torch.channels_last if to_cl else torch.contiguous_format
            got = torch.ops.sdkernels.relayout(src, to_cl)
            assert got.is_contiguous(memory_format=fmt)
            assert got.dtype == dtype and got.shape == x.shape
            assert torch.equal(got, x)  # moved, never converted: bit-exact
            if got.numel():
                assert got.data_ptr() != src.data_ptr()  # never an alias


def test_relayout_other_strides_and_views():
    base = torch.randn(4, 6, 10, 12)
    for x in (base[:, ::2], base.transpose(2, 3), base[1:3, :, 2:7, ::3]):
        for to_cl in (False, True):
            got = torch.ops.sdkernels.relayout(x, to_cl)
            assert torch.equal(got, x)


def test_relayout_bad_input():
    with pytest.raises(RuntimeError, match="sdkernels::relayout: expected a 4-D tensor"):
        torch.ops.sdkernels.relayout(torch.randn(2, 3, 4), True)


@pytest.mark.parametrize("to_cl", [False, True])
def test_relayout_opcheck(to_cl):
    torch.library.opcheck(torch.ops.sdkernels.relayout.default,
                          (torch.randn(2, 5, 3, 4), to_cl))
    torch.library.opcheck(torch.ops.sdkernels.relayout.default,
                          (torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last),
                           to_cl))


# ---------------------------------------------------------------------------------------
# residual_branch_forward / residual_branch_backward

def _stages(kind, cin, dtype, affine=True, track=True, stride=1):
    """ConvBN records of a BasicBlock (2 stages) or Bottleneck (3) with random params."""
    g = torch.Generator().manual_seed(1)
    if kind == "basic":
        specs = [(cin, 8, 3, stride, 1), (8, 8, 3, 1, 1)]
    else:
        specs = [(cin, 4, 1, 1, 0), (4, 4, 3, stride, 1), (4, 16, 1, 1, 0)]
    stages = []
    for ci, co, k, s, p in specs:
        w = (torch.randn(co, ci, k, k, generator=g) / (ci * k * k) ** 0.5).to(dtype)
        gamma = (torch.rand(co, generator=g) + 0.5).to(dtype) if affine else None
        beta = (torch.rand(co, generator=g) - 0.5).to(dtype) if affine else None
        rm = torch.zeros(co, dtype=dtype) if track else None
        rv = torch.ones(co, dtype=dtype) if track else None
        stages.append(fused_block.ConvBN(w.requires_grad_(), (s, s), (p, p), (1, 1), 1,
                                         None if gamma is None else gamma.requires_grad_(),
                                         None if beta is None else beta.requires_grad_(),
                                         rm, rv, 0.1, 1e-5))
    return stages


def _clone_stages(stages):
    out = []
    for st in stages:
        c = lambda t: None if t is None else t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
        out.append(fused_block.ConvBN(
            c(st.weight), st.stride, st.padding, st.dilation, st.groups, c(st.bn_weight),
            c(st.bn_bias), None if st.running_mean is None else st.running_mean.clone(),
            None if st.running_var is None else st.running_var.clone(), st.momentum, st.eps))
    return out


def _run(train, x, residual, stages, gate_scale, g):
    x = x.detach().clone().requires_grad_()
    res = None if residual is None else residual.detach().clone().requires_grad_()
    y = train(x, res, stages, gate_scale)
    y.backward(g)
    grads = [x.grad] + ([] if res is None else [res.grad])
    for st in stages:
        grads += [st.weight.grad, st.bn_weight.grad if st.bn_weight is not None else None,
                  st.bn_bias.grad if st.bn_bias is not None else None]
    buffers = [t for st in stages for t in (st.running_mean, st.running_var) if t is not None]
    return y, grads, buffers


CASES = [("basic", "identity"), ("basic", "residual"), ("bottleneck", "identity"),
         ("bottleneck", "residual")]


@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)],
                         ids=["affine", "no_affine", "no_running"])
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind,shortcut", CASES, ids=str)
def test_compiled_matches_op_by_op_float64(kind, shortcut, fmt, affine, track):
    """The compiled ops against the same decomposition on the pure-PyTorch reference ops."""
    cin = 8 if kind == "basic" else 16
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    stride = 1 if shortcut == "identity" else 2
    stages = _stages(kind, cin, torch.float64, affine, track, stride)
    x = torch.rand(3, cin, 9, 7, dtype=torch.float64).contiguous(memory_format=mf)
    cout = stages[-1].weight.shape[0]
    hout = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    residual = None if shortcut == "identity" else torch.randn(
        3, cout, *hout, dtype=torch.float64).contiguous(memory_format=mf)
    g = torch.randn(3, cout, *hout, dtype=torch.float64)
    assert fused_block._compiled_branch_applies(stages)
    ref_stages = _clone_stages(stages)
    y, grads, bufs = _run(fused_block.residual_branch_train_cpu, x, residual, stages, 0.7, g)

    def oracle(*args):
        return fused_block.residual_branch_train(*args, fused_block.REFERENCE_KERNELS)
    y_ref, grads_ref, bufs_ref = _run(oracle, x, residual, ref_stages, 0.7, g)
    torch.testing.assert_close(y, y_ref)
    assert y.is_contiguous(memory_format=mf)
    for a, b in zip(grads, grads_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert grads[0].is_contiguous(memory_format=mf)  # the input gradient keeps x's layout
    for a, b in zip(bufs, bufs_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind,shortcut", CASES, ids=str)
def test_compiled_gradcheck(kind, shortcut):
    cin = 8 if kind == "basic" else 16
    stages = _stages(kind, cin, torch.float64, track=False)
    cout = stages[-1].weight.shape[0]
    x = torch.rand(2, cin, 5, 4, dtype=torch.float64, requires_grad=True)
    res = None if shortcut == "identity" else torch.randn(
        2, cout, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [t for st in stages for t in (st.weight, st.bn_weight, st.bn_bias)]

    def f(x, res, *ps):
        sts = [fused_block.ConvBN(ps[3 * i], st.stride, st.padding, st.dilation, st.groups,
                                  ps[3 * i + 1], ps[3 * i + 2], None, None, 0.1, 1e-5)
               for i, st in enumerate(stages)]
        return ops.residual_branch_train(x, res, sts, 0.7, backend="extension")
    inputs = (x, res, *params) if res is not None else (x, None, *params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_compiled_only_some_grads_and_leaf_accumulation():
    """Frozen parameters, an input without grad, and x.grad accumulating over steps."""
    stages = _stages("basic", 8, torch.float32)
    stages[0].weight.requires_grad_(False)
    x = torch.rand(4, 8, 6, 6)
    y = ops.residual_branch_train(x, None, stages, 1.0, backend="extension")
    y.sum().backward()
    assert stages[0].weight.grad is None and stages[1].weight.grad is not None
    xl = torch.rand(4, 8, 6, 6, requires_grad=True)
    for _ in range(2):
        ops.residual_branch_train(xl, None, stages, 1.0, backend="extension").sum().backward()
    first = xl.grad.clone()
    xl.grad = None
    ops.residual_branch_train(xl, None, stages, 1.0, backend="extension").sum().backward()
    torch.testing.assert_close(first, 2 * xl.grad)


def _forward_args(x, stages, **over):
    a = dict(x=x, residual=None, weights=[st.weight.detach() for st in stages],
             bn_weights=[st.bn_weight.detach() for st in stages],
             bn_biases=[st.bn_bias.detach() for st in stages],
             running_means=[st.running_mean for st in stages],
             running_vars=[st.running_var for st in stages],
             strides=[v for st in stages for v in st.stride],
             paddings=[v for st in stages for v in st.padding],
             dilations=[1, 1] * len(stages), groups=[1] * len(stages),
             momentums=[0.1] * len(stages), eps=[1e-5] * len(stages), gate_scale=1.0)
    a.update(over)
    return a


def test_branch_ops_opcheck():
    stages = _stages("basic", 8, torch.float32)
    x = torch.rand(2, 8, 5, 6)
    args = _forward_args(x, stages)
    fwd = torch.ops.sdkernels.residual_branch_forward.default
    # PT2 cannot functionalize a mutating op returning Tensor[] (it is not tagged
    # pt2_compliant; torch.compile runs the blocks' modules), so no AOT-dispatch check.
    assert torch.Tag.pt2_compliant_tag not in fwd.tags
    torch.library.opcheck(fwd, tuple(args.values()),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    out, saved = fwd(*args.values())
    g = torch.randn_like(out)
    bwd = torch.ops.sdkernels.residual_branch_backward.default
    for mask in ([True] * 8, [True, False, False, True, True, True, False, True]):
        torch.library.opcheck(bwd, (g, x, out, saved, args["weights"], args["bn_weights"],
                                    args["bn_biases"], args["strides"], args["paddings"],
                                    args["dilations"], args["groups"], 1.0, True, mask))


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.rand(2, 8, 5)), "expected a 4-D input"),
    (dict(x=torch.ones(2, 8, 5, 6, dtype=torch.int32)), "expected x to be float32"),
    (dict(strides=[1, 1]), "expected strides to have 4 entries"),
    (dict(momentums=[0.1]), "expected momentums to have 2 entries"),
    (dict(running_means=[]), "expected running_means and running_vars both empty"),
    (dict(weights=None), "expected 4-D convolution weights with x's dtype"),
    (dict(residual=torch.rand(2, 8, 3, 3)), "expected the residual to have"),
    (dict(bn_weights=[None]), "expected bn_weights to have 2 entries"),
])
def test_forward_bad_input(bad, match):
    stages = _stages("basic", 8, torch.float32)
    x = torch.rand(2, 8, 5, 6)
    if "weights" in bad and bad["weights"] is None:
        bad = dict(weights=[stages[0].weight.detach().double(), stages[1].weight.detach()])
    args = _forward_args(bad.pop("x", x), stages, **bad)
    with pytest.raises(RuntimeError, match=f"sdkernels::residual_branch_forward: {match}"):
        torch.ops.sdkernels.residual_branch_forward(*args.values())


def test_backward_bad_input():
    stages = _stages("basic", 8, torch.float32)
    x = torch.rand(2, 8, 5, 6)
    args = _forward_args(x, stages)
    out, saved = torch.ops.sdkernels.residual_branch_forward(*args.values())
    rest = (args["weights"], args["bn_weights"], args["bn_biases"], args["strides"],
            args["paddings"], args["dilations"], args["groups"], 1.0, True)
    with pytest.raises(RuntimeError, match="residual_branch_backward: expected output_mask"):
        torch.ops.sdkernels.residual_branch_backward(out, x, out, saved, *rest, [True] * 3)
    with pytest.raises(RuntimeError, match="residual_branch_backward: expected saved"):
        torch.ops.sdkernels.residual_branch_backward(out, x, out, saved[:2], *rest, [True] * 8)
    with pytest.raises(RuntimeError, match="residual_branch_backward: expected grad_out"):
        torch.ops.sdkernels.residual_branch_backward(out[:1], x, out, saved, *rest, [True] * 8)


def test_not_differentiable_directly():
    stages = _stages("basic", 8, torch.float32)
    x = torch.rand(2, 8, 5, 6, requires_grad=True)
    args = _forward_args(x, stages)
    out, _ = torch.ops.sdkernels.residual_branch_forward(*args.values())
    with pytest.raises(RuntimeError, match="residual_branch_forward"):
        out.sum().backward()


def test_block_uses_compiled_ops_on_cpu():
    b = sdkernels.BasicBlock(8, 8).train()
    y = b(torch.rand(2, 8, 6, 6, requires_grad=True))
    assert type(y.grad_fn).__name__ == "_CompiledBranchFnBackward"
    # ... and not for mixed running-statistics settings (the op-by-op function runs)
    b.bn1 = nn.BatchNorm2d(8, track_running_stats=False)
    y = b(torch.rand(2, 8, 6, 6, requires_grad=True))
    assert type(y.grad_fn).__name__ == "_ResidualBranchFnBackward"
