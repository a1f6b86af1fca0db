"""Gate helpers of the calibration runs: blocks grouped by stage, gates fixed per stage.

The time-weighted prediction (:mod:`.predict`) times copies of a network whose gates are
fixed with :class:`~sdkernels.gates.FixedGates`: all dropped, one stage active, all
active. The benchmark harness and the training CLI both build those copies.
"""
from __future__ import annotations

from torch import nn

from ..convert import gates_of, residual_blocks
from ..gates import FixedGates

__all__ = ["stages_of", "fix_gates"]


def stages_of(model: nn.Module) -> tuple[list[str], list[int]]:
    """(stage names in forward order, stage index of every residual block).

    A stage is the module that holds a run of residual blocks (``layer1`` ... in the
    CIFAR and torchvision ResNets).
    """
    names, stage_of = [], []
    for qual, _ in residual_blocks(model):
        stage = qual.rpartition(".")[0] or "<root>"
        if stage not in names:
            names.append(stage)
        stage_of.append(names.index(stage))
    return names, stage_of


def fix_gates(model: nn.Module, active_stage: int | None, all_active: bool = False) -> None:
    """Force every block's gates (a converted transformer block has two): on in stage
    ``active_stage`` (or everywhere), off elsewhere."""
    _, stage_of = stages_of(model)
    for (_, block), k in zip(residual_blocks(model), stage_of):
        for g in gates_of(block):
            g.gate_generator = FixedGates(all_active or k == active_stage)
