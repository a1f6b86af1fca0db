"""The side-by-side training-step comparison behind ``python -m sdkernels.bench`` and
``benchmarks/test_network_step.py``: constant depth vs naive stochastic depth vs
sdkernels, plus the FixedGates calibration runs, all timed interleaved in one process,
with both predictions and a JSON-ready result record.
"""
from __future__ import annotations

import contextlib
import copy
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..backends import use_backend
from ..convert import convert, residual_blocks
from ..measure import predict
from ..schedule import survival_probs
from .env import environment
from ..measure.timing import (interleaved_timing, make_inputs, make_train_step, median_faults,
                     summarize)
from .variants import CALIB_ALL, CALIB_NONE, VARIANTS, build_variants, calib_name

__all__ = ["BenchConfig", "run_comparison", "TOLERANCE"]

#: The must-show: |measured ratio - time-weighted prediction| <= TOLERANCE.
TOLERANCE = 0.03

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BenchConfig:
    depth: int = 110
    batch_size: int = 32
    steps: int = 40               # timed rounds: one step of every variant per round
    warmup: int = 2               # untimed rounds first
    p_last: float = 0.5
    schedule: str = "linear"
    mode: str = "batch"
    naive_mode: str | None = None  # default: same as mode
    dtype: str = "float32"
    device: str = "auto"
    backend: str = "auto"          # or force one: "extension", "reference"
    seed: int = 0
    input_sets: int = 4
    num_classes: int = 10
    image_shape: tuple = (3, 32, 32)
    variants: tuple = VARIANTS
    calibration: bool = True
    sweep: tuple = (1.0, 0.8, 0.2)  # more p_L values for sdkernels (step time vs p_L)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        try:
            return _DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}") from None


def total_steps(cfg: BenchConfig, num_stages: int = 3) -> int:
    """How many training steps :func:`run_comparison` runs (for a progress bar)."""
    n = len(cfg.variants) + (num_stages + 2 if cfg.calibration else 0)
    n += len(_sweep_values(cfg))
    return n * (cfg.steps + cfg.warmup)


def sweep_name(p_last: float) -> str:
    return f"sdkernels@p{p_last:g}"


def _sweep_values(cfg: BenchConfig) -> list[float]:
    if "sdkernels" not in cfg.variants:
        return []
    return [float(p) for p in cfg.sweep if float(p) != float(cfg.p_last)]


def paired_centres(times: dict[str, list[float]], reference: str = "constant") -> dict[str, float]:
    """Robust per-variant step time from interleaved rounds (seconds).

    With a ``reference`` variant: median over rounds of t_v[r] / t_ref[r], times the
    reference's median, so that noise shared by one round (the machine slowing down
    for a few seconds) cancels. Without one: plain medians.
    """
    if reference not in times:
        return {n: statistics.median(ts) for n, ts in times.items()}
    ref = times[reference]
    ref_median = statistics.median(ref)
    return {n: statistics.median([t / r for t, r in zip(ts, ref)]) * ref_median
            for n, ts in times.items()}


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run_comparison(cfg: BenchConfig, progress: Callable[[str], object] | None = None) -> dict:
    """Build the variants, time them interleaved, predict, and return the result record.

    ``cfg.backend`` other than "auto" forces that sdkernels backend for the whole run.
    """
    ctx = contextlib.nullcontext() if cfg.backend == "auto" else use_backend(cfg.backend)
    with ctx:
        return _run(cfg, progress)


