"""The CUDA build of sdkernels._C: kernels compiled, linked and registered, no GPU needed.

Runs where torch is a CUDA build and the extension was built with the CUDA sources (CI's
CUDA-torch environment); elsewhere it skips and says why. SDKERNELS_REQUIRE_CUDA_BUILD=1
(set by CI there) turns every such skip into a failure, so a build that silently left
out the CUDA sources cannot pass.

Which ops must have CUDA kernels is read from the sources: every op declared in
csrc/sdkernels.cpp (TORCH_LIBRARY) that a CUDA source listed in csrc/build.json
implements (TORCH_LIBRARY_IMPL(sdkernels, CUDA, m) ... m.impl("op", ...)) must be
registered for the CUDA dispatch key, and no other op may be.
"""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sdkernels.ops import extension

pytestmark = pytest.mark.cuda_build

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("SDKERNELS_REQUIRE_CUDA_BUILD", "").strip().lower() in (
    "1", "true", "yes", "on")


def _skip(reason):
    if REQUIRED:
        pytest.fail(f"SDKERNELS_REQUIRE_CUDA_BUILD=1, but {reason}", pytrace=False)
    pytest.skip(reason)


def _strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _declared_ops():
    text = _strip_comments((ROOT / "csrc" / "sdkernels.cpp").read_text())
    block = text[text.index("TORCH_LIBRARY(sdkernels, m)"):]
    return re.findall(r'm\.def\(\s*"([A-Za-z_]\w*)\(', block)


def _cuda_impl_ops():
    cfg = json.loads((ROOT / "csrc" / "build.json").read_text())
    ops = {}
    for src in cfg["sources"].get("cuda", []):
        text = _strip_comments((ROOT / src).read_text())
        for m in re.finditer(r"TORCH_LIBRARY_IMPL\(\s*sdkernels\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{",
                             text):
            body = text[m.end():text.index("}", m.end())]
            for op in re.findall(r'\.impl\(\s*"([A-Za-z_]\w*)"', body):
                ops[op] = src
    return ops


def test_op_lists_read_from_the_sources():
    # Guards the parsing below (runs everywhere, CPU-only torch included).
    declared = _declared_ops()
    cuda = _cuda_impl_ops()
    assert "scale_bias_add_relu" in declared and "bn_stats" in declared
    assert len(declared) == len(set(declared))
    assert cuda, "no TORCH_LIBRARY_IMPL(sdkernels, CUDA, ...) found in build.json's CUDA sources"
    assert set(cuda) <= set(declared), f"CUDA kernels of undeclared ops: {set(cuda) - set(declared)}"


@pytest.fixture(scope="module")
def cuda_build():
    if torch.version.cuda is None:
        _skip(f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None): "
              "the CUDA sources cannot be built against it")
    if not extension.is_available():
        _skip(f"the compiled extension is not available: {extension.unavailable_reason()}")
    if not extension.built_with_cuda():
        _skip(f"{extension.library_path()} was built without the CUDA sources (no CUDA "
              "toolkit at build time, or SDKERNELS_SKIP_CUDA was set)")
    return extension.library_path()


def test_every_cuda_op_is_registered_for_cuda(cuda_build):
    declared = _declared_ops()
    cuda = _cuda_impl_ops()
    missing = [op for op in cuda
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sdkernels::{op}", "CUDA")]
    assert not missing, f"ops implemented in CUDA sources but without a CUDA kernel: {missing}"
    unexpected = [op for op in declared if op not in cuda
                  and torch._C._dispatch_has_kernel_for_dispatch_key(f"sdkernels::{op}", "CUDA")]
    assert not unexpected, f"CUDA kernels for ops no CUDA source implements: {unexpected}"
    # every declared op is registered at all (schema plus its CPU kernel)
    no_cpu = [op for op in declared
              if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sdkernels::{op}", "CPU")]
    assert not no_cpu, f"declared ops without a CPU kernel: {no_cpu}"
    assert extension.built_with_cuda()


def _readelf(args, path):
    exe = shutil.which("readelf")
    if exe is None:
        pytest.skip("readelf (binutils) is not installed: cannot inspect the library")
    return subprocess.run([exe, *args, path], check=True, capture_output=True, text=True).stdout


def test_library_links_the_cuda_runtime_and_carries_device_code(cuda_build):
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]",
                        _readelf(["-d", "-W"], cuda_build))
    assert any(n.startswith("libcudart.so") for n in needed), needed
    assert "libc10_cuda.so" in needed, needed
    sections = _readelf(["-S", "-W"], cuda_build)
    assert ".nv_fatbin" in sections, "no .nv_fatbin section: no device code in the library"
