#!/usr/bin/env bash
# Probe (2 GPUs): the TP push tests, then batch-1 latency at TP=2 with L2 warm-up plans
# (CARPOOL_L2_WARMUP, carpool/worker/l2_warmup.py) side by side. $1: results folder; $2: "tests" to run the
# tests first; the remaining arguments: plans (one run each; "-" = none; "tp1:PLAN" runs TP=1).
set -uo pipefail
out=$1; tests=$2; shift 2
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 CARPOOL_CACHE_DIR=/tmp/carpool-cache
exec > >(tee -a "$out/probe.log") 2>&1
status=0
step() { echo "=== $* ($(date +%T))"; "$@" || { echo "!!! failed: $*"; status=1; return 1; }; }
if [ "$tests" = tests ]; then
  step timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py -o addopts="" \
    -k "over_simulated_ranks or pushes_to_the_next_norm"
  step timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_tp_gpu.py tests/test_custom_all_reduce.py \
    -o addopts="" -s 2>&1 | grep -E "passed|failed|push|error|Error" | head -30
fi
i=0
for spec in "$@"; do
  i=$((i + 1)); tp=2; plan=$spec
  case $spec in tp1:*) tp=1; plan=${spec#tp1:};; esac
  [ "$plan" = - ] && plan=
  extra=; [ $i = 1 ] && extra=--profile
  name="lat_$i"
  step timeout 150 env CARPOOL_L2_WARMUP="$plan" python3 benchmarks/bench_latency.py -tp $tp $extra \
    --out "$out/$name.json" > "/tmp/$name.log" 2>&1
  grep -iE "warm|push exchange|error" "/tmp/$name.log" | head -5
  python3 -c "import json; d=json.load(open('$out/$name.json')); c=d['carpool']; print('RESULT', '$name', 'tp$tp', repr('$plan'), round(d['ms_per_token'], 4), [round(x, 4) for x in c.get('ms_per_token_each', [])], 'push', c.get('tp_paths', {}).get('push_all_reduce'))"
done
echo "=== done ($(date +%T)), status $status"; sleep 1; exit $status
