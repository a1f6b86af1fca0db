"""The ResNet-110 training step of ``tools/gpu_check.sh``, per variant, interleaved.

``python -m sdkernels.bench.gpu_step OUT.json [--dry-run]``: constant depth, naive
mask-multiply, and sdkernels on the module path (the CUDA default), the extension and
Triton; bf16 (autocast), channels_last, batch 128; CUDA-event timing after warm-up
(which also autotunes Triton), medians over interleaved rounds (``GPU_CHECK_ROUNDS``,
default 20). ``--dry-run``: the same Python on meta tensors inside the testing seam
(``backends.dry_run_cuda``), float32 (autocast has no meta kernels), one round, no
timing, so that a typo cannot waste a GPU run.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import sys

import torch

from .. import backends
from . import build_variants, interleaved_timing, make_inputs, make_train_step, summarize
from .env import environment


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") or argv[1:] not in ([], ["--dry-run"]):
        print("usage: python -m sdkernels.bench.gpu_step OUT.json [--dry-run]", file=sys.stderr)
        return 2
    path, dry = argv[0], argv[1:] == ["--dry-run"]

    depth, batch = 110, 128
    rounds = 1 if dry else int(os.environ.get("GPU_CHECK_ROUNDS", "20"))
    warmup = 0 if dry else 3
    # dry: meta tensors inside the testing seam stand for CUDA (no autocast on meta: fp32)
    dev = torch.device("meta" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    seam = backends.dry_run_cuda() if dry else contextlib.nullcontext()
    with seam:
        bm = build_variants(depth, p_last=0.5, schedule="linear", mode="batch", seed=0,
                            device=dev, variants=("constant", "naive", "sdkernels"))
        models = {"constant": bm.models["constant"], "naive": bm.models["naive"]}
        for b in ("reference", "extension", "triton"):
            models[f"sdkernels[{b}]"] = copy.deepcopy(bm.models["sdkernels"])
        for m in models.values():
            m.to(memory_format=torch.channels_last)

        def forced(name, step):
            b = name[len("sdkernels["):-1] if name.startswith("sdkernels[") else None
            if b in (None, "reference"):  # the CUDA default is the module path
                return step
            def run(x, y):
                with backends.use_backend(b):
                    return step(x, y)
            return run

        steps = {n: forced(n, make_train_step(m, dtype=dtype)) for n, m in models.items()}
        inputs = [(x.contiguous(memory_format=torch.channels_last), y)
                  for x, y in make_inputs(batch, num_sets=4, device=dev, seed=0)]
        times = interleaved_timing(steps, inputs, rounds=rounds, warmup=warmup, device=dev)
    env = environment(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    res = {"dry_run": dry, "depth": depth, "batch": batch, "dtype": str(dtype),
           "layout": "channels_last", "p_last": 0.5, "rounds": rounds, "warmup": warmup,
           "environment": env, "timing": "none (dry run)" if dry else "CUDA events, median",
           "variants": {n: summarize(t) for n, t in times.items()}}
    if not dry:
        base = res["variants"]["constant"]["median"]
        for n, s in res["variants"].items():
            s["ratio_to_constant"] = s["median"] / base
    with open(path, "w") as f:
        json.dump(res, f, indent=1, default=str)
    for n, s in res["variants"].items():
        if dry:
            print(f"{n:<22} ran (dry run on meta tensors: no GPU time)")
        else:
            print(f"{n:<22} median {s['median'] * 1e3:9.3f} ms  "
                  f"({s['ratio_to_constant']:.3f}x constant)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