def _run(cfg: BenchConfig, progress) -> dict:
    device = cfg.resolved_device()
    dtype = cfg.torch_dtype()
    bm = build_variants(cfg.depth, p_last=cfg.p_last, schedule=cfg.schedule, mode=cfg.mode,
                        naive_mode=cfg.naive_mode, seed=cfg.seed, device=device,
                        variants=cfg.variants, calibration=cfg.calibration,
                        num_classes=cfg.num_classes)
    for p in _sweep_values(cfg):  # same initial weights, other p_L
        m = convert(copy.deepcopy(bm.base), p, cfg.schedule, mode=cfg.mode, seed=cfg.seed)
        bm.models[sweep_name(p)] = m.to(device).train()
    steps = {name: make_train_step(m, dtype=dtype) for name, m in bm.models.items()}
    inputs = make_inputs(cfg.batch_size, num_sets=cfg.input_sets, image_shape=cfg.image_shape,
                         num_classes=cfg.num_classes, device=device, seed=cfg.seed + 1)

    gates: list[list] = []
    sd_blocks = ([b for _, b in residual_blocks(bm.models["sdkernels"])]
                 if "sdkernels" in bm.models else [])

    def on_step(name, r, t):
        if name == "sdkernels":
            gates.append([b.last_gate for b in sd_blocks])

    last: dict = {}
    faults: dict = {}
    times = interleaved_timing(steps, inputs, rounds=cfg.steps, warmup=cfg.warmup,
                               device=device, on_step=on_step, progress=progress, last=last,
                               faults=faults)
    stats = {n: dict(summarize(ts), times=ts) for n, ts in times.items()}
    for n, f in median_faults(faults).items():  # page faults per step: see interleaved_timing
        stats[n]["faults_per_step"] = f
    for n, loss in last.items():  # the loss of each variant's last step (should be finite)
        stats[n]["final_loss"] = float(loss)

    fixed, block_flops = predict.count_flops(bm.base, cfg.image_shape)
    flop = predict.flop_prediction(fixed, block_flops, bm.probs)
    record = {
        "benchmark": "cifar_resnet_train_step",
        "config": {**asdict(cfg), "device": str(device), "image_shape": list(cfg.image_shape),
                   "variants": list(cfg.variants), "naive_mode": cfg.naive_mode or cfg.mode,
                   "optimizer": "SGD lr=0.1 momentum=0.9 weight_decay=1e-4",
                   "dtype_note": ("float32" if dtype == torch.float32 else
                                  f"torch.autocast({cfg.dtype}), float32 parameters")},
        "environment": environment(device),
        "probs": bm.probs,
        "stages": bm.stages,
        "stage_of": bm.stage_of,
        "variants": stats,
        "predictions": {"flop": flop},
        "measured": {},
        "notes": [
            "Ratios are of paired medians: each step time is divided by the constant-depth "
            "step of the same round, the median over rounds is taken, and multiplied back "
            "by the constant-depth median (variants[*].paired_centre). A slow spell of a "
            "shared machine that spans a round cancels out. For the random-gated variant "
            "the median estimates the expectation the predictions give, because the "
            "number of active blocks (a sum of independent Bernoullis) is near-symmetric; "
            "plain medians and means are recorded too.",
            "time-weighted prediction = (T_none + sum_l p_l t_stage(l)) / T_all from the "
            "FixedGates calibration variants (medians) timed in the same interleaved run.",
        ],
    }
    # Constant-cost variants should have mean ~ median; spikes from other processes
    # inflate means: flag them (the comparison uses medians, but a heavily disturbed
    # run is worth repeating).
    noisy = [n for n, st in stats.items() if n != "sdkernels" and st["median"] > 0
             and st["mean"] > 1.10 * st["median"]]
    if noisy:
        record["noise_warning"] = (
            f"mean > 1.1 x median for {', '.join(noisy)}: the machine was disturbed "
            "during the run (other processes?); ratios use medians, but rerun on a quiet "
            "machine to be sure")
    if cfg.mode == "row":
        record["notes"].append(
            "mode=row: the calibration fixes whole blocks on or off, so the time-weighted "
            "prediction assumes a block's cost is proportional to its surviving rows; the "
            "gather/scatter of row mode is not in it.")
    centre = paired_centres(times)  # the robust centre (see notes)
    for n, c in centre.items():
        stats[n]["paired_centre"] = c
    meas = record["measured"]
    if "constant" in centre:
        for n in centre:
            meas[f"{n}_vs_constant"] = _ratio(centre[n], centre["constant"])
    if "sdkernels" in centre:
        sd = stats["sdkernels"]
        if "constant" in centre:
            meas["saving_vs_constant"] = 1.0 - meas["sdkernels_vs_constant"]
            meas["mean_ratio_vs_constant"] = _ratio(sd["mean"], stats["constant"]["mean"])
            # standard error of the ratio (gate draws and machine noise together)
            meas["stderr_vs_constant"] = _ratio(sd["std"] / math.sqrt(sd["n"]), centre["constant"])
        if "naive" in centre:
            meas["sdkernels_vs_naive"] = _ratio(centre["sdkernels"], centre["naive"])
            meas["saving_vs_naive"] = 1.0 - meas["sdkernels_vs_naive"]
        if gates:
            meas["mean_active_blocks"] = statistics.fmean(
                sum(predict.gate_fraction(b) for b in step) for step in gates)
        meas["expected_active_blocks"] = flop["expected_depth"]
    if cfg.calibration:
        t_stage = [centre[calib_name(s)] for s in bm.stages]
        tp = predict.time_prediction(centre[CALIB_NONE], t_stage, centre[CALIB_ALL], bm.probs,
                                     bm.stage_of)
        record["predictions"]["time"] = tp
        if gates:
            record["predictions"]["time_realized_gates"] = predict.realized_time_ratio(
                tp, bm.stage_of, gates)
        if "sdkernels" in centre:
            meas["sdkernels_vs_all_active"] = _ratio(centre["sdkernels"], centre[CALIB_ALL])
        if "constant" in centre:
            meas["all_active_vs_constant"] = _ratio(centre[CALIB_ALL], centre["constant"])
        if "sdkernels" in centre and "constant" in centre:
            sweep = []
            for p in sorted({float(cfg.p_last), *_sweep_values(cfg)}, reverse=True):
                name = "sdkernels" if p == float(cfg.p_last) else sweep_name(p)
                probs = survival_probs(len(bm.probs), p, cfg.schedule)
                sweep.append({
                    "p_last": p, "variant": name,
                    "expected_depth": sum(probs),
                    "measured": _ratio(centre[name], centre["constant"]),
                    # predicted sdkernels step time over the constant-depth step
                    "predicted_time_vs_constant": predict.time_prediction(
                        centre[CALIB_NONE], t_stage, centre[CALIB_ALL], probs,
                        bm.stage_of)["predicted_time"] / centre["constant"],
                    "predicted_flop": predict.flop_prediction(fixed, block_flops, probs)["ratio"],
                })
            record["sweep"] = sweep
            # The prediction is a step time (fixed part + sum of p_l times each block's
            # measured time, blocks run by sdkernels); against constant depth it is that
            # time over the constant-depth step. (tp["ratio"] is over the sdkernels
            # all-active step, which equals constant depth only when surviving blocks cost
            # what plain ones do; the fused kernels make them cheaper.)
            m_ratio = meas["sdkernels_vs_constant"]
            p_ratio = tp["predicted_time"] / centre["constant"]
            tp["ratio_vs_constant"] = p_ratio
            record["comparison"] = {
                "measured": m_ratio,
                "predicted": p_ratio,
                "abs_diff": abs(m_ratio - p_ratio),
                "tolerance": TOLERANCE,
                "within_tolerance": abs(m_ratio - p_ratio) <= TOLERANCE,
                "what": ("median sdkernels step time / median constant-depth step time over "
                         f"{stats['sdkernels']['n']} interleaved steps, vs the "
                         "time-weighted expected-depth prediction of the sdkernels step "
                         "time over the same constant-depth step"),
            }
    return record
