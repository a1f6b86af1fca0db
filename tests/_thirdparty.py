"""Third-party residual-block layouts for the conversion tests: timm and CIFAR code.

timm: the real classes whenever timm is installed (the CUDA CI environment has it);
otherwise hand-made look-alikes that keep the child names, registration order and
forward math of timm 1.x ``timm.models.resnet.BasicBlock``/``Bottleneck`` (the CPU CI
environment has neither timm nor torchvision: its torch is a CPU build). Tests build
timm models through :func:`timm_resnet`, which picks the real classes when it can;
``test_convert.py`` checks that the look-alikes still match the real timm layout where
both are available. The CIFAR ``BasicBlock`` (with a ``shortcut`` child) is copied from
the widely used CIFAR ResNet code, which is not a package.
"""
import torch
import torch.nn.functional as F
from torch import nn

try:  # the real timm, when installed
    from timm.models import resnet as timm_resnet_module
    from timm.layers import DropPath as TimmDropPath
except ImportError:
    timm_resnet_module = None
    TimmDropPath = None

HAVE_TIMM = timm_resnet_module is not None


def timm_resnet(block="basic", drop_path_rate=0.1, se=False, num_classes=10):
    """A small timm-layout ResNet with ``drop_path`` on its blocks: real timm if installed.

    Real timm: ``timm.models.resnet.ResNet`` with one block per stage (timm's forward
    needs all four stages), channels 16/32/48/64, the standard 7x7 stem; per-block
    drop-path rates rise linearly from 0 (timm gives the first block no DropPath).
    Without timm: :class:`TimmLikeResNet` (two stages of two blocks, DropPath on every
    block). ``se=True`` adds squeeze-and-excitation (converted by ``sdkernels.families``).
    """
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
    if HAVE_TIMM:
        cls = timm_resnet_module.BasicBlock if block == "basic" else timm_resnet_module.Bottleneck
        return timm_resnet_module.ResNet(
            cls, layers=(1, 1, 1, 1), channels=(16, 32, 48, 64), num_classes=num_classes,
            drop_path_rate=drop_path_rate, block_args={"attn_layer": "se"} if se else None)
    cls = TimmBasicBlock if block == "basic" else TimmBottleneck
    return TimmLikeResNet(block=cls, num_classes=num_classes, drop_path_rate=drop_path_rate,
                          se=se)


# --- Look-alikes of timm 1.x (used only when timm is not installed) ---------------------


class SEModule(nn.Module):
    """timm's SEModule contract: returns x scaled by its channel gate."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


class DropPath(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class TimmBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, drop_path=None, se=False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SEModule(planes) if se else None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class TimmBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, drop_path=None):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.se = None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = drop_path

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


class TimmLikeResNet(nn.Module):
    """A small timm-layout ResNet: stem, two stages, head; drop_path on every block."""

    def __init__(self, block=TimmBasicBlock, num_classes=10, drop_path_rate=0.1, se=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        e = block.expansion
        kw = {"se": se} if se else {}
        down1 = nn.Sequential(nn.Conv2d(16, 16 * e, 1, bias=False), nn.BatchNorm2d(16 * e))
        down2 = nn.Sequential(nn.Conv2d(16 * e, 32 * e, 1, 2, bias=False), nn.BatchNorm2d(32 * e))
        self.layer1 = nn.Sequential(block(16, 16, 1, down1 if e > 1 else None, DropPath(drop_path_rate), **kw),
                                    block(16 * e, 16, 1, None, DropPath(drop_path_rate), **kw))
        self.layer2 = nn.Sequential(block(16 * e, 32, 2, down2, DropPath(drop_path_rate), **kw),
                                    block(32 * e, 32, 1, None, DropPath(drop_path_rate), **kw))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32 * e, num_classes)

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.global_pool(x).flatten(1))


# --- CIFAR ResNet code (not a package) ----------------------------------------------------


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class CifarBasicBlock(nn.Module):
    """The CIFAR BasicBlock of common CIFAR ResNet code: option A or B shortcut."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                pad = planes // 4
                self.shortcut = LambdaLayer(
                    lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad)))
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class CifarLikeResNet(nn.Module):
    def __init__(self, option="A", num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(CifarBasicBlock(16, 16), CifarBasicBlock(16, 16))
        self.layer2 = nn.Sequential(CifarBasicBlock(16, 32, 2, option), CifarBasicBlock(32, 32))
        self.linear = nn.Linear(32, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class PreActBlock(nn.Module):
    """Pre-activation block: same child names as a CIFAR block, other order: unsupported."""

    def __init__(self, planes):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv1 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)
