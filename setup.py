"""Builds the compiled extension sdkernels._C from csrc/build.json.

Package metadata and the package list live in pyproject.toml; this file only adds the
extension module. Build against the torch that is already installed:

    pip install --no-build-isolation .        # or -e . for a developer install

Environment switches:
    SDKERNELS_SKIP_CUDA=1                build the CPU ops only, even with a CUDA toolkit
    SDKERNELS_CUDA_ARCH_LIST="8.0;9.0"   CUDA archs (fallback TORCH_CUDA_ARCH_LIST, then
                                         build.json's default_cuda_archs); "+PTX" suffix ok
    CUDA_HOME / CUDA_PATH                the CUDA toolkit (otherwise nvcc on PATH, then
                                         /usr/local/cuda)
CUDA sources are built when a CUDA toolkit is found and torch is a CUDA build; a visible
GPU is never required.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_JSON = os.path.join("csrc", "build.json")

try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(
        "sdkernels: building the compiled extension needs PyTorch, and it could not be "
        f"imported ({exc}).\n"
        "Install torch first (https://pytorch.org/get-started/locally/), then install "
        "sdkernels against it without build isolation:\n"
        "    pip install --no-build-isolation .\n"
        "(with build isolation pip would build against a second, freshly downloaded torch)."
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _find_cuda_toolkit() -> str | None:
    """The CUDA toolkit root (a directory with bin/nvcc), or None. No GPU needed."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    candidates.append("/usr/local/cuda")
    found = [h for h in candidates
             if h and any(os.path.isfile(os.path.join(h, "bin", exe))
                          for exe in ("nvcc", "nvcc.exe"))]
    # Prefer a full toolkit (headers next to nvcc) over e.g. a bare nvcc wrapper script.
    for home in found:
        if _has_cuda_headers(home):
            return home
    return found[0] if found else None


def _has_cuda_headers(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _cuda_decision() -> tuple[bool, str]:
    """(build CUDA sources?, why) -- decided by toolkit and torch, never by a GPU."""
    if _truthy(os.environ.get("SDKERNELS_SKIP_CUDA")):
        return False, "SDKERNELS_SKIP_CUDA is set"
    toolkit = _find_cuda_toolkit()
    if toolkit is None:
        return False, ("no CUDA toolkit found (CUDA_HOME/CUDA_PATH unset or without "
                       "bin/nvcc, no nvcc on PATH, no /usr/local/cuda)")
    if torch.version.cuda is None:
        return False, (f"CUDA toolkit found at {toolkit}, but torch {torch.__version__} "
                       "is not a CUDA build (torch.version.cuda is None)")
    return True, f"CUDA toolkit at {toolkit}, torch {torch.__version__} (CUDA {torch.version.cuda})"


def _arch_flags(arch_list: str) -> list[str]:
    """'8.0;9.0+PTX' -> nvcc -gencode flags (sm_80, sm_90 and compute_90 PTX)."""
    flags = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item[:-4] if ptx else item
        num = num.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise SystemExit(f"sdkernels: empty CUDA arch list {arch_list!r}")
    return flags


def _extensions():
    with open(os.path.join(ROOT, BUILD_JSON)) as f:
        cfg = json.load(f)
    sources = list(cfg["sources"]["cpu"])
    include_dirs = [os.path.join(ROOT, d) for d in cfg.get("include_dirs", [])]
    cxx_flags = list(cfg.get("cxx_flags", []))
    link_flags: list[str] = []
    if sys.platform.startswith("linux"):
        cxx_flags += cfg.get("openmp_flags_linux", [])
        link_flags += cfg.get("openmp_flags_linux", [])

    with_cuda, why = _cuda_decision()
    if with_cuda:
        archs = (os.environ.get("SDKERNELS_CUDA_ARCH_LIST")
                 or os.environ.get("TORCH_CUDA_ARCH_LIST")
                 or cfg["default_cuda_archs"])
        print(f"sdkernels: building CUDA sources for archs {archs}: {why}", flush=True)
        sources += cfg["sources"]["cuda"]
        toolkit = _find_cuda_toolkit()
        if not _has_cuda_headers(cpp_extension.CUDA_HOME) and _has_cuda_headers(toolkit):
            cpp_extension.CUDA_HOME = toolkit  # torch's own guess found no headers
        ext = CUDAExtension(
            name=cfg["extension"],
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": list(cfg["nvcc_flags"]) + _arch_flags(archs)},
            extra_link_args=link_flags,
        )
    else:
        print(f"sdkernels: NOT building CUDA sources (CPU ops only): {why}", flush=True)
        ext = CppExtension(
            name=cfg["extension"],
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext]


setup(
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
