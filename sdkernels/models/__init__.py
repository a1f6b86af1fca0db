"""Models: the paper's CIFAR ResNets and torchvision-compatible plain ResNets."""
from . import cifar, resnet
from .cifar import CifarResNet, OptionAShortcut, cifar_depths, cifar_resnet

__all__ = ["cifar", "resnet", "cifar_resnet", "CifarResNet", "OptionAShortcut", "cifar_depths"]
