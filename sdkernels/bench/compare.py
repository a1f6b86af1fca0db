"""The side-by-side training-step comparison behind ``python -m sdkernels.bench`` and
``benchmarks/test_network_step.py``: constant depth vs naive stochastic depth vs
sdkernels, plus the FixedGates calibration runs, all timed interleaved in one process,
with both predictions and a JSON-ready result record.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..convert import residual_blocks
from . import predict
from .env import environment
from .timing import interleaved_timing, make_inputs, make_train_step, summarize
from .variants import CALIB_ALL, CALIB_NONE, VARIANTS, build_variants, calib_name

__all__ = ["BenchConfig", "run_comparison", "TOLERANCE"]

#: The must-show: |measured ratio - time-weighted prediction| <= TOLERANCE.
TOLERANCE = 0.03

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BenchConfig:
    depth: int = 110
    batch_size: int = 32
    steps: int = 24               # timed rounds: one step of every variant per round
    warmup: int = 2               # untimed rounds first
    p_last: float = 0.5
    schedule: str = "linear"
    mode: str = "batch"
    naive_mode: str | None = None  # default: same as mode
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    input_sets: int = 4
    num_classes: int = 10
    image_shape: tuple = (3, 32, 32)
    variants: tuple = VARIANTS
    calibration: bool = True

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
    return n * (cfg.steps + cfg.warmup)


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run_comparison(cfg: BenchConfig, progress: Callable[[str], object] | None = None) -> dict:
    """Build the variants, time them interleaved, predict, and return the result record."""
    device = cfg.resolved_device()
    dtype = cfg.torch_dtype()
    bm = build_variants(cfg.depth, p_last=cfg.p_last, schedule=cfg.schedule, mode=cfg.mode,
                        naive_mode=cfg.naive_mode, seed=cfg.seed, device=device,
                        variants=cfg.variants, calibration=cfg.calibration,
                        num_classes=cfg.num_classes)
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
    times = interleaved_timing(steps, inputs, rounds=cfg.steps, warmup=cfg.warmup,
                               device=device, on_step=on_step, progress=progress, last=last)
    stats = {n: dict(summarize(ts), times=ts) for n, ts in times.items()}
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
            "Ratios compared with a prediction are means over the timed steps (the "
            "predictions are expectations over random gates); medians are for reading.",
            "time-weighted prediction = (T_none + sum_l p_l t_stage(l)) / T_all from the "
            "FixedGates calibration variants (means) timed in the same interleaved run.",
        ],
    }
    mean = {n: s["mean"] for n, s in stats.items()}
    meas = record["measured"]
    if "constant" in mean:
        for n in mean:
            meas[f"{n}_vs_constant"] = _ratio(mean[n], mean["constant"])
    if "sdkernels" in mean:
        sd = stats["sdkernels"]
        if "constant" in mean:
            meas["saving_vs_constant"] = 1.0 - meas["sdkernels_vs_constant"]
            meas["median_ratio_vs_constant"] = _ratio(sd["median"], stats["constant"]["median"])
            # standard error of the mean ratio (gate draws and machine noise together)
            meas["stderr_vs_constant"] = _ratio(sd["std"] / math.sqrt(sd["n"]), mean["constant"])
        if "naive" in mean:
            meas["sdkernels_vs_naive"] = _ratio(mean["sdkernels"], mean["naive"])
            meas["saving_vs_naive"] = 1.0 - meas["sdkernels_vs_naive"]
        if gates:
            meas["mean_active_blocks"] = statistics.fmean(
                sum(predict._gate_fraction(b) for b in step) for step in gates)
        meas["expected_active_blocks"] = flop["expected_depth"]
    if cfg.calibration:
        t_stage = [mean[calib_name(s)] for s in bm.stages]
        tp = predict.time_prediction(mean[CALIB_NONE], t_stage, mean[CALIB_ALL], bm.probs,
                                     bm.stage_of)
        record["predictions"]["time"] = tp
        if gates:
            record["predictions"]["time_realized_gates"] = predict.realized_time_ratio(
                tp, bm.stage_of, gates)
        if "sdkernels" in mean:
            meas["sdkernels_vs_all_active"] = _ratio(mean["sdkernels"], mean[CALIB_ALL])
        if "constant" in mean:
            meas["all_active_vs_constant"] = _ratio(mean[CALIB_ALL], mean["constant"])
        if "sdkernels" in mean and "constant" in mean:
            m_ratio, p_ratio = meas["sdkernels_vs_constant"], tp["ratio"]
            record["comparison"] = {
                "measured": m_ratio,
                "predicted": p_ratio,
                "abs_diff": abs(m_ratio - p_ratio),
                "tolerance": TOLERANCE,
                "within_tolerance": abs(m_ratio - p_ratio) <= TOLERANCE,
                "what": ("mean sdkernels step time / mean constant-depth step time over "
                         f"{stats['sdkernels']['n']} interleaved steps, vs the "
                         "time-weighted expected-depth prediction"),
            }
    return record
