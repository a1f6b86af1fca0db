"""The paper's CIFAR ResNets (He et al. 2016, section 4.2; Huang et al. 2016).

depth = 6n + 2: a 3x3 stem with 16 channels, three stages of n BasicBlocks with 16, 32
and 64 channels (the first block of stages 2 and 3 halves the resolution), global
average pooling and a linear classifier. Shortcuts are option A, as in the stochastic
depth authors' code: subsample by 2 and append zero channels, so the only parameters
are in the residual branches, stem and classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from ..blocks import BasicBlock, StochasticDepthBlock, conv_bn_relu
from ..gates import GateGenerator
from ..layers import OptionAShortcut
from ..ops import FoldCache
from ..schedule import survival_probs

__all__ = ["OptionAShortcut", "CifarResNet", "cifar_resnet", "cifar_depths"]


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10, block_kwargs=None):
        super().__init__()
        kw = dict(block_kwargs or {})
        probs = kw.pop("survival_probs", None)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self._stem_fold_cache = FoldCache()  # the fused stem's folded eval weights
        inplanes, l = 16, 0
        for stage, planes in enumerate((16, 32, 64), start=1):
            layers = []
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 1 and i == 0) else 1
                down = None if (stride == 1 and inplanes == planes) else \
                    OptionAShortcut(inplanes, planes, stride)
                p = 1.0 if probs is None else probs[l]
                layers.append(BasicBlock(inplanes, planes, stride, down, survival_prob=p, **kw))
                inplanes, l = planes, l + 1
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        if isinstance(self.layer1[0], StochasticDepthBlock):
            # With sdkernels blocks the stem runs fused too (training: its convolution
            # recomputed in backward; eval: BN folded in); channels_last from here on.
            # A reverted (plain) network runs its modules everywhere.
            x = conv_bn_relu(self, self.conv1, self.bn1, self.relu, x)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_depths(max_depth: int = 1202) -> list[int]:
    return list(range(8, max_depth + 1, 6))


def cifar_resnet(depth: int = 110, num_classes: int = 10, p_last: float = 0.5,
                 schedule="linear", mode: str = "batch", scaling: str = "test",
                 seed: int | None = None, **block_kwargs) -> CifarResNet:
    """The paper's CIFAR ResNet of ``depth`` = 6n+2 layers with stochastic depth.

    ``p_last=1.0`` gives constant depth. The blocks share one gate generator seeded by
    ``seed``; extra keyword arguments (``dropped_grads``, ``drop_impl``) go to every block.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, "
                         f"1202, ...), got {depth!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    n = (depth - 2) // 6
    probs = survival_probs(3 * n, p_last, schedule)
    gen = GateGenerator(seed)
    kw = dict(mode=mode, scaling=scaling, gate_generator=gen,
              survival_probs=probs, **block_kwargs)
    model = CifarResNet(n, num_classes, kw)
    gen.bind(m for m in model.modules() if isinstance(m, StochasticDepthBlock))
    return model
