import numpy as np
import pytest
import torch

import sdkernels
from sdkernels.schedule import check_prob


def test_linear_schedule_matches_paper():
    probs = sdkernels.survival_probs(54, p_last=0.5)
    assert probs[0] == pytest.approx(1 - 0.5 / 54)
    assert probs[-1] == pytest.approx(0.5)
    assert sdkernels.expected_depth(probs) == pytest.approx(40.25)


def test_uniform_and_explicit():
    assert sdkernels.survival_probs(3, 0.8, "uniform") == [0.8, 0.8, 0.8]
    assert sdkernels.survival_probs(2, schedule=(1.0, 0.5)) == [1.0, 0.5]
    assert sdkernels.survival_probs(4, 1.0) == [1.0] * 4


def test_expected_work():
    assert sdkernels.expected_work([1.0, 0.5], [2.0, 4.0], fixed=1.0) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        sdkernels.expected_work([1.0, 0.5], [1.0])


@pytest.mark.parametrize("kwargs, err", [
    (dict(num_blocks=0), ValueError), (dict(num_blocks=3, p_last=0.0), ValueError),
    (dict(num_blocks=3, p_last=1.2), ValueError), (dict(num_blocks=3, p_last=float("nan")), ValueError),
    (dict(num_blocks=3, schedule="cosine"), ValueError), (dict(num_blocks=2, schedule=[0.5]), ValueError),
    (dict(num_blocks=2, schedule=[0.5, 0.0]), ValueError), (dict(num_blocks=3, p_last="x"), TypeError),
    (dict(num_blocks=2.0), ValueError),
])
def test_bad_input(kwargs, err):
    with pytest.raises(err):
        sdkernels.survival_probs(**kwargs)


@pytest.mark.parametrize("bad", ["0.5", True, False, None, [0.5], torch.tensor([0.5, 0.2]),
                                 torch.tensor(True), 0.5 + 0j])
def test_check_prob_accepts_only_real_numbers(bad):
    # '0.5' and True used to pass as 0.5 and 1.0
    with pytest.raises(TypeError, match=r"real number in \(0, 1\]"):
        check_prob(bad)
    with pytest.raises(TypeError):
        sdkernels.BasicBlock(4, 4, survival_prob=bad)


@pytest.mark.parametrize("good, want", [(0.5, 0.5), (1, 1.0), (np.float32(0.25), 0.25),
                                        (np.int64(1), 1.0), (torch.tensor(0.5), 0.5)])
def test_check_prob_real_numbers(good, want):
    assert check_prob(good) == want
