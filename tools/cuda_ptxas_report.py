"""Static resource report of the CUDA kernels of csrc/cuda (no GPU needed).

Compiles every ``csrc/cuda/*.cu`` with the nvcc flags and include dirs of
``csrc/build.json`` (the one build description) plus ``-Xptxas -v``, once per requested
architecture, and parses ptxas' report per kernel instantiation: registers, spill bytes
(spill stores + spill loads), static shared memory. Launch bounds (``.maxntid`` in the
PTX, kept with ``-keep``) give the warps per block; tensor-core use is read from the SASS
(``cuobjdump -sass``: HMMA / HGMMA / IMMA / ...) when cuobjdump is found, else from the
PTX (``mma`` / ``wgmma``). Names are demangled with ``cu++filt`` or ``c++filt`` when
available. Nothing is cached: every call compiles afresh in a temporary directory.

Library use (tools/gpu_static_report.py gates on spills and shared memory)::

    from tools.cuda_ptxas_report import cuda_rows
    rows = cuda_rows(["sm_80", "sm_90a"])

Each row: ``kernel`` (demangled function name without namespaces; the driver kernels of
channel_kernels.cuh carry their Op, e.g. ``reduce_cl_kernel<StatsOp>``), ``variant``
(the full template argument list), ``config`` ("-"), ``num_warps`` (from launch bounds,
else None), ``arch``, ``registers``, ``spill_bytes``, ``shared_bytes``, ``tensor_core``
("none", or the tensor-core instruction families found), ``selectable`` (True).

CLI::

    python3 tools/cuda_ptxas_report.py                  # sm_80 and sm_90a
    python3 tools/cuda_ptxas_report.py sm_90a --json    # rows as JSON
    python3 tools/cuda_ptxas_report.py --check          # exit 1 if any kernel spills

Architectures: "sm_90a" -> ``-gencode=arch=compute_90a,code=sm_90a``, "sm_80" ->
compute_80 / sm_80; "90", "9.0" and "compute_90" are accepted as well. The nvcc binary
is $NVCC, $CUDA_HOME/bin/nvcc, nvcc on PATH or /usr/local/cuda/bin/nvcc.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_JSON = ROOT / "csrc" / "build.json"
CUDA_DIR = ROOT / "csrc" / "cuda"
DEFAULT_ARCHS = ["sm_80", "sm_90a"]

__all__ = ["cuda_rows", "find_nvcc", "arch_gencode", "DEFAULT_ARCHS"]


# ---------------------------------------------------------------------------------------
# Tools.

def find_nvcc() -> str | None:
    """nvcc from $NVCC, $CUDA_HOME/bin, PATH or /usr/local/cuda/bin (None if absent)."""
    cands = [os.environ.get("NVCC")]
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        cands.append(os.path.join(home, "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _find_tool(name: str, nvcc: str | None) -> str | None:
    """A CUDA binutil (cuobjdump, cu++filt): PATH, next to nvcc, $CUDA_HOME/bin, then the
    copy Triton bundles (found without importing triton)."""
    dirs = []
    if nvcc:
        dirs.append(os.path.dirname(os.path.realpath(nvcc)))
        dirs.append(os.path.dirname(nvcc))
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        dirs.append(os.path.join(home, "bin"))
    found = shutil.which(name)
    if found:
        return found
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        p = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def arch_gencode(arch: str) -> tuple[str, str]:
    """("sm_90a", "-gencode=arch=compute_90a,code=sm_90a") for "sm_90a", "90a", "9.0",
    "compute_90a"; raises ValueError otherwise."""
    a = arch.strip().lower()
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)", a)
    if not m:
        raise ValueError(f"cuda_ptxas_report: bad architecture {arch!r} (e.g. sm_80, sm_90a)")
    num = m.group(1) + (m.group(2) or "") + m.group(3)
    return f"sm_{num}", f"-gencode=arch=compute_{num},code=sm_{num}"


def _build_flags() -> tuple[list[str], list[str]]:
    desc = json.loads(BUILD_JSON.read_text())
    flags = list(desc["nvcc_flags"])
    incs = ["-I" + str(ROOT / d) for d in desc.get("include_dirs", [])]
    return flags, incs


# ---------------------------------------------------------------------------------------
# Parsing.

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _parse_ptxas(text: str) -> dict[str, dict]:
    """mangled name -> {registers, spill_bytes, shared_bytes, stack_bytes}."""
    out: dict[str, dict] = {}
    cur = None
    props_for = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = m.group(1)
            out[cur] = {"registers": None, "spill_bytes": 0, "shared_bytes": 0,
                        "stack_bytes": 0}
            props_for = None
            continue
        m = _PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _SPILL.search(line)
        if m and cur is not None and props_for == cur:
            out[cur]["stack_bytes"] = int(m.group(1))
            out[cur]["spill_bytes"] = int(m.group(2)) + int(m.group(3))
            continue
        m = _USED.search(line)
        if m and cur is not None:
            out[cur]["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            out[cur]["shared_bytes"] = int(s.group(1)) if s else 0
    return out


def _ptx_entries(ptx: str) -> dict[str, dict]:
    """mangled name -> {num_warps (from .maxntid / .reqntid or None), ptx_tc}."""
    out = {}
    parts = re.split(r"\.entry\s+", ptx)[1:]
    for part in parts:
        name = part.split("(", 1)[0].strip()
        brace = part.find("\n{")
        head = part if brace < 0 else part[:brace]
        body = part if brace < 0 else part[brace:]
        warps = None
        m = re.search(r"\.(?:maxntid|reqntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", head)
        if m:
            threads = 1
            for g in m.groups():
                if g:
                    threads *= int(g)
            warps = max(1, threads // 32)
        tc = []
        if re.search(r"\bwgmma\.", body):
            tc.append("wgmma")
        if re.search(r"\bmma\.sync\b|\bmma\.sp", body):
            tc.append("mma")
        out[name] = {"num_warps": warps, "ptx_tc": "+".join(tc) if tc else "none"}
    return out


_SASS_TC = ("HGMMA", "IGMMA", "QGMMA", "BGMMA", "HMMA", "IMMA", "DMMA", "BMMA", "UTCHMMA",
            "UTCQMMA", "UTCIMMA", "UTCOMMA")


def _sass_tensor_cores(sass: str) -> dict[str, str]:
    """mangled name -> "none" or the tensor-core SASS opcodes found (e.g. "HMMA")."""
    out = {}
    cur = None
    found: set[str] = set()
    pat = re.compile(r"\b(" + "|".join(_SASS_TC) + r")\.")
    for line in sass.splitlines():
        m = re.search(r"Function\s*:\s*(\S+)", line)
        if m:
            if cur is not None:
                out[cur] = "+".join(sorted(found)) if found else "none"
            cur, found = m.group(1), set()
            continue
        if cur is not None:
            for op in pat.findall(line):
                found.add(op)
    if cur is not None:
        out[cur] = "+".join(sorted(found)) if found else "none"
    return out


def _demangle(names: list[str], nvcc: str | None) -> dict[str, str]:
    tool = _find_tool("cu++filt", nvcc) or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True,
                              text=True, timeout=60, check=True)
        lines = proc.stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    if len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines))


_NS = re.compile(r"(?:\b(?:sdkernels|cuda|detail)::|\(anonymous namespace\)::)")


def _split_top(args: str) -> list[str]:
    """Splits a template argument list at top-level commas."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(args):
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(args[start:i].strip())
            start = i + 1
    out.append(args[start:].strip())
    return [a for a in out if a]


