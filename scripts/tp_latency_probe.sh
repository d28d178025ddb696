#!/usr/bin/env bash
# Batch-1 latency variants side by side on two GPUs, for ablations between full `gpu_suite.sh tp` runs:
#   bash scripts/tp_latency_probe.sh OUT [tests] "NAME|bench_latency args" ...
# "tests" first runs the simulated-rank push tests, the push GEMV microbenchmark (bench_gemv.py --push)
# and the TP GPU tests. Each variant writes OUT/NAME.json; the first is profiled. A line
# "RESULT NAME ms/token [repeats] push" per variant goes to OUT/probe.log.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 CARPOOL_CACHE_DIR=/tmp/carpool-cache
exec > >(tee -a "$out/probe.log") 2>&1
status=0
step() { echo "=== $* ($(date +%T))"; "$@" || { echo "!!! failed: $*"; status=1; return 1; }; }
if [ "${1:-}" = tests ]; then
  shift
  step timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_distributed.py -o addopts="" \
    -k "over_simulated_ranks or pushes_to_the_norm"
  step timeout 200 python3 benchmarks/bench_gemv.py --push --out "$out/gemv_push.json" > /tmp/gemv_push.log 2>&1
  python3 -c "import json; [print('GEMV', r['case'], r['block_k'], r['num_warps'], r['plain_us'], r['push_local_us'], r.get('push_peer_us')) for r in json.load(open('$out/gemv_push.json'))['cases']]"
  step timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_tp_gpu.py tests/test_custom_all_reduce.py \
    -o addopts="" -s > /tmp/tp_tests.log 2>&1
  grep -E "passed|failed|push exchange|Error" /tmp/tp_tests.log | head -20
fi
first=--profile
for variant in "$@"; do
  name=${variant%%|*}; args=${variant#*|}
  # shellcheck disable=SC2086
  step timeout 150 python3 benchmarks/bench_latency.py $args $first --out "$out/$name.json" > "/tmp/$name.log" 2>&1
  first=
  grep -iE "push exchange|error" "/tmp/$name.log" | head -5
  python3 -c "import json; d=json.load(open('$out/$name.json')); c=d['carpool']; print('RESULT', '$name', round(d['ms_per_token'], 4), [round(x, 4) for x in c.get('ms_per_token_each', [])], 'push', c.get('tp_paths', {}).get('push_all_reduce'))"
done
echo "=== done ($(date +%T)), status $status"; sleep 1; exit $status
