#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU and without a CUDA torch:
#  1. every csrc/**/*.cu with nvcc for sm_80 and sm_90, using the nvcc flags and include
#     dirs from csrc/build.json (the one build description); device code must not
#     include torch headers;
#  2. every torch-facing host file csrc/cuda/*_cuda.cpp with the host compiler
#     (-fsyntax-only) against the installed torch's headers (a CPU wheel ships the
#     ATen/cuda and c10/cuda headers) plus the CUDA toolkit's include dir. A host file
#     whose failure is only a header missing from this machine (outside the repository)
#     is reported as SKIP with the header's name instead of failing falsely; no torch
#     importable skips step 2 with a message;
#  3. csrc/cuda/channel_plan.h alone with the host compiler (no CUDA/torch include dirs).
#
# Usage: tools/check_cuda_compile.sh            (nvcc from $NVCC, $CUDA_HOME/bin, or PATH)
#        SDKERNELS_CHECK_ARCHS="80 90" tools/check_cuda_compile.sh
#        SDKERNELS_CHECK_CXX_STDS="c++17 c++20" tools/check_cuda_compile.sh  (host standards;
#            default: c++17, plus c++20 when the installed torch builds extensions with it)
#        CXX=clang++ tools/check_cuda_compile.sh  (host compiler; default g++, then c++)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUILD_JSON="csrc/build.json"
ARCHS="${SDKERNELS_CHECK_ARCHS:-80 90}"

if [[ -n "${NVCC:-}" ]]; then
  nvcc_bin="$NVCC"
elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  nvcc_bin="${CUDA_HOME}/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  nvcc_bin="$(command -v nvcc)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  nvcc_bin=/usr/local/cuda/bin/nvcc
else
  echo "check_cuda_compile: ERROR: nvcc not found (set NVCC or CUDA_HOME, or put nvcc on PATH)" >&2
  exit 2
fi

PY="$(command -v python3 || command -v python)"
mapfile -t NVCC_FLAGS < <("$PY" -c 'import json,sys; [print(f) for f in json.load(open(sys.argv[1]))["nvcc_flags"]]' "$BUILD_JSON")
mapfile -t INCLUDES < <("$PY" -c 'import json,sys; [print("-I" + d) for d in json.load(open(sys.argv[1])).get("include_dirs", [])]' "$BUILD_JSON")
mapfile -t LISTED < <("$PY" -c 'import json,sys; [print(f) for f in json.load(open(sys.argv[1]))["sources"].get("cuda", []) if f.endswith(".cu")]' "$BUILD_JSON")
mapfile -t CU_FILES < <(find csrc -name '*.cu' -type f | LC_ALL=C sort)

echo "check_cuda_compile: $("$nvcc_bin" --version | tail -n 2 | head -n 1)"
echo "check_cuda_compile: nvcc flags from $BUILD_JSON: ${NVCC_FLAGS[*]} ${INCLUDES[*]}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0
checked=0

