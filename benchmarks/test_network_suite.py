"""Network-level suite: CIFAR ResNet training steps across variants, depths and p_L.

* ResNet-110 (ResNet-56 too; ResNet-1202 is ``slow``): constant depth, naive stochastic
  depth (mask multiply, batch and row, as torchvision and timm), sdkernels batch and row
  (automatic backend), and ``torch.compile`` of the constant-depth model
  (``slow`` on CPU, where inductor's compile takes minutes);
* a sweep of p_L in (1.0, 0.8, 0.5, 0.2) with linear and uniform schedules.

Groups are named ``resnet{depth}-train-b{batch}-{dtype}`` so pytest-benchmark's table
compares the variants of one network side by side. Under ``--benchmark-disable`` (CI
smoke) ResNet-20 runs once per benchmark.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import sdkernels
from sdkernels.bench import build_variants, make_inputs, make_train_step

from _common import backend_or_skip, device, extra_info

DTYPE = "float32"
ON_CPU = not torch.cuda.is_available()

VARIANTS = [
    ("constant", None, "batch"),
    ("naive-batch", None, "batch"),
    ("naive-row", None, "row"),
    # One sdkernels entry per mode: in training every backend runs the same ATen tail
    # today (ops.batch_norm_add_relu); per-backend training variants return when a
    # backend fuses the training tail. The block suite compares backends in eval.
    ("sdkernels-batch", None, "batch"),
    ("sdkernels-row", None, "row"),
]
DEPTHS = [110, 56, pytest.param(1202, marks=pytest.mark.slow)]


def _depth(s, depth):
    return depth if s.timing else 20


def _run(benchmark, s, model, group, name, info, backend=None):
    dev = device()
    step = make_train_step(model)
    batches = itertools.cycle(make_inputs(s.batch_size, device=dev))
    losses = []
    benchmark.group = group
    benchmark.name = name
    benchmark.extra_info.update(extra_info(dev, dtype=DTYPE, shape=[s.batch_size, 3, 32, 32],
                                           **info))
    ctx = backend_or_skip(pytest, backend, dev) if backend else None
    if ctx is not None:
        with ctx:
            benchmark.extra_info["backend"] = backend
            benchmark.pedantic(lambda x, y: losses.append(step(x, y)),
                               setup=lambda: (next(batches), {}), rounds=s.step_rounds,
                               warmup_rounds=s.step_warmup, iterations=1)
    else:
        benchmark.pedantic(lambda x, y: losses.append(step(x, y)),
                           setup=lambda: (next(batches), {}), rounds=s.step_rounds,
                           warmup_rounds=s.step_warmup, iterations=1)
    assert losses and all(math.isfinite(float(l)) for l in losses)


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("variant,backend,mode", VARIANTS,
                         ids=[f"{v}-{b}" if b else v for v, b, _ in VARIANTS])
def test_variants(benchmark, net_settings, depth, variant, backend, mode):
    s = net_settings
    d = _depth(s, depth)
    kind = variant.split("-")[0]
    bm = build_variants(d, p_last=0.5, mode=mode, naive_mode=mode, seed=0, device=device(),
                        variants=(kind,))
    _run(benchmark, s, bm.models[kind], f"resnet{d}-train-b{s.batch_size}-{DTYPE}",
         f"{variant}" + (f"[{backend}]" if backend else ""),
         {"depth": d, "variant": variant, "mode": mode, "p_last": 0.5, "schedule": "linear"},
         backend)


@pytest.mark.parametrize("depth", [110, 56])
@pytest.mark.parametrize("compile_variant", [
    pytest.param("compile-constant", marks=pytest.mark.slow if ON_CPU else ())])
def test_torch_compile_constant_depth(benchmark, net_settings, depth, compile_variant):
    s = net_settings
    d = _depth(s, depth)
    bm = build_variants(d, seed=0, device=device(), variants=("constant",))
    model = torch.compile(bm.models["constant"])
    _run(benchmark, s, model, f"resnet{d}-train-b{s.batch_size}-{DTYPE}", compile_variant,
         {"depth": d, "variant": compile_variant})


@pytest.mark.parametrize("schedule", ["linear", "uniform"])
@pytest.mark.parametrize("p_last", [1.0, 0.8, 0.5, 0.2])
def test_p_last_sweep(benchmark, net_settings, p_last, schedule):
    s = net_settings
    d = _depth(s, 110)
    bm = build_variants(d, p_last=p_last, schedule=schedule, seed=0, device=device(),
                        variants=("sdkernels",))
    model = bm.models["sdkernels"]
    probs = [b.survival_prob for b in model.modules()
             if isinstance(b, sdkernels.StochasticDepthBlock)]
    _run(benchmark, s, model, f"resnet{d}-p_last-sweep-{schedule}-b{s.batch_size}",
         f"p_last={p_last}",
         {"depth": d, "p_last": p_last, "schedule": schedule,
          "expected_depth": sdkernels.expected_depth(probs), "blocks": len(probs)})
