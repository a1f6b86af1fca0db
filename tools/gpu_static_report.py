#!/usr/bin/env python3
"""Static GPU resource report for sdkernels' Triton kernels, without a GPU.

Compiles every Triton kernel of the package (today ``_conv_fwd_kernel`` of
``sdkernels/ops/triton/conv.py``) for every autotune config of the GPU list and every
variant the launcher compiles (``conv.aot_variants()``: dtype/dot precision x PROLOGUE x
alignment specialization; geometry and the epilogue flags are runtime arguments of the
kernel, so one compiled variant covers all of them), for each ``--arch``. It never
launches anything: ``triton.compile`` on a ``GPUTarget`` runs Triton's front end, LLVM and
Triton's own ``ptxas`` (with the flags Triton uses for the real cubin); the ``ptxas -v``
log of that run gives registers and spill bytes.

Columns: registers; spill_bytes = spill stores + spill loads (ptxas); shared_bytes =
max(Triton's ``metadata.shared``, ptxas's static smem): Triton allocates its pipeline
buffers and layout-conversion scratch as dynamic shared memory, which ptxas does not see,
so in practice the figure is Triton's; tensor_core: "wgmma" if the PTX has wgmma, "mma"
for mma.sync, else "none"; selectable: whether the autotuner can pick the config on that
arch (conv.config_selectable: the launcher's own shared-memory estimate against the
arch's opt-in limit, and dtype exclusions).

Gate (exit status 1): a selectable row that spills, needs more shared memory than the
arch has, needs more than the launcher's estimate (the pruning would then be wrong), or
failed to compile. CUDA kernels: rows from tools/cuda_ptxas_report.py's
``cuda_rows(archs)`` when that file exists (gated the same way), else none (said so).

Usage: tools/gpu_static_report.py [--arch sm_90a --arch sm_80] [--json FILE] [--quick]
       [--jobs 2] [--variant SUBSTR] [--config INDEX]
Run with TRITON_INTERPRET unset (the tool removes it: kernels must be compiled ones).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")

#: Opt-in shared memory per block (bytes) and compute capability of each arch.
ARCHS = {
    "sm_90a": (90, 232448),   # H100: 227 KiB
    "sm_90": (90, 232448),
    "sm_80": (80, 166912),    # A100: 163 KiB
    "sm_86": (86, 101376),    # 99 KiB
    "sm_89": (89, 101376),
}
ROW_KEYS = ("kernel", "variant", "config", "num_warps", "arch", "registers", "spill_bytes",
            "shared_bytes", "tensor_core", "selectable")


def _setup_env():
    # compiled kernels, not interpreted ones; and a fresh Triton cache, so that every
    # compile really runs (and ptxas prints its log)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default, no warning
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def _conv():
    from sdkernels.ops.triton import conv
    return conv


def kernels():
    """(kernel name, module, list of configs) for every Triton kernel the report covers."""
    conv = _conv()
    return [("_conv_fwd_kernel", conv, conv._GPU_CONFIGS)]


def config_name(cfg) -> str:
    kw = cfg.kwargs
    return (f"M{kw['BLOCK_M']}xN{kw['BLOCK_N']}xK{kw['BLOCK_K']}"
            f"/w{cfg.num_warps}/s{cfg.num_stages}")


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict:
    regs = _PTXAS_REGS.findall(log)
    spills = _PTXAS_SPILL.findall(log)
    smem = _PTXAS_SMEM.findall(log)
    if not regs or not spills:
        raise ValueError(f"no register/spill figures in the ptxas log:\n{log}")
    return dict(registers=max(int(r) for r in regs),
                spill_stores=max(int(s) for s, _ in spills),
                spill_loads=max(int(l_) for _, l_ in spills),
                shared_ptxas=max((int(s) for s in smem), default=0))


def tensor_core_kind(ptx: str) -> str:
    if "wgmma" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


def _ptxas_by_hand(ptx: str, arch: str) -> str:
    """Fallback when Triton does not print its ptxas log: Triton's ptxas on the PTX."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.ptx")
        with open(f, "w") as fh:
            fh.write(ptx)
        r = subprocess.run([ptxas, "-lineinfo", "-v", f"-arch={arch}", f, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr}")
    return r.stderr + r.stdout


def compile_one(job):
    """Compile one (kernel, variant, config, arch); returns a row (never raises)."""
    kname, vi, ci, arch = job
    _setup_env()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    (_, mod, configs), = [k for k in kernels() if k[0] == kname]
    variant = mod.aot_variants()[vi]
    cfg = configs[ci]
    cap, limit = ARCHS[arch]
    fn = getattr(mod, kname)
    row = dict(kernel=kname, variant=variant["name"], config=config_name(cfg),
               num_warps=cfg.num_warps, num_stages=cfg.num_stages, arch=arch,
               selectable=bool(mod.config_selectable(cfg, variant["elsize"],
                                                     variant["dot_precision"], limit,
                                                     variant.get("aligned", True))),
               smem_estimate=mod.smem_estimate(cfg, variant["elsize"]),
               triton_version=triton.__version__)
    constexprs = dict(variant["constexprs"], **cfg.kwargs)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
             for a in variant["divisible_by_16"]}
    t0 = time.perf_counter()
    try:
        from triton import knobs
        knobs.nvidia.dump_ptxas_log = True
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            k = triton.compile(ASTSource(fn, variant["signature"], constexprs, attrs),
                               target=GPUTarget("cuda", cap, 32),
                               options=dict(num_warps=cfg.num_warps,
                                            num_stages=cfg.num_stages))
        ptx = k.asm["ptx"]
        log = out.getvalue()
        if not _PTXAS_REGS.search(log):
            log = _ptxas_by_hand(ptx, arch)
        p = parse_ptxas_log(log)
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
        row.update(registers=p["registers"], spill_stores=p["spill_stores"],
                   spill_loads=p["spill_loads"],
                   spill_bytes=p["spill_stores"] + p["spill_loads"],
                   shared_triton=int(k.metadata.shared), shared_ptxas=p["shared_ptxas"],
                   shared_bytes=max(int(k.metadata.shared), p["shared_ptxas"]),
                   tensor_core=tensor_core_kind(ptx),
                   ptx_target=target.group(1) if target else "?")
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the report
        row.update(registers=None, spill_bytes=None, shared_bytes=None, tensor_core=None,
                   error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def gate_failures(rows) -> list[str]:
    """Why the report fails: selectable rows that spill, exceed the arch's shared memory
    or the launcher's estimate, or did not compile. Non-selectable rows never gate."""
    bad = []
    for r in rows:
        if not r.get("selectable"):
            continue
        tag = f"{r['kernel']} {r['variant']} {r['config']} {r['arch']}"
        if r.get("error") or r.get("registers") is None:
            bad.append(f"{tag}: compile failed: {r.get('error')}")
            continue
        if r["spill_bytes"] > 0:
            bad.append(f"{tag}: spills {r['spill_bytes']} bytes ({r['registers']} registers)")
        limit = ARCHS.get(r["arch"], (0, None))[1]
        if limit is not None and r["shared_bytes"] > limit:
            bad.append(f"{tag}: {r['shared_bytes']} bytes shared memory > {limit} on {r['arch']}")
        est = r.get("smem_estimate")
        if est is not None and r["shared_bytes"] > est:
            bad.append(f"{tag}: {r['shared_bytes']} bytes shared memory > the launcher's "
                       f"estimate {est} (its pruning would pick configs that do not fit)")
    return bad


def cuda_rows(archs):
    """Rows for the CUDA kernels from tools/cuda_ptxas_report.py, or (None, why)."""
    path = os.path.join(TOOLS, "cuda_ptxas_report.py")
    if not os.path.exists(path):
        return None, "tools/cuda_ptxas_report.py not found: no CUDA kernel rows"
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    try:
        import cuda_ptxas_report
        return list(cuda_ptxas_report.cuda_rows(list(archs))), None
    except Exception as e:  # noqa: BLE001
        return None, f"tools/cuda_ptxas_report.py failed: {type(e).__name__}: {e}"


def format_table(rows) -> str:
    cols = ["kernel", "variant", "config", "arch", "registers", "spill_bytes", "shared_bytes",
            "tensor_core", "selectable"]
    heads = {"registers": "regs", "spill_bytes": "spill", "shared_bytes": "smem",
             "tensor_core": "tc", "selectable": "sel"}

    def cell(r, c):
        v = r.get(c)
        return ("yes" if v else "no") if c == "selectable" else ("-" if v is None else str(v))
    width = {c: max([len(heads.get(c, c))] + [len(cell(r, c)) for r in rows]) for c in cols}
    lines = ["  ".join(heads.get(c, c).ljust(width[c]) for c in cols)]
    for r in rows:
        line = "  ".join(cell(r, c).ljust(width[c]) for c in cols)
        if r.get("error"):
            line += "  ERROR " + r["error"]
        lines.append(line)
    return "\n".join(lines)


def summary(rows) -> list[str]:
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        rs = [r for r in rows if r["arch"] == arch and r.get("registers") is not None]
        sel = [r for r in rs if r.get("selectable")]
        lowp4 = [r for r in rs if r["variant"].startswith(("bf16", "fp16"))
                 and r["num_warps"] >= 4 and r["kernel"] == "_conv_fwd_kernel"]
        n_err = sum(1 for r in rows if r["arch"] == arch and r.get("error"))
        if not rs:
            out.append(f"{arch}: no compiled rows ({n_err} failed)")
            continue
        out.append(
            f"{arch}: {len(rs)} compiled rows ({len(sel)} selectable, {n_err} failed, "
            f"{sum(1 for r in rows if r['arch'] == arch and r.get('skipped'))} not "
            f"selectable and not compiled), "
            f"spilling rows {sum(r['spill_bytes'] > 0 for r in rs)} "
            f"(selectable {sum(r['spill_bytes'] > 0 for r in sel)}), "
            f"max registers {max(r['registers'] for r in rs)}, "
            f"max shared {max(r['shared_bytes'] for r in rs)} B "
            f"(selectable {max((r['shared_bytes'] for r in sel), default=0)} B), "
            f"bf16/fp16 rows with >= 4 warps: {len(lowp4)}, of them "
            f"{sum(r['tensor_core'] == 'wgmma' for r in lowp4)} wgmma, "
            f"{sum(r['tensor_core'] == 'mma' for r in lowp4)} mma.sync")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS),
                    help="target (repeatable; default sm_90a and sm_80)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--quick", action="store_true",
                    help="one config, one variant, one arch, no CUDA rows (CI smoke test)")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--variant", help="only variants whose name contains this")
    ap.add_argument("--config", type=int, action="append", help="only this config index")
    ap.add_argument("--all", action="store_true",
                    help="also compile rows the autotuner cannot select on their arch")
    ap.add_argument("--quiet", action="store_true", help="no per-compile progress lines")
    ap.add_argument("--no-cuda", action="store_true",
                    help="no CUDA kernel rows (implied by --quick)")
    args = ap.parse_args(argv)
    archs = args.arch or (["sm_90a"] if args.quick else ["sm_90a", "sm_80"])
    if args.quick:
        archs = archs[:1]
    _setup_env()
    t0 = time.perf_counter()
    import triton

    cache = tempfile.mkdtemp(prefix="sdk-static-report-")
    os.environ["TRITON_CACHE_DIR"] = cache  # nothing cached between runs
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}); "
          f"archs {', '.join(archs)}")
    jobs, skipped = [], []
    for kname, mod, configs in kernels():
        variants = mod.aot_variants()
        vidx = [i for i, v in enumerate(variants)
                if args.variant is None or args.variant in v["name"]]
        cidx = args.config if args.config else list(range(len(configs)))
        if args.quick:
            vidx, cidx = vidx[:1], cidx[:1]
        for ci in cidx:          # config-major: an interrupted run has whole configs
            for vi in vidx:
                for arch in archs:
                    v = variants[vi]
                    if args.all or mod.config_selectable(configs[ci], v["elsize"],
                                                         v["dot_precision"], ARCHS[arch][1],
                                                         v.get("aligned", True)):
                        jobs.append((kname, vi, ci, arch))
                    else:
                        skipped.append(dict(
                            kernel=kname, variant=v["name"], config=config_name(configs[ci]),
                            num_warps=configs[ci].num_warps, arch=arch, registers=None,
                            spill_bytes=None, shared_bytes=None, tensor_core=None,
                            selectable=False, skipped="not selectable: not compiled"))

    print(f"{len(jobs)} compiles, {len(skipped)} rows not selectable on their arch "
          f"(not compiled; --all compiles them too)", flush=True)
    rows = []

    def progress(r):
        rows.append(r)
        if not args.quiet:
            print(f"[{len(rows)}/{len(jobs)}] " + json.dumps(
                {k: r.get(k) for k in ROW_KEYS[1:] + ("compile_s", "error")}),
                file=sys.stderr, flush=True)
    try:
        if args.jobs <= 1:
            for j in jobs:
                progress(compile_one(j))
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as ex:
                for fut in [ex.submit(compile_one, j) for j in jobs]:
                    progress(fut.result())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    rows += skipped
    if args.quick or args.no_cuda:
        crow, why = None, "CUDA kernel rows not requested (--quick / --no-cuda)"
    else:
        crow, why = cuda_rows(archs)
    if crow is None:
        print(why)
    else:
        for r in crow:
            r.setdefault("selectable", True)
        rows += crow
        print(f"CUDA kernel rows from tools/cuda_ptxas_report.py: {len(crow)}")
    wall = time.perf_counter() - t0
    print(format_table(rows))
    print()
    for line in summary(rows):
        print(line)
    print(f"{len(rows)} rows; wall time {wall:.1f} s with {args.jobs} compile processes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = gate_failures(rows)
    if bad:
        print(f"GATE FAILED ({len(bad)}):")
        for b in bad:
            print("  " + b)
        return 1
    print("gate passed: no selectable row spills or exceeds shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
