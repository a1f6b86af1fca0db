#!/usr/bin/env bash
# One command for a GPU machine with no network: build the extension against the
# installed (CUDA) torch, run the gpu tests and the benchmarks, and keep logs and JSON.
#   bash tools/gpu_run.sh OUT_DIR
set -uo pipefail
out="$(realpath -m "${1:?usage: tools/gpu_run.sh OUT_DIR}")"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0
{
  nvidia-smi || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$out/env.txt" 2>&1
python3 -m pip install --no-build-isolation --no-deps . > "$out/build.log" 2>&1 || { echo "build failed: see $out/build.log"; tail -30 "$out/build.log"; exit 1; }
(cd / && python3 -c "import sdkernels; print(sdkernels.backend_info())") | tee -a "$out/env.txt"
pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" || status=1
# The GPU must-shows of the fused extension (issue 5) and the Triton kernels (issue 6).
pytest benchmarks/test_fused_targets.py benchmarks/test_triton_gpu.py --benchmark-only -s \
  -p no:cacheprovider --benchmark-json "$out/targets.json" 2>&1 | tee "$out/targets.log" || status=1
pytest benchmarks --benchmark-only -m "not slow" -q -p no:cacheprovider \
  --ignore benchmarks/test_fused_targets.py --ignore benchmarks/test_triton_gpu.py \
  --benchmark-json "$out/benchmarks.json" 2>&1 | tee "$out/benchmarks.log" || status=1
(cd / && python3 -m sdkernels.bench --device cuda --out "$out/bench") 2>&1 | tee "$out/bench.log" || status=1
exit $status
