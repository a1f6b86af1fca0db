"""Library code behind ``python -m sdkernels.train`` (also ``sdkernels-train``): the paper's
CIFAR training recipe with stochastic depth, DDP, exact resume and a measured saving.

* :mod:`.cli`         the command line (``main``, ``build_parser``);
* :mod:`.loop`        :class:`TrainConfig` and :func:`train`, the epochs, evaluation,
  the constant-depth baseline and the time-weighted prediction;
* :mod:`.data`        CIFAR-10/100 python-pickle archives, synthetic data, augmentation;
* :mod:`.checkpoint`  checkpoint format and the resume check;
* :mod:`.dist`        torch.distributed set-up from torchrun's environment.
"""
from .cli import build_parser, main, parse_config
from .data import DatasetError, load_cifar, synthetic_cifar
from .loop import TrainConfig, train

__all__ = ["main", "build_parser", "parse_config", "TrainConfig", "train", "DatasetError",
           "load_cifar", "synthetic_cifar"]
