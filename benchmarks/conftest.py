"""Shared settings of the network-level benchmarks.

With timing enabled the suites use the must-show shape (CIFAR ResNet-110, batch 32,
float32). Under ``--benchmark-disable`` (the CI smoke run) they use ResNet-20 and a few
steps, so the run only checks that everything works.

Environment overrides: ``SDKERNELS_BENCH_DEPTH``, ``SDKERNELS_BENCH_ROUNDS`` (timed
rounds of the interleaved comparison), ``SDKERNELS_BENCH_THREADS`` (torch CPU threads),
``SDKERNELS_BENCH_BACKEND`` (force an sdkernels backend: ``extension`` or ``reference``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class NetSettings:
    timing: bool          # False under --benchmark-disable
    depth: int
    batch_size: int
    step_rounds: int      # rounds of each single-variant benchmark
    step_warmup: int
    cmp_rounds: int       # timed rounds of the interleaved comparison
    cmp_warmup: int
    backend: str = "auto"


@pytest.fixture(scope="session")
def net_settings(request) -> NetSettings:
    timing = not request.config.getoption("benchmark_disable", False)
    threads = os.environ.get("SDKERNELS_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    # Denormals make CPU arithmetic slow in data-dependent ways; variants whose weights
    # drift apart must not differ because of that.
    torch.set_flush_denormal(True)
    backend = os.environ.get("SDKERNELS_BENCH_BACKEND", "auto")
    if timing:
        depth = int(os.environ.get("SDKERNELS_BENCH_DEPTH", 110))
        return NetSettings(True, depth, 32, step_rounds=8, step_warmup=2,
                           cmp_rounds=int(os.environ.get("SDKERNELS_BENCH_ROUNDS", 40)),
                           cmp_warmup=2, backend=backend)
    return NetSettings(False, 20, 32, step_rounds=1, step_warmup=0, cmp_rounds=2, cmp_warmup=0,
                       backend=backend)
