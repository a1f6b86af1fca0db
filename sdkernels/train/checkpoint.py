"""Checkpoints of the training CLI: everything an exact resume needs.

Written by rank 0 after every epoch to ``<out>/checkpoint.pt`` (a temporary file,
then an atomic rename, so an interrupted write never leaves half a checkpoint):

* ``model`` (the plain module's state_dict: also loadable into
  ``sdkernels.models.cifar_resnet``), ``optimizer``, ``scheduler``, ``scaler`` (fp16);
* ``gates``: :func:`sdkernels.gate_state` of the model;
* ``epoch``: epochs completed;
* ``rng``: torch's CPU generator, the CUDA generators of every rank, and every rank's
  augmentation generator (the data order is a function of the seed and the epoch,
  see :mod:`.loop`);
* ``config``: the recipe, checked against the resuming command;
* ``history``: the per-epoch log records (rewritten into the log on resume), and the
  baseline timing and predictions of ``--baseline-epochs``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_NAME", "FORMAT", "RECIPE_KEYS", "save_checkpoint", "load_checkpoint",
           "check_recipe", "CheckpointError"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "sdkernels.train/1"

#: Options that define the training run: a resume must use the same values.
RECIPE_KEYS = ("dataset", "depth", "p_last", "schedule", "mode", "scaling", "epochs", "lr",
               "momentum", "weight_decay", "batch_size", "val_size", "seed", "synthetic_size",
               "amp", "steps_per_epoch", "data_source")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another recipe."""


def save_checkpoint(state: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path} (the training CLI writes "
                              f"{CHECKPOINT_NAME} into --out after every epoch)")
    try:
        # Our own checkpoints hold tensors, numbers, strings and dicts only.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported the same way
        raise CheckpointError(f"--resume: cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"--resume: {path} is not a sdkernels.train checkpoint")
    return state


def check_recipe(saved: dict, current: dict) -> None:
    """Raise CheckpointError naming every recipe option that differs."""
    diffs = []
    for k in RECIPE_KEYS:
        a, b = saved.get(k), current.get(k)
        if a != b:
            flag = "--" + k.replace("_", "-")
            diffs.append(f"{flag}: checkpoint {a!r}, now {b!r}")
    if diffs:
        raise CheckpointError("--resume: this command's recipe differs from the checkpoint's "
                              "(resume with the same options): " + "; ".join(diffs))