def _shorten(demangled: str) -> tuple[str, str]:
    """(kernel, variant) of a demangled kernel signature."""
    s = demangled.strip()
    if s.startswith("_Z"):  # not demangled
        return s, "-"
    if s.startswith("void "):
        s = s[5:]
    # drop the parameter list: the last top-level "(...)"
    depth = 0
    for i in range(len(s) - 1, -1, -1):
        if s[i] == ")":
            depth += 1
        elif s[i] == "(":
            depth -= 1
            if depth == 0:
                # "(anonymous namespace)" is not a parameter list
                if not s[i:].startswith("(anonymous namespace)"):
                    s = s[:i]
                break
    s = _NS.sub("", s).strip()
    lt = s.find("<")
    if lt < 0:
        return s, "-"
    name, args = s[:lt], s[lt + 1:s.rfind(">")]
    parts = _split_top(args)
    kernel = name
    if parts:
        first = parts[0]
        m = re.match(r"([A-Za-z_]\w*)", first)
        builtin = {"float", "double", "int", "unsigned", "long", "short", "char", "bool",
                   "__half", "__nv_bfloat16", "signed"}
        if m and m.group(1) not in builtin and (first.endswith(">") or "::" not in first):
            if m.group(1)[0].isupper():  # an Op / Fin struct of channel_kernels.cuh
                kernel = f"{name}<{m.group(1)}>"
    return kernel, ", ".join(parts)


# ---------------------------------------------------------------------------------------
# Compilation.

