"""tools/gpu_static_report.py: the gate logic (pure Python) and one quick real compile.

The quick run compiles one config of one variant for sm_90a with Triton's own ptxas: no
GPU needed, but Triton's NVIDIA backend must be installed (skipped otherwise). It runs
in a subprocess with TRITON_INTERPRET removed (the tool compiles, never interprets).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "gpu_static_report.py")


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_static_report", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(**kw):
    r = dict(kernel="k", variant="bf16-aligned", config="M128xN128xK64/w8/s3", num_warps=8,
             arch="sm_90a", registers=128, spill_bytes=0, shared_bytes=98304,
             tensor_core="wgmma", selectable=True, smem_estimate=98304)
    r.update(kw)
    return r


def test_gate_logic():
    t = _tool()
    assert t.gate_failures([_row(), _row(arch="sm_80", tensor_core="mma")]) == []
    bad = t.gate_failures([_row(spill_bytes=24, registers=255)])
    assert len(bad) == 1 and "spills 24 bytes" in bad[0]
    # a config the autotuner cannot pick does not gate
    assert t.gate_failures([_row(spill_bytes=24, selectable=False)]) == []
    assert t.gate_failures([_row(shared_bytes=200000, smem_estimate=None)]) == []  # H100
    bad = t.gate_failures([_row(arch="sm_80", shared_bytes=200000, smem_estimate=None)])
    assert len(bad) == 1 and "166912" in bad[0]
    bad = t.gate_failures([_row(shared_bytes=100000)])  # above the launcher's estimate
    assert len(bad) == 1 and "estimate" in bad[0]
    bad = t.gate_failures([_row(registers=None, spill_bytes=None, error="PTXASError: x")])
    assert len(bad) == 1 and "compile failed" in bad[0]
    # CUDA rows (tools/cuda_ptxas_report.py) have no smem_estimate: limits only
    cuda = _row(kernel="reduce_nchw_kernel", shared_bytes=64)
    del cuda["smem_estimate"]
    assert t.gate_failures([cuda]) == []


def test_parse_ptxas_log_and_tensor_core():
    t = _tool()
    log = ("ptxas info    : Compiling entry function '_conv_fwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _conv_fwd_kernel\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, "
           "512 bytes cmem[0]\n")
    assert t.parse_ptxas_log(log) == dict(registers=255, spill_stores=8, spill_loads=12,
                                          shared_ptxas=1024)
    with pytest.raises(ValueError):
        t.parse_ptxas_log("nothing here")
    assert t.tensor_core_kind("wgmma.mma_async.sync.aligned") == "wgmma"
    assert t.tensor_core_kind("mma.sync.aligned.m16n8k16") == "mma"
    assert t.tensor_core_kind("fma.rn.f32") == "none"


def _has_nvidia_backend():
    try:
        import triton
    except ImportError:
        return False
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(ptxas)


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton's NVIDIA backend (ptxas) missing")
def test_quick_report(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, TOOL, "--quick", "--json", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "triton " in p.stdout and "wall time" in p.stdout
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    r = rows[0]
    t = _tool()
    assert set(t.ROW_KEYS) <= set(r)
    assert r["kernel"] == "_conv_fwd_kernel" and r["arch"] == "sm_90a"
    assert r["spill_bytes"] == 0 and 0 < r["registers"] <= 255
    assert 0 < r["shared_bytes"] <= r["smem_estimate"]
    assert r["variant"].startswith("bf16") and r["num_warps"] >= 4
    assert r["tensor_core"] == "wgmma" and r["ptx_target"] == "sm_90a"
