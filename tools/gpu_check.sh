#!/usr/bin/env bash
# The one command for a GPU machine (H100/H200, no network, CUDA torch + triton +
# torchvision + timm + pytest + nvcc installed). Under 8 minutes, build included:
#
#   bash tools/gpu_check.sh OUT            # on the GPU machine
#   bash tools/gpu_check.sh OUT --dry-run  # on any CPU machine (CI): same Python, no GPU
#
# Steps, each under its own `timeout` so one hang cannot eat the budget (seconds):
#   build      160  pip install --no-build-isolation --no-deps . (MAX_JOBS=16, ninja,
#                   SDKERNELS_CUDA_ARCH_LIST=9.0)
#   gpu_tests   90  pytest tests -m gpu: every CUDA op and Triton kernel at small shapes,
#                   Triton configs pinned (SDKERNELS_TRITON_DETERMINISTIC=1: no autotuning)
#   dryrun      60  (300 with --dry-run) python -m sdkernels.bench.dryrun: launches/bytes/FLOPs/syncs of the
#                   ResNet-110 step per backend and the cost model's PREDICTED times, to set
#                   beside the measured ones
#   step       100  ResNet-110 training step, bf16 (autocast), channels_last, batch 128:
#                   constant depth, naive mask-multiply, sdkernels on the module path
#                   ("reference", the CUDA default), extension and triton; CUDA-event
#                   timing, warm-up (which also autotunes Triton), median over
#                   interleaved rounds (GPU_CHECK_ROUNDS, default 20)
#   targets     60  benchmarks/test_fused_targets.py (the fused-block targets; those tests
#                   force use_backend("extension") themselves)
# Results: OUT/*.json (device name, torch/triton/CUDA versions in each), OUT/*.log, and a
# short table printed last (OUT/summary.txt).
#
# --dry-run skips the build and `pytest -m gpu`, runs the dry run, runs the step script
# on meta tensors inside sdkernels' testing seam (backends.dry_run_cuda: the library
# takes its CUDA branches; float32, one round, no timing: autocast has no meta kernels),
# and only collects the fused-target benchmarks. It catches typos before a GPU is spent.
# PYTHON selects the interpreter (default python3).
set -uo pipefail
usage="usage: tools/gpu_check.sh OUT [--dry-run]"
out="${1:?$usage}"
dry=0
[[ "${2:-}" == "--dry-run" ]] && dry=1
[[ $# -gt 2 || ( $# -eq 2 && $dry -eq 0 ) ]] && { echo "$usage" >&2; exit 2; }
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 SDKERNELS_CUDA_ARCH_LIST=9.0
# Run from outside the source tree so that `import sdkernels` is the installed build.
run_dir="$out/.cwd"; mkdir -p "$run_dir"
# The dry run has no build step: it uses the installed sdkernels (with its compiled
# library) where there is one, else the source tree.
if [[ $dry -eq 1 ]] && ! (cd "$run_dir" && "$py" -c "import sdkernels" >/dev/null 2>&1); then
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
declare -a names=() codes=() secs=()
status=0

step() {  # step NAME LIMIT_S CMD... : run under timeout, log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  (cd "$run_dir" && timeout -k 10 "$limit" "$@") > "$out/$name.log" 2>&1
  local rc=$?
  names+=("$name"); codes+=("$rc"); secs+=("$((SECONDS - t0))")
  if [[ $rc -ne 0 ]]; then
    status=1
    echo "   FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', timed out')): tail of $out/$name.log"
    tail -15 "$out/$name.log" | sed 's/^/   | /'
  fi
}

{
  date -u +%FT%TZ
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  "$py" -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>&1
} > "$out/env.txt" 2>&1

if [[ $dry -eq 0 ]]; then
  step build 160 "$py" -m pip install --no-build-isolation --no-deps -v "$repo"
  [[ ${codes[-1]} -ne 0 ]] && { echo "build failed: see $out/build.log"; exit 1; }
  (cd "$run_dir" && "$py" -c "import sdkernels; print(sdkernels.backend_info())") >> "$out/env.txt" 2>&1
  step gpu_tests 90 env SDKERNELS_TRITON_DETERMINISTIC=1 SDKERNELS_REQUIRE_EXTENSION=1 \
    "$py" -m pytest "$repo/tests" -m gpu -q -p no:cacheprovider --junitxml "$out/gpu_tests.xml"
else
  echo "== dry run: build and pytest -m gpu skipped"
fi

# the dry run is Python-bound (~10-25 s per variant on one core); CI's dry run has no
# 8-minute budget to keep, so it gets more room on a slow or loaded CPU
step dryrun "$([[ $dry -eq 1 ]] && echo 300 || echo 60)" "$py" -m sdkernels.bench.dryrun --model resnet110 --layout channels_last \
  --dtype bf16 --batch 128 --json "$out/dryrun.json"

step network_step 100 "$py" -m sdkernels.bench.gpu_step "$out/network_step.json" $([[ $dry -eq 1 ]] && echo --dry-run)

if [[ $dry -eq 0 ]]; then
  step targets 60 "$py" -m pytest "$repo/benchmarks/test_fused_targets.py" --benchmark-only \
    -s -q -p no:cacheprovider --benchmark-json "$out/targets.json"
else
  step targets 60 "$py" -m pytest "$repo/benchmarks/test_fused_targets.py" --collect-only \
    -q -p no:cacheprovider
fi

{
  echo "gpu_check $([[ $dry -eq 1 ]] && echo '(DRY RUN: no GPU, no timing)') -> $out"
  head -3 "$out/env.txt" | tail -2
  printf '%-14s %6s %8s\n' step exit seconds
  for i in "${!names[@]}"; do printf '%-14s %6s %8s\n' "${names[$i]}" "${codes[$i]}" "${secs[$i]}"; done
  [[ -f "$out/gpu_tests.log" ]] && echo "gpu tests: $(tail -1 "$out/gpu_tests.log")"
  [[ -f "$out/network_step.log" ]] && { echo "network step (ResNet-110, batch 128):"; sed 's/^/  /' "$out/network_step.log" | tail -6; }
  [[ -f "$out/dryrun.log" ]] && { echo "dry-run counts / PREDICTED times:"; grep -E "train|eval2|^variant" "$out/dryrun.log" | cut -c1-150 | sed 's/^/  /'; }
  [[ -f "$out/targets.log" ]] && echo "targets: $(tail -1 "$out/targets.log")"
  echo "total ${SECONDS}s, status $status"
} | tee "$out/summary.txt"
exit $status
