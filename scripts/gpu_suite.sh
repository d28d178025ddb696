#!/usr/bin/env bash
# The GPU suite: GPU tests, then every benchmark; JSON results go to the folder given as $1
# (default: $OUT on the device machine, else ./gpu_out). Run from the repository root on an H100/H200:
#   bash scripts/gpu_suite.sh /path/to/results [quick]
# "quick" skips the HF baselines and the long throughput runs.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mode=${2:-full}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export CARPOOL_CACHE_DIR=${CARPOOL_CACHE_DIR:-/tmp/carpool-cache}
status=0
step() { echo "=== $* ($(date +%T))"; "$@" || { echo "!!! failed: $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/device.txt"

step python3 -m pytest -q -m gpu -p no:cacheprovider tests/ -o addopts="" --junitxml="$out/gpu_tests.xml" -s
if [ "$mode" = quick ]; then
  step python3 benchmarks/bench_latency.py --out "$out/latency.json"
  step python3 benchmarks/bench_throughput.py --num-prompts 64 --out "$out/throughput_quick.json"
else
  step python3 benchmarks/bench_latency.py --hf --profile --out "$out/latency.json"
  step python3 benchmarks/bench_throughput.py --hf --profile --out "$out/throughput.json"
  step python3 benchmarks/bench_throughput.py --workload shared-prefix --out "$out/shared_prefix.json"
fi
# the full split/tile sweep takes 5-8 minutes; --quick sweeps enough to check the split table
step python3 benchmarks/bench_kernels.py --quick --out "$out/kernels.json"
exit $status
