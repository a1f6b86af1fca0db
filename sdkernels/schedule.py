"""Survival probabilities p_l and what they predict (expected depth, expected work).

Blocks are numbered l = 1..L in forward order over the whole network. The paper's
linear decay is p_l = 1 - (l / L) (1 - p_L); ``uniform`` is p_l = p_L everywhere.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

__all__ = ["survival_probs", "expected_depth", "expected_work", "check_prob", "SCHEDULES"]

SCHEDULES = ("linear", "uniform")


def check_prob(p, what: str = "survival probability") -> float:
    """Validate a survival probability: a real number in (0, 1].

    Real numbers only: Python and NumPy ints and floats, and one-element real tensors.
    Strings and bools are refused rather than converted ('0.5' and True would otherwise
    pass as 0.5 and 1.0 and hide a bug in the caller).
    """
    if isinstance(p, torch.Tensor):
        if p.numel() != 1 or p.dtype == torch.bool or p.is_complex():
            raise TypeError(f"{what} must be a real number in (0, 1], got a tensor of "
                            f"shape {list(p.shape)} and dtype {p.dtype}")
        p = p.item()
    elif isinstance(p, bool) or not isinstance(p, numbers.Real):  # numpy's bool_ is no Real
        raise TypeError(f"{what} must be a real number in (0, 1], got {p!r} "
                        f"({type(p).__name__})")
    p = float(p)
    if not (0.0 < p <= 1.0) or math.isnan(p):
        raise ValueError(f"{what} must be in (0, 1], got {p}")
    return p


def survival_probs(num_blocks: int, p_last: float = 0.5, schedule="linear") -> list[float]:
    """Survival probability of each of ``num_blocks`` residual blocks.

    ``schedule`` is ``"linear"`` (the paper's default), ``"uniform"``, or an explicit
    sequence of ``num_blocks`` probabilities (then ``p_last`` is ignored).
    """
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    if not isinstance(schedule, str):
        probs = list(schedule)
        if len(probs) != num_blocks:
            raise ValueError(
                f"explicit schedule has {len(probs)} probabilities for {num_blocks} blocks")
        return [check_prob(p, f"survival probability of block {i + 1}")
                for i, p in enumerate(probs)]
    p_last = check_prob(p_last, "p_last")
    if schedule == "linear":
        return [1.0 - (l / num_blocks) * (1.0 - p_last) for l in range(1, num_blocks + 1)]
    if schedule == "uniform":
        return [p_last] * num_blocks
    raise ValueError(f"unknown schedule {schedule!r}: expected one of {SCHEDULES} "
                     "or a sequence of probabilities")


def expected_depth(probs: Sequence[float]) -> float:
    """Expected number of active blocks, E = sum p_l (ResNet-110, p_L=0.5: 40.25 of 54)."""
    return float(sum(check_prob(p) for p in probs))


def expected_work(probs: Sequence[float], block_costs: Sequence[float] | None = None,
                  fixed: float = 0.0) -> float:
    """Expected cost of one step: ``fixed + sum_l p_l * cost_l``.

    With FLOPs as costs this is the FLOP-weighted prediction; with measured block times
    the time-weighted one. ``block_costs`` defaults to 1 per block.
    """
    probs = [check_prob(p) for p in probs]
    if block_costs is None:
        block_costs = [1.0] * len(probs)
    if len(block_costs) != len(probs):
        raise ValueError(f"{len(block_costs)} block costs for {len(probs)} blocks")
    return float(fixed) + float(sum(p * c for p, c in zip(probs, block_costs)))