# --- 1. device code ---------------------------------------------------------------------
if [[ ${#CU_FILES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no .cu files under csrc/: no device code to check"
fi
# Every .cu must be built by setup.py/CMake, i.e. listed in build.json.
for f in "${CU_FILES[@]}"; do
  listed=0
  for l in "${LISTED[@]}"; do [[ "$l" == "$f" ]] && listed=1; done
  if [[ $listed -eq 0 ]]; then
    echo "check_cuda_compile: WARNING: $f is not listed in $BUILD_JSON sources.cuda (it is not built)"
  fi
done
for f in "${CU_FILES[@]}"; do
  for arch in $ARCHS; do
    obj="$tmp/$(echo "$f" | tr '/' '_').sm_${arch}.o"
    if "$nvcc_bin" "${NVCC_FLAGS[@]}" "${INCLUDES[@]}" -Xcompiler -fPIC \
         -gencode "arch=compute_${arch},code=sm_${arch}" -c "$f" -o "$obj"; then
      echo "check_cuda_compile: OK   $f (sm_${arch})"
    else
      echo "check_cuda_compile: FAIL $f (sm_${arch})"
      failures=$((failures + 1))
    fi
    checked=$((checked + 1))
  done
done

# --- 2. torch-facing host files ---------------------------------------------------------
mapfile -t HOST_FILES < <(find csrc/cuda -name '*_cuda.cpp' -type f | LC_ALL=C sort)
mapfile -t LISTED_HOST < <("$PY" -c 'import json,sys; [print(f) for f in json.load(open(sys.argv[1]))["sources"].get("cuda", []) if f.endswith(".cpp")]' "$BUILD_JSON")
host_checked=0
host_skipped=0
if [[ ${#HOST_FILES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no csrc/cuda/*_cuda.cpp host files: nothing to check"
else
  for f in "${HOST_FILES[@]}"; do
    listed=0
    for l in "${LISTED_HOST[@]}"; do [[ "$l" == "$f" ]] && listed=1; done
    if [[ $listed -eq 0 ]]; then
      echo "check_cuda_compile: WARNING: $f is not listed in $BUILD_JSON sources.cuda (it is not built)"
    fi
  done
  cxx_bin="${CXX:-}"
  if [[ -z "$cxx_bin" ]]; then
    cxx_bin="$(command -v g++ || command -v c++ || true)"
  fi
  # Torch include dirs (include_paths() with the default device_type: torch's own dirs;
  # device_type="cuda" would need CUDA_HOME, so the toolkit dir is found from nvcc below).
  torch_info="$("$PY" - <<'PYEOF' 2>/dev/null || true
import inspect, sysconfig
import torch
from torch.utils import cpp_extension as ce
for d in ce.include_paths():
    print("INC " + d)
print("PYINC " + sysconfig.get_paths()["include"])
# The C++ standard torch's BuildExtension passes to the host compiler.
print("STD " + ("c++20" if "-std=c++20" in inspect.getsource(ce) else "c++17"))
print("VER " + torch.__version__)
PYEOF
)"
  if [[ -z "$cxx_bin" ]]; then
    echo "check_cuda_compile: SKIP host files: no host C++ compiler (set CXX)"
  elif [[ -z "$torch_info" ]]; then
    echo "check_cuda_compile: SKIP host files: torch is not importable by $PY"
  else
    mapfile -t TORCH_INC < <(sed -n 's/^INC //p' <<<"$torch_info")
    py_inc="$(sed -n 's/^PYINC //p' <<<"$torch_info")"
    torch_std="$(sed -n 's/^STD //p' <<<"$torch_info")"
    torch_ver="$(sed -n 's/^VER //p' <<<"$torch_info")"
    # The CUDA toolkit's include dir, as nvcc itself reports it (works for wrapper
    # scripts and targets/<arch>/include layouts), else the usual places.
    cuda_inc="$("$nvcc_bin" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 \
                | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 | sed 's/[[:space:]]*$//')"
    if [[ -z "$cuda_inc" || ! -f "$cuda_inc/cuda_runtime.h" ]]; then
      cuda_inc=""
      for cand in "${CUDA_HOME:-}/include" "$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")/include" /usr/local/cuda/include; do
        if [[ -f "$cand/cuda_runtime.h" ]]; then cuda_inc="$cand"; break; fi
      done
    fi
    HOST_FLAGS=(-fsyntax-only -Wall -Wno-unknown-pragmas
                -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C)
    for d in "${TORCH_INC[@]}"; do HOST_FLAGS+=(-isystem "$d"); done
    [[ -n "$py_inc" ]] && HOST_FLAGS+=(-isystem "$py_inc")
    [[ -n "$cuda_inc" ]] && HOST_FLAGS+=(-isystem "$cuda_inc")
    # A CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated by torch's CUDA build;
    # it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters on Windows): c10's own
    # switch skips it.
    have_macros=0
    for d in "${TORCH_INC[@]}"; do
      [[ -f "$d/c10/cuda/impl/cuda_cmake_macros.h" ]] && have_macros=1
    done
    [[ $have_macros -eq 0 ]] && HOST_FLAGS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
    STDS="${SDKERNELS_CHECK_CXX_STDS:-c++17}"
    if [[ -z "${SDKERNELS_CHECK_CXX_STDS:-}" && "$torch_std" != "c++17" ]]; then
      STDS="c++17 $torch_std"
    fi
    echo "check_cuda_compile: host: $("$cxx_bin" --version | head -n 1); torch $torch_ver; standards: $STDS; CUDA include: ${cuda_inc:-<none found>}"
    for f in "${HOST_FILES[@]}"; do
      for std in $STDS; do
        log="$tmp/$(echo "$f" | tr '/' '_').$std.log"
        if "$cxx_bin" -std="$std" "${HOST_FLAGS[@]}" "${INCLUDES[@]}" "$f" >"$log" 2>&1; then
          echo "check_cuda_compile: OK   $f (host, -std=$std)"
          if grep -q "warning:" "$log"; then cat "$log"; fi
        else
          # Only a header missing from this machine (not one of ours)? Then skip.
          missing="$(sed -n 's/.*fatal error: \([^:]*\): No such file or directory.*/\1/p' "$log" | head -n 1)"
          if [[ -n "$missing" && ! -e "csrc/$missing" ]] &&
             ! grep -v "fatal error: .*No such file or directory" "$log" | grep -q "error:"; then
            echo "check_cuda_compile: SKIP $f (host, -std=$std): header <$missing> is not installed here (CPU torch wheel or partial CUDA toolkit); not a source error"
            host_skipped=$((host_skipped + 1))
          else
            cat "$log"
            echo "check_cuda_compile: FAIL $f (host, -std=$std)"
            failures=$((failures + 1))
          fi
        fi
        host_checked=$((host_checked + 1))
      done
    done
  fi
fi

# --- 3. host-only plan header -----------------------------------------------------------
# csrc/cuda/channel_plan.h (split counts, vector widths) must build with a plain host
# compiler and no CUDA or torch include dir: host code and a CPU test share it.
plan_h="csrc/cuda/channel_plan.h"
plan_cxx="${CXX:-$(command -v g++ || command -v c++ || true)}"
if [[ -f "$plan_h" && -n "$plan_cxx" ]]; then
  if echo '#include "cuda/channel_plan.h"' |
       "$plan_cxx" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -Icsrc -x c++ -; then
    echo "check_cuda_compile: OK   $plan_h (host only, no CUDA/torch includes)"
  else
    echo "check_cuda_compile: FAIL $plan_h (host only, no CUDA/torch includes)"
    failures=$((failures + 1))
  fi
fi

if [[ $failures -ne 0 ]]; then
  echo "check_cuda_compile: $failures compile(s) FAILED"
  exit 1
fi
echo "check_cuda_compile: all $checked device compile(s) passed (${#CU_FILES[@]} file(s) x archs: $ARCHS)"
echo "check_cuda_compile: host files: $((host_checked - host_skipped)) of $host_checked check(s) passed, $host_skipped skipped"
