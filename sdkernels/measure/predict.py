"""What a stochastic-depth step should cost, relative to the all-active network.

Two predictions of the expected step-time ratio E[T_sd] / T_all:

* **FLOP-weighted**: ``(F_fixed + sum_l p_l F_l) / (F_fixed + sum_l F_l)``, with the
  convolution and linear FLOPs counted analytically from the layer shapes (F_l: the
  residual branch of block l; F_fixed: stem, classifier and every shortcut, which runs
  whether the block is dropped or not). Forward FLOPs; the backward of a convolution is
  about twice its forward, so the ratio is that of a whole training step too.
* **time-weighted** (measured): with every gate fixed by ``FixedGates``, T_none (all
  blocks dropped) is the fixed part and T_stage_k (only stage k active) gives the time
  of one block of stage k, t_k = (T_stage_k - T_none) / n_k. The prediction is
  ``(T_none + sum_l p_l t_stage(l)) / T_all``, T_all the all-active time measured in
  the same interleaved run: "fixed part + sum over blocks of p_l times that block's
  measured time".

Both are predictions of an *expectation* over random gates. The comparison uses the
median over many interleaved steps, which estimates it (the number of active blocks is
a sum of independent Bernoullis, near-symmetric) and resists steps slowed by other
processes. :func:`realized_time_ratio` gives the same
time-weighted formula evaluated at the gates that were actually drawn in the timed
steps, which separates the luck of the draw from everything else.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from ..convert import convert, residual_blocks
from ..schedule import expected_depth, expected_work

__all__ = ["count_flops", "flop_prediction", "time_prediction", "realized_time_ratio"]


def count_flops(model: nn.Module, image_shape=(3, 32, 32)) -> tuple[float, list[float]]:
    """(fixed FLOPs, residual-branch FLOPs of every block) of one sample's forward pass.

    Conv2d: 2 * C_out * H_out * W_out * (C_in / groups) * k_h * k_w; Linear: 2 * in * out
    (multiply-adds counted as 2). Shapes come from one forward of a single random image
    through a CPU float32 copy in eval mode (all blocks active); ``model`` is untouched.
    """
    m = copy.deepcopy(model).cpu().float().eval()
    convert(m, p_last=1.0)  # sdkernels blocks know which modules form the residual branch
    owner: dict[int, int] = {}
    for l, (_, block) in enumerate(residual_blocks(m)):
        for sub in block._branch_modules():
            for mod in sub.modules():
                owner[id(mod)] = l
    blocks = [0.0] * len(residual_blocks(m))
    fixed = [0.0]

    def hook(mod, inputs, output):
        if isinstance(mod, nn.Conv2d):
            c_in = inputs[0].shape[1]
            kh, kw = mod.kernel_size
            f = 2.0 * output[0].numel() * (c_in / mod.groups) * kh * kw
        else:
            f = 2.0 * mod.in_features * mod.out_features
        l = owner.get(id(mod))
        if l is None:
            fixed[0] += f
        else:
            blocks[l] += f

    handles = [mod.register_forward_hook(hook) for mod in m.modules()
               if isinstance(mod, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            m(torch.zeros((1, *image_shape)))
    finally:
        for h in handles:
            h.remove()
    return fixed[0], blocks


def flop_prediction(fixed: float, block_flops: Sequence[float], probs: Sequence[float]) -> dict:
    """FLOP-weighted expected ratio and the fraction of residual work saved."""
    if len(block_flops) != len(probs):
        raise ValueError(f"{len(block_flops)} blocks but {len(probs)} probabilities")
    total = fixed + sum(block_flops)
    expected = expected_work(probs, block_flops, fixed)
    e_depth = expected_depth(probs)
    return {
        "ratio": expected / total,
        "fixed_flops": fixed,
        "block_flops": list(block_flops),
        "total_flops": total,
        "expected_flops": expected,
        "expected_depth": e_depth,
        "num_blocks": len(probs),
        # 1 - E/L: fraction of residual blocks skipped on average (ResNet-110, p_L=0.5
        # linear: 1 - 40.25/54 = 25.5%)
        "residual_saved_depth": 1.0 - e_depth / len(probs),
        # the same weighted by each block's FLOPs (downsampling blocks are cheaper)
        "residual_saved_flops": 1.0 - (expected - fixed) / sum(block_flops),
    }


def time_prediction(t_none: float, t_stage: Sequence[float], t_all: float,
                    probs: Sequence[float], stage_of: Sequence[int]) -> dict:
    """Time-weighted expected ratio from FixedGates calibration times (seconds).

    ``t_stage[k]`` is the step time with only stage k's blocks active, ``stage_of[l]``
    the stage of block l. Also reports the additivity check
    ``(T_none + sum_k n_k t_k) / T_all`` (1 when block times simply add up).
    """
    if len(stage_of) != len(probs):
        raise ValueError(f"{len(stage_of)} stage indices but {len(probs)} probabilities")
    sizes = [list(stage_of).count(k) for k in range(len(t_stage))]
    per_stage = [(t - t_none) / n if n else 0.0 for t, n in zip(t_stage, sizes)]
    block_times = [per_stage[k] for k in stage_of]
    predicted = expected_work(probs, block_times, t_none)
    return {
        "ratio": predicted / t_all,
        "predicted_time": predicted,
        "t_none": t_none,
        "t_stage": list(t_stage),
        "t_all": t_all,
        "t_block_per_stage": per_stage,
        "stage_sizes": sizes,
        "fixed_fraction": t_none / t_all,
        "additivity": (t_none + sum(n * t for n, t in zip(sizes, per_stage))) / t_all,
    }


def gate_fraction(g) -> float:
    """Fraction of a block's rows that ran: a batch gate is 0 or 1, row gates their mean."""
    if isinstance(g, torch.Tensor):
        return float(g.float().mean()) if g.numel() else 0.0
    return float(bool(g))


def realized_time_ratio(pred: Mapping, stage_of: Sequence[int], gates: Sequence[Sequence]) -> float:
    """Mean over steps of (T_none + sum_l b_l t_l) / T_all at the gates actually drawn.

    ``gates`` holds, per timed step, every block's gate (bool in batch mode, a bool
    tensor of surviving rows in row mode: then b_l is the surviving fraction).
    """
    if not gates:
        return float("nan")
    per_stage = pred["t_block_per_stage"]
    vals = []
    for step in gates:
        t = pred["t_none"] + sum(gate_fraction(b) * per_stage[k] for b, k in zip(step, stage_of))
        vals.append(t / pred["t_all"])
    return sum(vals) / len(vals)
