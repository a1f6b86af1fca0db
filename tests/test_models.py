import pytest
import torch

import sdkernels
from sdkernels.models.cifar import OptionAShortcut


def test_resnet110_structure():
    m = sdkernels.models.cifar_resnet(110, num_classes=10, p_last=0.5)
    blocks = [b for b in m.modules() if isinstance(b, sdkernels.BasicBlock)]
    assert len(blocks) == 54
    assert sdkernels.expected_depth([b.survival_prob for b in blocks]) == pytest.approx(40.25)
    # option-A shortcuts hold no parameters; counted by hand: stem 432 + 32, stage 1
    # 18 * 4672, stage 2 13952 + 17 * 18560, stage 3 55552 + 17 * 73984, classifier 650
    assert sum(p.numel() for p in m.parameters()) == 1_727_962
    assert [b.conv2.out_channels for b in (m.layer1[0], m.layer2[0], m.layer3[0])] == [16, 32, 64]
    assert isinstance(m.layer2[0].downsample, OptionAShortcut) and m.layer1[0].downsample is None
    out = m.eval()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_option_a_shortcut():
    sc = OptionAShortcut(2, 4, 2)
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    y = sc(x)
    assert y.shape == (2, 4, 2, 2)
    assert torch.equal(y[:, :2], x[:, :, ::2, ::2]) and not y[:, 2:].any()
    with pytest.raises(ValueError):
        OptionAShortcut(4, 2)


@pytest.mark.parametrize("depth", [21, 7, 0, 110.0, "110"])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        sdkernels.models.cifar_resnet(depth)


def test_options_reach_blocks():
    m = sdkernels.models.cifar_resnet(20, p_last=0.8, schedule="uniform", mode="row",
                                      scaling="train", num_classes=100)
    blocks = [b for b in m.modules() if isinstance(b, sdkernels.BasicBlock)]
    assert all(b.survival_prob == 0.8 and b.mode == "row" and b.scaling == "train" for b in blocks)
    assert m.fc.out_features == 100
    for bad in (dict(mode="x"), dict(scaling="x"), dict(schedule="x"), dict(p_last=0),
                dict(num_classes=0)):
        with pytest.raises(ValueError):
            sdkernels.models.cifar_resnet(20, **bad)


def test_trains_a_few_steps():
    torch.manual_seed(0)
    m = sdkernels.models.cifar_resnet(20, p_last=0.5, seed=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    x, t = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
