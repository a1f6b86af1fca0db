"""ResNet-110 training step (batch 32, fp32, forward + backward + SGD step): sdkernels
batch mode at linear p_L = 0.5, against constant depth and against the naive reference
(mask-multiply stochastic depth, as torchvision does).

Must-show: the measured step-time ratio sdkernels / constant depth is within 0.03 of the
time-weighted expected-depth prediction. The ratio is of medians over many interleaved
steps (the prediction is an expectation over the random gates); see
``sdkernels.measure.predict``.

    python -m pytest benchmarks/test_network_step.py --benchmark-only -s   # timing
    python -m pytest benchmarks/ --benchmark-disable -q                    # CI smoke

Everything (models, training step, timer, predictions) comes from ``sdkernels.bench``.
"""
from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

import sdkernels
from sdkernels.bench import (TOLERANCE, VARIANTS, BenchConfig, build_variants, environment,
                             make_inputs, make_train_step, run_comparison)
from sdkernels.bench.report import format_table
from sdkernels.measure.timing import minor_faults

P_LAST, SCHEDULE, MODE, DTYPE = 0.5, "linear", "batch", "float32"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _extra_info(s) -> dict:
    with sdkernels.use_backend(s.backend) if s.backend != "auto" else contextlib.nullcontext():
        env = environment(_device())
    return {
        "device": env["device_name"], "dtype": DTYPE, "shape": [s.batch_size, 3, 32, 32],
        "depth": s.depth, "p_last": P_LAST, "schedule": SCHEDULE, "mode": MODE,
        "torch": env["torch"], "triton": env["triton"], "python": env["python"],
        "backend": env["backend"], "threads": env["torch_threads"],
        "allocator_env": env["allocator_env"],
    }


@pytest.fixture(scope="module")
def models(net_settings):
    return build_variants(net_settings.depth, p_last=P_LAST, schedule=SCHEDULE, mode=MODE,
                          seed=0, device=_device())


@pytest.mark.parametrize("variant", VARIANTS)
def test_train_step(benchmark, net_settings, models, variant):
    s = net_settings
    step = make_train_step(models.models[variant])
    batches = itertools.cycle(make_inputs(s.batch_size, device=_device()))
    losses = []
    benchmark.group = f"resnet{s.depth}-train-step-b{s.batch_size}-{DTYPE}"
    benchmark.name = variant
    benchmark.extra_info.update(_extra_info(s), variant=variant)
    forced = s.backend != "auto" and variant != "constant"
    with sdkernels.use_backend(s.backend) if forced else contextlib.nullcontext():
        benchmark.pedantic(lambda x, y: losses.append(step(x, y)),
                           setup=lambda: (next(batches), {}),
                           rounds=s.step_rounds, warmup_rounds=s.step_warmup, iterations=1)
    assert losses and all(math.isfinite(float(l)) for l in losses)


@pytest.mark.slow
def test_ratio_matches_time_weighted_prediction(benchmark, net_settings, capsys):
    s = net_settings
    cfg = BenchConfig(depth=s.depth, batch_size=s.batch_size, steps=s.cmp_rounds,
                      warmup=s.cmp_warmup, p_last=P_LAST, schedule=SCHEDULE, mode=MODE,
                      dtype=DTYPE, device=str(_device()), backend=s.backend, seed=0)
    out = {}
    benchmark.group = f"resnet{s.depth}-interleaved-comparison"
    benchmark.pedantic(lambda: out.setdefault("rec", run_comparison(cfg)),
                       rounds=1, iterations=1, warmup_rounds=0)
    rec = out["rec"]
    c = rec["comparison"]
    benchmark.extra_info.update(_extra_info(s), comparison=c,
                                predicted_flop=rec["predictions"]["flop"]["ratio"],
                                measured=rec["measured"])
    with capsys.disabled():  # the table is the point of this test: show it without -s
        print("\n" + format_table(rec))
    assert all(math.isfinite(v["final_loss"]) for v in rec["variants"].values())
    if minor_faults() is not None:  # each variant's page faults are part of its record
        missing = [n for n, v in rec["variants"].items() if "faults_per_step" not in v]
        assert not missing, f"no page-fault count recorded for {missing}"
    assert math.isfinite(c["measured"]) and math.isfinite(c["predicted"]), c
    if not s.timing:
        return  # smoke run (--benchmark-disable): tiny settings, the numbers mean nothing
    assert c["abs_diff"] <= TOLERANCE, (
        f"measured ratio {c['measured']:.3f} (median sdkernels / median constant over "
        f"{cfg.steps} interleaved steps) is {c['abs_diff']:.3f} from the time-weighted "
        f"prediction {c['predicted']:.3f} (tolerance {TOLERANCE}); "
        f"backend {rec['environment']['backend']}")
