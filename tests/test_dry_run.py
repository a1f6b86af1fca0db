"""The dry run of the CUDA code paths (sdkernels.bench.dryrun) and its cost model.

Small and fast (ResNet-20, batch 8): every backend that claims CUDA runs its CUDA branch
on fake CUDA / meta tensors, no step syncs the host, the eval cache saves work, and the
counts and predictions are positive and consistent. The full table (ResNet-110, batch
128, ResNet-50 where torchvision is installed) comes from
``python3 -m sdkernels.bench.dryrun`` (docs/gpu_dry_run.md).
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from sdkernels import backends
from sdkernels.bench import costmodel, dryrun

DEPTH, BATCH = 20, 8
COMBOS = [("channels_last", "bf16"), ("nchw", "fp32")]


def _must_run(backend) -> bool:
    """A backend may be skipped only where it is not installed: triton without the
    triton package, the extension where the build is not required (CI requires it)."""
    if backend == "triton":
        return importlib.util.find_spec("triton") is not None
    if backend == "extension":
        return os.environ.get("SDKERNELS_REQUIRE_EXTENSION") == "1"
    return True


@pytest.fixture(scope="module")
def results():
    base = dryrun.build_model("resnet110", depth=DEPTH)
    out = {}
    for backend in dryrun.BACKENDS:
        for layout, dtype in COMBOS:
            r = dryrun.run_variant("resnet110", backend, layout, dtype, BATCH, depth=DEPTH,
                                   base=base)
            if (r.error or "").startswith("skipped:") and not _must_run(backend):
                continue  # not installed here: nothing to dry-run
            out[backend, layout, dtype] = r
    assert ("reference", "channels_last", "bf16") in out
    return out


def test_every_variant_runs_to_the_end_without_host_syncs(results):
    for key, r in results.items():
        assert r.error is None, (key, r.error)
        assert set(r.steps) == set(dryrun.STEPS), key
        for step, c in r.steps.items():
            assert c["syncs"] == 0, (key, step)
            assert c["launches"] > 0 and c["bytes_read"] > 0 and c["bytes_written"] > 0
            assert c["flops"] > 0, (key, step)
        assert r.syncs == []


def test_each_backend_ran_its_cuda_branch(results):
    for (backend, layout, dtype), r in results.items():
        fams = {step: set(c["by_family"]) for step, c in r.steps.items()}
        if backend == "reference":  # the automatic CUDA choice: the modules, ATen only
            assert all(f == {"aten"} for f in fams.values()), fams
        elif backend == "extension":  # the fused branch (_ResidualBranchFn) and eval path
            for step in dryrun.STEPS:
                assert "sdkernels" in fams[step], (step, fams)
            assert r.steps["train"]["ops"].get("sdkernels::bn_backward_apply", 0) > 0
        else:  # triton: the fused conv in training and eval
            for step in dryrun.STEPS:
                assert "sdkernels_triton" in fams[step], (step, fams)


def test_eval_cache_saves_launches_and_bytes(results):
    for (backend, _, _), r in results.items():
        e1, e2 = r.steps["eval1"], r.steps["eval2"]
        if backend == "reference":  # nothing folded, nothing cached
            assert e2["launches"] == e1["launches"] and e2["bytes"] == e1["bytes"]
        else:
            assert e2["bytes"] < e1["bytes"] and e2["launches"] < e1["launches"]
            assert e2["flops"] == e1["flops"]  # the same convolutions


def test_counts_are_consistent(results):
    for key, r in results.items():
        train = r.steps["train"]
        parts = [r.phases[p] for p in ("forward", "backward", "optimizer")]
        for k in ("launches", "bytes_read", "bytes_written", "syncs"):
            assert sum(p[k] for p in parts) == train[k], (key, k)
        # backward convolutions cost about twice the forward ones
        fwd_flops = r.phases["forward"]["flops"]
        assert 2.5 * fwd_flops < train["flops"] < 3.5 * fwd_flops, key
        assert r.phases["optimizer"]["ops"], key  # SGD ran, as foreach lists
        assert all(n.startswith("aten::_foreach_") for n in r.phases["optimizer"]["ops"])
        if r.tensors == "meta" or key[2] == "fp32":
            # the forward step draws the gates the recorded train step draws
            assert r.steps["forward"]["flops"] == fwd_flops, key
        bf16, fp32 = results[key[0], "channels_last", "bf16"], results[key[0], "nchw", "fp32"]
        assert bf16.steps["eval2"]["bytes"] < fp32.steps["eval2"]["bytes"]


def test_row_mode_copies_gate_indices_without_syncing():
    r = dryrun.run_variant("resnet110", "extension", "channels_last", "fp32", BATCH,
                           depth=DEPTH, mode="row", steps=("train",))
    assert r.error is None, r.error
    train = r.steps["train"]
    assert train["syncs"] == 0
    assert train["h2d"] > 0  # the surviving rows' indices: host->device, not a sync


def test_recorder_flags_a_host_sync():
    rec = dryrun.Recorder()
    x = torch.ones(4, device="meta")
    with pytest.raises(dryrun.DryRunSync, match="_local_scalar_dense"):
        with backends.dry_run_cuda(), rec:
            float(x.sum())
    assert rec.counts().syncs == 1 and rec.syncs


def test_seam_is_off_by_default_and_scoped():
    assert backends.effective_device_type(torch.device("meta")) == "meta"
    with backends.dry_run_cuda():
        assert backends.effective_device_type(torch.device("meta")) == "cuda"
        assert backends.effective_device_type("cpu") == "cpu"
    assert backends.effective_device_type("meta") == "meta"


def test_cost_model_predictions(results):
    r = results.get(("extension", "channels_last", "bf16"),
                    results["reference", "channels_last", "bf16"])
    preds = costmodel.predict_results([r])
    assert set(preds) == {(r.name, s) for s in dryrun.STEPS}
    for (_, step), p in preds.items():
        for chip in ("H100", "H200"):
            assert p[chip]["label"] == "prediction"
            assert p[chip]["ms"] > 0
            assert p[chip]["dominant"] in ("memory", "compute", "launch")
            assert abs(sum(p[chip]["by_bound_ms"].values()) - p[chip]["ms"]) < 1e-9
        assert p["H100"]["ms"] >= p["H200"]["ms"]  # less bandwidth, same compute
        # every launch costs at least the floor
        n = r.steps[step]["launches"]
        assert p["H200"]["ms"] >= n * costmodel.LAUNCH_FLOOR_S * 1e3 - 1e-9


def test_cli_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "dry.json"
    rc = dryrun.main(["--depth", str(DEPTH), "--batch", "4", "--backend", "extension",
                      "--layout", "channels_last", "--dtype", "bf16", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PREDICTIONS" in text and "eval2" in text
    doc = json.loads(out.read_text())
    assert doc["results"][0]["steps"]["train"]["launches"] > 0
    assert doc["predictions"] and all(p["H200"]["label"] == "prediction"
                                      for p in doc["predictions"])


def test_resnet50_without_torchvision_is_skipped_with_a_message():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        res = dryrun.run(models=("resnet50",), batch=2)
        assert len(res) == 1 and res[0].error.startswith("skipped") and "torchvision" in res[0].error
    else:
        pytest.skip("torchvision is installed here: resnet50 runs (covered by the CLI run)")
