"""Functional ops: stateless, everything passed as arguments, the implementation chosen
in one place (``ops.dispatch``, design §3).

Modules (``sdkernels.blocks``) describe themselves as plans (``ops.plan``) and call
:func:`residual_block` or :func:`conv_bn_relu`; these pick an implementation from
(backend, device type, train/eval) and run it. Gates, gate scales and statistics come
in as arguments; the only state is the fold cache a module owns and passes in.
"""
from __future__ import annotations

from . import extension, folded_eval, folding, fused_block, plan, reference
from ..backends import resolve_backend
from .dispatch import (SHORTCUT, batch_norm_add_relu, conv_bn_relu, fused_applies,
                       implementation, modules_add, residual_block, residual_branch_train,
                       row_path, scale_bias_add_relu)
from .folding import FoldCache, clear_cache
from .fused_block import ConvBN
from .plan import BranchPlan, StemPlan, branch_plan, has_hooks, stem_plan, train_stages

__all__ = ["residual_block", "modules_add", "conv_bn_relu", "implementation", "fused_applies",
           "row_path", "SHORTCUT",
           "scale_bias_add_relu", "batch_norm_add_relu", "residual_branch_train", "ConvBN",
           "BranchPlan", "StemPlan", "branch_plan", "has_hooks", "stem_plan", "train_stages",
           "FoldCache", "clear_cache", "resolve_backend", "reference", "extension", "fused_block",
           "folding", "folded_eval", "plan"]
