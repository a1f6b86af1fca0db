"""Block-level suite: one residual block per backend, shape, dtype and memory format.

Phases: ``fwd`` (training forward), ``fwd+bwd`` (training forward and backward) and
``eval`` (inference forward). Shapes: the three CIFAR stages for BasicBlock and the four
ResNet-50 stages for Bottleneck (identity-shortcut blocks). The baseline is the plain
eager block (``sdkernels.models.resnet``, torchvision's layout and math). Every block is
at survival probability 1, so the numbers compare the work of an active block.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import sdkernels
from sdkernels.measure.timing import synchronize
from sdkernels.models import resnet as plain

from _common import backend_or_skip, device, extra_info

DEV = device()
ON_CUDA = DEV.type == "cuda"
BATCH_BASIC = 128 if ON_CUDA else 32
BATCH_BOTTLENECK = 128 if ON_CUDA else 4
BASIC_SHAPES = [(16, 32), (32, 16), (64, 8)]                  # channels, spatial
BOTTLENECK_SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]  # planes, spatial
DTYPES = ["float32", "bfloat16"] + (["float16"] if ON_CUDA else [])
IMPLS = ["eager", "reference", "extension", "triton"]


def _make(kind, c, impl, dtype, fmt):
    if kind == "basic":
        block = plain.BasicBlock(c, c) if impl == "eager" else sdkernels.BasicBlock(c, c)
        shape = (BATCH_BASIC, c, None, None)
    else:
        block = plain.Bottleneck(4 * c, c) if impl == "eager" else sdkernels.Bottleneck(4 * c, c)
        shape = (BATCH_BOTTLENECK, 4 * c, None, None)
    return block.to(DEV, getattr(torch, dtype), memory_format=fmt), shape


def _cases(kind, shapes):
    for c, hw in shapes:
        for dtype in DTYPES:
            for fmt in ("nchw", "channels_last"):
                yield pytest.param(kind, c, hw, dtype, fmt,
                                   id=f"{kind}-{c}ch@{hw}-{dtype}-{fmt}")


CASES = list(_cases("basic", BASIC_SHAPES)) + list(_cases("bottleneck", BOTTLENECK_SHAPES))


@pytest.mark.parametrize("phase", ["fwd", "fwd+bwd", "eval"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,c,hw,dtype,fmt", CASES)
def test_block(benchmark, net_settings, kind, c, hw, dtype, fmt, impl, phase):
    s = net_settings
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    block, shape = _make(kind, c, impl, dtype, mf)
    block.train(phase != "eval")
    n = shape[0]
    if not s.timing:  # smoke run: every case once, at a size that runs in milliseconds
        n, hw = 2, min(hw, 8)
    x = torch.rand((n, shape[1], hw, hw), device=DEV, dtype=getattr(torch, dtype))
    x = x.contiguous(memory_format=mf).requires_grad_(phase == "fwd+bwd")
    if impl == "triton" and not ON_CUDA:
        pytest.skip("Triton is benchmarked on CUDA only (on CPU it runs in the interpreter)")
    ctx = contextlib.nullcontext() if impl == "eager" else backend_or_skip(pytest, impl, DEV)

    def run():
        if phase == "eval":
            with torch.no_grad():
                out = block(x)
        elif phase == "fwd":
            out = block(x)
        else:
            out = block(x)
            out.backward(torch.ones_like(out))
        synchronize(DEV)
        return out

    benchmark.group = f"{kind}-{c}ch@{hw}-{dtype}-{fmt}-{phase}"
    benchmark.name = impl
    benchmark.extra_info.update(extra_info(DEV, dtype=dtype, shape=list(x.shape), layout=fmt,
                                           phase=phase, impl=impl, block=kind))
    with ctx:
        # fewer rounds on CPU keep the whole "not slow" run within its 15-minute budget
        rounds = s.step_rounds if ON_CUDA or not s.timing else 4
        out = benchmark.pedantic(run, rounds=max(1, rounds), iterations=1,
                                 warmup_rounds=min(1, s.step_warmup))
    assert out.shape[0] == x.shape[0] and torch.isfinite(out.float()).all()
