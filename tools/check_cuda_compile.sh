#!/usr/bin/env bash
# Compile-check every csrc/**/*.cu with nvcc for sm_80 and sm_90, using the nvcc flags
# and include dirs from csrc/build.json (the one build description). Needs no GPU and
# no CUDA torch: device code must not include torch headers.
#
# Usage: tools/check_cuda_compile.sh            (nvcc from $NVCC, $CUDA_HOME/bin, or PATH)
#        SDKERNELS_CHECK_ARCHS="80 90" tools/check_cuda_compile.sh
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
if [[ ${#CU_FILES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: no .cu files under csrc/: nothing to check"
  exit 0
fi

# Every .cu must be built by setup.py/CMake, i.e. listed in build.json.
for f in "${CU_FILES[@]}"; do
  listed=0
  for l in "${LISTED[@]}"; do [[ "$l" == "$f" ]] && listed=1; done
  if [[ $listed -eq 0 ]]; then
    echo "check_cuda_compile: WARNING: $f is not listed in $BUILD_JSON sources.cuda (it is not built)"
  fi
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0
checked=0
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

if [[ $failures -ne 0 ]]; then
  echo "check_cuda_compile: $failures of $checked compile(s) FAILED"
  exit 1
fi
echo "check_cuda_compile: all $checked compile(s) passed (${#CU_FILES[@]} file(s) x archs: $ARCHS)"
