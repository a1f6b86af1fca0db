"""``python -m sdkernels.bench`` (also ``sdkernels-bench``): time training steps of a CIFAR
ResNet with constant depth, naive stochastic depth and sdkernels, side by side.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from ..schedule import check_prob

DESCRIPTION = """\
Train a CIFAR ResNet (default ResNet-110) on synthetic CIFAR-shaped data (random
3x32x32 images, 10 classes) for a few SGD steps in three variants built from the same
initial weights:
  constant   plain network, every block runs (constant depth);
  naive      stochastic depth as torchvision/timm do it: every residual branch is
             computed, then multiplied by a 0/1 mask (saves nothing);
  sdkernels  stochastic depth with the dropped blocks really skipped;
plus FixedGates calibration copies (all blocks dropped, one stage active, all active)
for the time-weighted prediction. All are timed interleaved: every round times one
step of each, so machine noise hits them alike.

Prints step times (median, IQR, mean; minor page faults per step where the platform
counts them), the measured saving of sdkernels against
constant depth and against naive stochastic depth, and two predictions of the saving:
FLOP-weighted (analytic conv FLOPs) and time-weighted (fixed part + sum over blocks of
p_l times that block's measured time). Ratios are of medians over the timed steps
(robust to a busy machine; for random gates the median estimates the expectation the
predictions give, the number of active blocks being near-symmetric). Means are recorded.
Writes result.json and (unless --no-plot) step_times.png into --out.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdkernels.bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=110,
                   help="CIFAR ResNet depth, 6n+2 (20, 56, 110, 1202, ...); default 110")
    p.add_argument("--batch-size", type=int, default=32, help="mini-batch size; default 32")
    p.add_argument("--steps", type=int, default=40,
                   help="timed rounds; each round times one training step of every variant "
                        "(11 variants with calibration and the p_L sweep); default 40")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed warm-up rounds before timing; default 2")
    p.add_argument("--p-last", type=float, default=0.5,
                   help="survival probability p_L of the last block; default 0.5")
    p.add_argument("--schedule", choices=("linear", "uniform"), default="linear",
                   help="survival schedule: linear decay from 1 to p_L (the paper) or "
                        "uniform p_L; default linear")
    p.add_argument("--mode", choices=("batch", "row"), default="batch",
                   help="gate per mini-batch (the paper) or per sample; used for sdkernels "
                        "and the naive baseline; default batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="float32, or bfloat16 via torch.autocast (float32 parameters); "
                        "default float32")
    p.add_argument("--device", default="auto",
                   help="'cpu', 'cuda', 'cuda:N' or 'auto' (cuda if available, else cpu)")
    p.add_argument("--backend", choices=("auto", "extension", "reference"), default="auto",
                   help="sdkernels backend for the stochastic-depth variants: the automatic "
                        "choice (compiled extension when built) or a forced one")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); default: torch's choice")
    p.add_argument("--out", default="./bench-out",
                   help="directory for result.json and the plot; default ./bench-out")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights, the gates and the synthetic data")
    p.add_argument("--sweep", default="1.0,0.8,0.2",
                   help="comma-separated extra p_L values timed for sdkernels (step time vs "
                        "p_L in the table and plot), '' for none; default 1.0,0.8,0.2")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    return p


def _busy_warning(device) -> str | None:
    """A warning when other processes already load the CPUs this run will time on."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load < 0.75 * cpus:
        return None
    return (f"warning: load average {load:.1f} on {cpus} CPUs before the run: other "
            f"processes compete for the cores, so CPU timings will be noisy (and torch's "
            f"multi-threaded kernels slow down badly when a core is taken; "
            f"--threads 1 is more robust then)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from . import BenchConfig, run_comparison, total_steps
    from .report import format_table, plot, write_json

    if args.threads is not None:
        if args.threads < 1:
            print("--threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        print("--steps and --batch-size must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    # Denormal floats make CPU arithmetic slow in data-dependent ways that would differ
    # between variants whose weights drift apart; flush them for the timing run.
    torch.set_flush_denormal(True)
    try:
        sweep = tuple(float(v) for v in args.sweep.split(",") if v.strip())
        for v in (args.p_last, *sweep):
            check_prob(v, "p_L")
    except (ValueError, TypeError) as e:
        print(f"error: --p-last/--sweep: {e}", file=sys.stderr)
        return 2
    cfg = BenchConfig(depth=args.depth, batch_size=args.batch_size, steps=args.steps,
                      warmup=args.warmup, p_last=args.p_last, schedule=args.schedule,
                      mode=args.mode, dtype=args.dtype, device=args.device, backend=args.backend,
                      seed=args.seed, sweep=sweep)
    try:
        device = cfg.resolved_device()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        from ..models import cifar_resnet
        cifar_resnet(cfg.depth, p_last=1.0)  # validates the depth early, cheaply
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    busy = _busy_warning(device)
    if busy:
        print(busy, file=sys.stderr)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # the backend fallback warning is shown in the table header instead
        warnings.filterwarnings("ignore", message="sdkernels: using the reference", category=RuntimeWarning)
        # a bar only on a terminal: in a log file it is hundreds of \r updates
        with tqdm(total=total_steps(cfg), desc=f"ResNet-{cfg.depth} steps", unit="step",
                  dynamic_ncols=True, disable=not sys.stderr.isatty()) as bar:
            rec = run_comparison(cfg, progress=lambda name: bar.update(1))
    rec["wall_time_s"] = time.perf_counter() - t0
    rec["environment"]["flush_denormal"] = True
    if busy:
        rec["environment"]["warning"] = busy

    print()
    print(format_table(rec))
    out = Path(args.out)
    print(f"\nresult: {write_json(rec, out / 'result.json')}")
    if not args.no_plot:
        print(f"plot:   {plot(rec, out / 'step_times.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
