import os

import pytest
import torch

# Tests build torchvision/timm models with random weights only; make sure nothing ever
# reaches for the Hugging Face hub (CI machines have no network).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Small models on a busy 2-core machine: one torch thread is faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_dynamo(one_thread):
    """torch.compile tests: Dynamo as in a fresh process (caches, counters, compilation
    metrics) before and after the test, which counts what it compiles."""
    import torch._dynamo
    from torch._dynamo.utils import clear_compilation_metrics, counters

    def reset():
        torch._dynamo.reset()
        counters.clear()
        clear_compilation_metrics()
    reset()
    yield
    reset()
