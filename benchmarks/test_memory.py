"""Memory per training step: bytes saved for backward (any device; unique storages via
``saved_tensors_hooks``, parameters excluded) and peak CUDA memory (CUDA only), for
constant depth, the naive baseline and sdkernels. The measurement is recorded in
``extra_info`` (and printed); the timed part is the measured step itself.
"""
from __future__ import annotations

import pytest

from sdkernels.bench import build_variants, make_inputs
from sdkernels.bench.memory import training_step_memory

from _common import device, extra_info

RESULTS: dict = {}


@pytest.mark.parametrize("p_last", [1.0, 0.5])
@pytest.mark.parametrize("variant", ["constant", "naive", "sdkernels"])
def test_step_memory(benchmark, net_settings, variant, p_last, capsys):
    s = net_settings
    if variant == "constant" and p_last != 1.0:
        pytest.skip("constant depth has no p_last")
    d = s.depth if s.timing else 20
    dev = device()
    bm = build_variants(d, p_last=p_last, seed=0, device=dev, variants=(variant,))
    model = bm.models[variant]
    x, y = make_inputs(s.batch_size, device=dev, num_sets=1)[0]
    samples = []
    benchmark.group = f"resnet{d}-memory-b{s.batch_size}"
    benchmark.name = f"{variant}[p_last={p_last}]"
    benchmark.pedantic(lambda: samples.append(training_step_memory(model, x, y)),
                       rounds=max(1, min(5, s.step_rounds)), iterations=1, warmup_rounds=0)
    saved = sorted(m["saved_bytes"] for m in samples)
    rec = dict(samples[-1], saved_bytes_median=saved[len(saved) // 2], depth=d)
    benchmark.extra_info.update(extra_info(dev, dtype="float32", variant=variant,
                                           p_last=p_last, shape=[s.batch_size, 3, 32, 32], **rec))
    RESULTS[(variant, p_last)] = rec
    assert rec["saved_bytes"] > 0
    with capsys.disabled():
        peak = rec.get("cuda_peak_bytes")
        print(f"\n  resnet{d} {variant:<9} p_last={p_last}: saved for backward "
              f"{rec['saved_bytes_median'] / 2**20:8.1f} MiB"
              + (f", CUDA peak {peak / 2**20:8.1f} MiB" if peak is not None else ""))