def _compile(nvcc: str, cu: Path, sm: str, gencode: str, flags: list[str], incs: list[str],
             cuobjdump: str | None) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="sdk_ptxas_") as tmp:
        cubin = os.path.join(tmp, cu.stem + ".cubin")
        cmd = [nvcc, *flags, *incs, "-Xptxas", "-v", gencode, "-cubin", "-keep",
               "-keep-dir", tmp, str(cu), "-o", cubin]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
        if proc.returncode != 0:
            raise RuntimeError(f"cuda_ptxas_report: nvcc failed for {cu.name} ({sm}):\n"
                               + (proc.stderr or proc.stdout)[-4000:])
        stats = _parse_ptxas(proc.stderr + "\n" + proc.stdout)
        ptx_info: dict[str, dict] = {}
        for p in Path(tmp).glob("*.ptx"):
            ptx_info.update(_ptx_entries(p.read_text(errors="replace")))
        sass_tc: dict[str, str] | None = None
        if cuobjdump:
            sp = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
            if sp.returncode == 0 and "Function" in sp.stdout:
                sass_tc = _sass_tensor_cores(sp.stdout)
    rows = []
    for mangled, st in stats.items():
        info = ptx_info.get(mangled, {})
        if sass_tc is not None and mangled in sass_tc:
            tc = sass_tc[mangled]
        else:
            tc = info.get("ptx_tc", "none")
        rows.append({"_mangled": mangled, "_source": cu.name, "arch": sm,
                     "registers": st["registers"], "spill_bytes": st["spill_bytes"],
                     "shared_bytes": st["shared_bytes"], "num_warps": info.get("num_warps"),
                     "tensor_core": tc})
    return rows


def cuda_rows(archs: list[str]) -> list[dict]:
    """One row per kernel instantiation of csrc/cuda/*.cu per architecture (see the
    module docstring). Raises FileNotFoundError without nvcc, RuntimeError when a
    compile fails, ValueError for a bad architecture name."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("cuda_ptxas_report: nvcc not found (set NVCC or CUDA_HOME, "
                                "or put nvcc on PATH)")
    targets = [arch_gencode(a) for a in archs]
    flags, incs = _build_flags()
    sources = sorted(CUDA_DIR.glob("*.cu"))
    cuobjdump = _find_tool("cuobjdump", nvcc)
    jobs = [(cu, sm, gc) for cu in sources for sm, gc in targets]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(
            lambda j: _compile(nvcc, j[0], j[1], j[2], flags, incs, cuobjdump), jobs))
    raw = [r for rs in results for r in rs]
    names = _demangle(sorted({r["_mangled"] for r in raw}), nvcc)
    rows = []
    for r in raw:
        kernel, variant = _shorten(names.get(r["_mangled"], r["_mangled"]))
        rows.append({"kernel": kernel, "variant": variant, "config": "-",
                     "num_warps": r["num_warps"], "arch": r["arch"],
                     "registers": r["registers"], "spill_bytes": r["spill_bytes"],
                     "shared_bytes": r["shared_bytes"], "tensor_core": r["tensor_core"],
                     "selectable": True})
    rows.sort(key=lambda r: (r["arch"], r["kernel"], r["variant"]))
    return rows


# ---------------------------------------------------------------------------------------
# CLI.

def _table(rows: list[dict]) -> str:
    cols = ["kernel", "variant", "arch", "registers", "spill_bytes", "shared_bytes",
            "num_warps", "tensor_core"]
    heads = ["kernel", "variant", "arch", "regs", "spill", "smem", "warps", "tc"]
    cells = [[("-" if r[c] is None else str(r[c])) for c in cols] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    widths[1] = min(widths[1], 70)

    def fmt(vals):
        out = []
        for i, v in enumerate(vals):
            if i == 1 and len(v) > widths[1]:
                v = v[: widths[1] - 3] + "..."
            out.append(v.rjust(widths[i]) if i >= 3 and i != 7 else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(heads), fmt(["-" * w for w in widths])]
    lines += [fmt(c) for c in cells]
    return "\n".join(lines)


def _summary(rows: list[dict]) -> str:
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        rs = [r for r in rows if r["arch"] == arch]
        regs = [r["registers"] for r in rs if r["registers"] is not None]
        spills = [r for r in rs if r["spill_bytes"]]
        out.append(f"{arch}: {len(rs)} kernels, max registers {max(regs) if regs else '-'}, "
                   f"max smem {max(r['shared_bytes'] for r in rs)} B, "
                   f"{len(spills)} with spills (total {sum(r['spill_bytes'] for r in spills)} B), "
                   f"tensor cores: {sorted({r['tensor_core'] for r in rs})}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archs", nargs="*", default=DEFAULT_ARCHS,
                    help=f"architectures (default: {' '.join(DEFAULT_ARCHS)})")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--check", action="store_true", help="exit 1 if any kernel spills")
    args = ap.parse_args(argv)
    try:
        rows = cuda_rows(args.archs)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(_table(rows))
        print()
        print(_summary(rows))
    spilling = [r for r in rows if r["spill_bytes"]]
    if args.check and spilling:
        for r in spilling:
            print(f"SPILL: {r['kernel']} [{r['variant']}] {r['arch']}: {r['spill_bytes']} B",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
