"""sdkernels: stochastic depth that really skips the dropped residual blocks.

Quick tour::

    import sdkernels
    model = sdkernels.models.cifar_resnet(depth=110, p_last=0.5)   # the paper's ResNet-110
    model = sdkernels.convert(resnet, p_last=0.5, schedule="linear") # any torchvision/timm ResNet
    model = sdkernels.convert(vit, schedule="keep")                  # timm/torchvision drop path, skipping
    plain = sdkernels.revert(model)                                  # back to plain blocks
    print(sdkernels.backend_info())
"""
from . import families, gates, models, ops, residual, schedule
from .backends import BackendUnavailableError, backend_info, use_backend
from .blocks import BasicBlock, Bottleneck, StochasticDepthBlock
from .convert import convert, gates_of, residual_blocks, revert
from .gates import GateGenerator, gate_state, load_gate_state, manual_seed
from .residual import StochasticDepth
from .schedule import expected_depth, expected_work, survival_probs

__version__ = "0.1.0"

__all__ = [
    "BasicBlock", "Bottleneck", "StochasticDepthBlock", "StochasticDepth", "GateGenerator",
    "convert", "revert", "residual_blocks", "gates_of", "survival_probs", "expected_depth",
    "expected_work", "gate_state", "load_gate_state", "manual_seed", "backend_info",
    "use_backend", "BackendUnavailableError", "models", "ops", "gates", "schedule", "families", "residual",
]
