"""The networks a benchmark compares, all built from the same initial weights.

* ``constant``  the plain eager CIFAR ResNet (constant depth): ``revert(cifar_resnet(...))``.
* ``naive``     stochastic depth the way torchvision / timm do it: every residual branch
                is computed and multiplied by a 0/1 mask (``drop_impl="mask"``).
* ``sdkernels`` stochastic depth with the dropped blocks really skipped.

For the time-weighted prediction there are also *calibration* variants: the sdkernels
network with every block's gate fixed by :class:`~sdkernels.gates.FixedGates`:
``calib:none`` (all blocks dropped), ``calib:<stage>`` (only that stage's blocks active)
and ``calib:all`` (all blocks active).

One network is built (weights drawn from ``seed`` without touching torch's global RNG)
and every variant is a deep copy of it, so the comparison is of the same weights.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..convert import convert, residual_blocks, revert
from ..measure.calibration import fix_gates, stages_of
from ..models import cifar_resnet
from ..schedule import survival_probs

__all__ = ["VARIANTS", "CALIB_NONE", "CALIB_ALL", "BenchModels", "build_variants",
           "calib_name"]

VARIANTS = ("constant", "naive", "sdkernels")
CALIB_NONE = "calib:none"
CALIB_ALL = "calib:all"


def calib_name(stage: str) -> str:
    return f"calib:{stage}"


@dataclass
class BenchModels:
    """The variants plus what the predictions need to know about the network."""

    models: dict[str, nn.Module]
    depth: int
    probs: list[float]            # p_l of every residual block, forward order
    stages: list[str]             # stage names, forward order
    stage_of: list[int]           # stage index of every residual block
    base: nn.Module = field(repr=False, default=None)  # the shared initial weights (CPU)

    @property
    def num_blocks(self) -> int:
        return len(self.probs)

    def stage_sizes(self) -> list[int]:
        return [self.stage_of.count(k) for k in range(len(self.stages))]

    def calibration_names(self) -> list[str]:
        return [CALIB_NONE] + [calib_name(s) for s in self.stages] + [CALIB_ALL]


def build_variants(depth: int = 110, *, p_last: float = 0.5, schedule="linear",
                   mode: str = "batch", naive_mode: str | None = None, seed: int = 0,
                   device="cpu", variants=VARIANTS, calibration: bool = False,
                   num_classes: int = 10) -> BenchModels:
    """Build the requested variants of a CIFAR ResNet of ``depth`` layers on ``device``.

    ``naive_mode`` (default: ``mode``) is the naive baseline's gate mode ("batch" as
    torchvision's ``StochasticDepth(mode="batch")``, "row" as timm's ``DropPath``).
    ``calibration=True`` adds the :class:`FixedGates` variants of the sdkernels network.
    Weights come from ``seed``; the gate generators of ``naive`` and ``sdkernels`` are
    seeded with ``seed`` too, so in batch mode both draw the same gate sequence.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: expected some of {VARIANTS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = cifar_resnet(depth, num_classes=num_classes, p_last=1.0, seed=seed)
    probs = survival_probs(len(residual_blocks(base)), p_last, schedule)
    stages, stage_of = stages_of(base)
    models: dict[str, nn.Module] = {}
    for name in variants:
        m = copy.deepcopy(base)
        if name == "constant":
            m = revert(m)
        elif name == "naive":
            convert(m, p_last, schedule, mode=naive_mode or mode, seed=seed, drop_impl="mask")
        else:
            convert(m, p_last, schedule, mode=mode, seed=seed)
        models[name] = m.to(device).train()
    if calibration:
        plans = [(CALIB_NONE, None, False)]
        plans += [(calib_name(s), k, False) for k, s in enumerate(stages)]
        plans += [(CALIB_ALL, None, True)]
        for name, stage, all_active in plans:
            m = convert(copy.deepcopy(base), p_last, schedule, mode="batch", seed=seed)
            fix_gates(m, stage, all_active)
            models[name] = m.to(device).train()
    return BenchModels(models=models, depth=depth, probs=probs, stages=stages,
                       stage_of=stage_of, base=base)
