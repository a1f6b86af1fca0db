"""Training steps and an interleaved step timer.

Machines are noisy (design §7), so variants are never timed one after the other in long
runs. :func:`interleaved_timing` warms every variant up, then runs R rounds; each round
times one training step of every variant in turn (the order rotates from round to
round), so a slow spell of the machine hits all variants alike. Per variant it keeps
every step time; :func:`summarize` gives median, IQR and mean.

Random gates make a stochastic-depth step vary in cost from step to step. The
comparison with an expected-depth prediction uses medians (robust to a busy machine);
for random gates the median estimates the expectation because the number of active
blocks, a sum of independent Bernoullis, is near-symmetric (see
:mod:`sdkernels.bench.compare`). Means are kept as well.
"""
from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["make_train_step", "make_inputs", "time_step", "interleaved_timing", "summarize",
           "synchronize", "minor_faults", "median_faults"]


def synchronize(device) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_train_step(model: nn.Module, *, lr: float = 0.1, momentum: float = 0.9,
                    weight_decay: float = 1e-4, dtype: torch.dtype = torch.float32
                    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One SGD training step of ``model``: ``step(x, y) -> loss`` (not synchronised to host).

    Forward, cross-entropy, backward and an SGD step (momentum 0.9, weight decay 1e-4,
    lr 0.1 by default), gradients reset with ``zero_grad(set_to_none=True)``; on CUDA the
    step ends with a device synchronisation, so the wall time of a call is its cost.
    ``dtype`` other than float32 runs forward and loss under ``torch.autocast`` with that
    dtype (mixed precision: parameters and optimizer stay float32).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        synchronize(device)
        return loss.detach()

    step.model = model
    step.optimizer = opt
    return step


def make_inputs(batch_size: int, *, num_sets: int = 4, image_shape=(3, 32, 32),
                num_classes: int = 10, device="cpu", seed: int = 0
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``num_sets`` synthetic CIFAR-shaped batches (random images and labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_sets):
        x = torch.randn((batch_size, *image_shape), generator=g)
        y = torch.randint(0, num_classes, (batch_size,), generator=g)
        out.append((x.to(device), y.to(device)))
    return out


def time_step(fn: Callable, *args, device="cpu", out: list | None = None) -> float:
    """Seconds one call of ``fn(*args)`` takes (CUDA events on CUDA, perf_counter on CPU).

    The call's return value is appended to ``out`` when given.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        res = fn(*args)
        end.record()
        end.synchronize()
        t = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        res = fn(*args)
        t = time.perf_counter() - t0
    if out is not None:
        out.append(res)
    return t


def interleaved_timing(steps: Mapping[str, Callable], inputs: Sequence[tuple], *,
                       rounds: int, warmup: int = 1, device="cpu", rotate: bool = True,
                       on_step: Callable[[str, int, float], Any] | None = None,
                       progress: Callable[[str], Any] | None = None,
                       last: dict | None = None,
                       faults: dict | None = None) -> dict[str, list[float]]:
    """Time ``rounds`` steps of every variant, interleaved. Returns name -> seconds per step.

    ``steps`` maps a variant name to ``step(x, y)``; round r feeds every variant the same
    batch ``inputs[r % len(inputs)]``. ``warmup`` rounds (untimed) run first. With
    ``rotate`` the order of the variants shifts by one each round, so no variant always
    follows the same one. Python's garbage collector is off while a step is timed (it
    runs between rounds). ``on_step(name, round, seconds)`` is called after each timed
    step (e.g. to read the gates the step drew), ``progress(name)`` after every step,
    warm-up included. ``last``, when given, receives every variant's last return value.
    ``faults``, when given, receives per variant the minor page faults of the process
    during each timed step (empty lists where the platform cannot count them): on VMs
    a first touch of fresh memory costs ~2 us per 4 KiB page, enough to swing a CPU
    step by 30%, so a result is read together with its faults.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not inputs:
        raise ValueError("need at least one input batch")
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    if faults is not None:
        faults.update({n: [] for n in names})
    for r in range(warmup):
        x, y = inputs[r % len(inputs)]
        for n in names:
            steps[n](x, y)
            if progress is not None:
                progress(n)
    synchronize(device)
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(rounds):
            gc.collect()
            gc.disable()
            x, y = inputs[r % len(inputs)]
            shift = r % len(names) if rotate else 0
            for n in names[shift:] + names[:shift]:
                res: list = []
                f0 = minor_faults() if faults is not None else None
                t = time_step(steps[n], x, y, device=device, out=res)
                times[n].append(t)
                if faults is not None and f0 is not None:
                    faults[n].append(minor_faults() - f0)
                if last is not None:
                    last[n] = res[0]
                if on_step is not None:
                    on_step(n, r, t)
                if progress is not None:
                    progress(n)
            if gc_was_enabled:
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def median_faults(faults: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Median page faults per step of each variant that has counts (see ``faults=``)."""
    return {n: statistics.median(fs) for n, fs in faults.items() if fs}


def minor_faults() -> int | None:
    """Minor page faults of this process so far (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    # linear interpolation between closest ranks (numpy's default)
    if len(sorted_xs) == 1:
        return float(sorted_xs[0])
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


def summarize(times: Sequence[float]) -> dict[str, float]:
    """median, IQR (q75 - q25), q25, q75, mean, std, min, max and n of step times (s)."""
    xs = sorted(float(t) for t in times)
    if not xs:
        raise ValueError("no times to summarize")
    q25, q75 = _quantile(xs, 0.25), _quantile(xs, 0.75)
    return {
        "median": _quantile(xs, 0.5), "iqr": q75 - q25, "q25": q25, "q75": q75,
        "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": xs[0], "max": xs[-1], "n": len(xs),
    }
