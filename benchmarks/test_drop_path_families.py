"""Training step of timm models, sdkernels against the model's own timm DropPath at the
same per-block rates (issue 15, part 4): ViT-Tiny and ConvNeXt-Atto, drop_path_rate 0,
0.05, 0.1, 0.2 and 0.4, sdkernels batch and row mode, each measured ratio beside the
time-weighted prediction (fixed part plus, over the residuals, (1 - d_l) times that
branch's measured time), and the break-even rate.

Must-show, per model and mode: at drop_path_rate 0.05 no slower than timm (break-even at
5% or below); at 0.1, 0.2 and 0.4 within 0.03 of the time-weighted prediction. Every
variant of a model (and the calibration copies) is timed in one process, interleaved
rounds after warm-up, paired medians; see ``sdkernels.bench.droppath`` for the method.

    python -m pytest benchmarks/test_drop_path_families.py --benchmark-only -s  # timing
    python -m pytest benchmarks/ --benchmark-disable -q                          # CI smoke

With timing the run takes about 15-25 minutes on a 2-core CPU (2 torch threads); the
smoke run uses 2-block models on 32x32 images for 2 rounds of 2 steps and checks only that
everything works (1 thread). Environment: ``SDKERNELS_DROPPATH_ROUNDS`` (timed rounds),
``SDKERNELS_BENCH_THREADS`` (torch threads, default 2 when timing),
``SDKERNELS_DROPPATH_OUT`` (directory for the JSON records; default ``bench-out/`` when
timing, a temporary directory in the smoke run). On CPU, glibc's
``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` decide whether steps page-fault
(see benchmarks/RESULTS.md); the table prints faults per step and the record keeps the
settings.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("timm")

from sdkernels.bench.droppath import (DEFAULT_MODELS, PREDICTION_RATES,  # noqa: E402
                                      DropPathConfig, check_targets, format_table, run)
from sdkernels.bench.report import write_json  # noqa: E402

from _common import extra_info  # noqa: E402


def _config(timing: bool, model: str) -> DropPathConfig:
    if timing:
        threads = os.environ.get("SDKERNELS_BENCH_THREADS")
        cfg = DropPathConfig(threads=int(threads) if threads else 2)
        rounds = os.environ.get("SDKERNELS_DROPPATH_ROUNDS")
        if rounds:
            cfg = replace(cfg, rounds=int(rounds))
    else:  # smoke: the numbers mean nothing, every code path runs. One thread: torch's
        # threaded kernels stall badly when another process takes a core of a small CI box.
        cfg = DropPathConfig(depth=2, image_size=32, batch_size=4, rounds=2, steps_per_round=2,
                             warmup=1, num_classes=10, threads=1)
    return replace(cfg, models=(model,))


def _out_dir(timing: bool, tmp_path: Path) -> Path:
    env = os.environ.get("SDKERNELS_DROPPATH_OUT")
    if env:
        return Path(env)
    return Path("bench-out") if timing else tmp_path


def _summary(res: dict) -> dict:
    """The per-rate numbers for pytest-benchmark's extra_info (the JSON has the rest)."""
    return {f"{p['rate']:g}": {"timm_s": p["timm"], "time_s": p["time"], "ratio": p["ratio"],
                               "predicted": p["predicted"], "abs_diff": p["abs_diff"]}
            for p in res["rates"]}


@pytest.mark.slow
@pytest.mark.parametrize("model", DEFAULT_MODELS)
def test_drop_path_vs_timm(benchmark, net_settings, capsys, tmp_path, model):
    timing = net_settings.timing
    cfg = _config(timing, model)
    out = {}
    benchmark.group = "drop-path-vs-timm"
    benchmark.name = model
    benchmark.pedantic(lambda: out.setdefault("rec", run(cfg)), rounds=1, iterations=1,
                       warmup_rounds=0)
    rec = out["rec"]
    res = rec["models"][model]
    env = rec["environment"]
    benchmark.extra_info.update(extra_info(
        cfg.device, dtype=cfg.dtype, shape=[cfg.batch_size, 3, cfg.image_size, cfg.image_size],
        timm=env["timm"], sdkernels=env["sdkernels"], timm_kwargs=res["timm_kwargs"],
        rounds=cfg.rounds, steps_per_round=cfg.steps_per_round,
        rates=_summary(res), break_even=res["break_even"], targets=rec["targets"]))
    path = write_json(rec, _out_dir(timing, tmp_path) / f"drop_path_{model}.json")
    note = "" if timing else "\n(smoke run: tiny models, the numbers mean nothing; not asserted)"
    with capsys.disabled():  # the table is the point of this benchmark: show it without -s
        print("\n" + format_table(rec) + f"\nresult: {path}{note}")

    # the record is complete and readable, whatever the timing mode
    assert json.loads(path.read_text())["models"][model]["rates"]
    assert [p["rate"] for p in res["rates"]] == list(cfg.rates)
    assert all(math.isfinite(v["final_loss"]) for v in res["variants"].values())
    for p in res["rates"]:
        for m in cfg.modes:
            assert math.isfinite(p["ratio"][m]) and p["ratio"][m] > 0, p
            assert p["predicted_drawn"][m] is not None, p
        assert math.isfinite(p["predicted"]), p
    n_checks = len(cfg.modes) * (1 + len(PREDICTION_RATES))  # every target was checked
    assert len(rec["targets"]) == len(check_targets(rec)) == n_checks
    if not timing:
        return  # smoke run (--benchmark-disable): tiny settings, the numbers mean nothing
    failed = [t for t in rec["targets"] if not t["ok"]]
    assert not failed, "must-show targets missed:\n" + "\n".join(
        f"  {t['model']} {t['mode']} at drop_path_rate {t['rate']:g}: {t['what']} "
        f"(got {t['value']:.3f})" for t in failed)


@pytest.mark.slow
def test_row_scaling_tool(benchmark, net_settings, capsys):
    """``python -m sdkernels.bench.rowscaling``: a row step with every residual keeping
    exactly k rows, against the linear prediction and against the same residuals run on a
    batch of k samples (the ideal row step). No target: it is the diagnostic behind
    the row-mode gap in benchmarks/RESULTS.md; this checks it runs and measures what it
    says (every residual of a k=K variant kept K rows)."""
    from sdkernels.bench.rowscaling import format_record, measure
    timing = net_settings.timing
    if timing:
        threads = os.environ.get("SDKERNELS_BENCH_THREADS")
        kw = {"rounds": 8, "threads": int(threads) if threads else 2}
        keeps = [29, 24, 16]
    else:
        kw = {"rounds": 1, "depth": 1, "image_size": 32, "batch": 8, "threads": 1}
        keeps = [6, 3]
    out = {}
    benchmark.group = "row-scaling"
    benchmark.name = "vit_tiny_patch16_224"
    benchmark.pedantic(lambda: out.setdefault(
        "rec", measure("vit_tiny_patch16_224", keeps, profile=True, **kw)),
        rounds=1, iterations=1, warmup_rounds=0)
    rec = out["rec"]
    benchmark.extra_info.update(extra_info(
        "cpu", dtype="float32", shape=[rec["batch"], 3, rec["image_size"], rec["image_size"]],
        rows=rec["rows"], all_ms=rec["all_ms"], none_ms=rec["none_ms"]))
    with capsys.disabled():
        print("\n" + format_record(rec))
    assert rec["kept"]["all"] == {rec["batch"]} and rec["kept"]["none"] == {0}
    for k in keeps:
        assert rec["kept"][f"k={k}"] == {k}
    for row in rec["rows"]:
        assert math.isfinite(row["over_linear"]) and row["ms"] > 0
        # the split of the gap: every residual on all rows of a batch of k samples, and
        # on none, timed beside it
        k = row["keep"]
        assert rec["kept"][f"all@{k}"] == {k} and rec["kept"][f"none@{k}"] == {0}
        assert math.isfinite(row["ideal_over_linear"]) and row["ideal_ms"] > 0
    assert set(rec["profile"]) == {"all", "none", *keeps}
