#!/usr/bin/env bash
# The runs that need two GPUs (issue 25), in two calls of at most 10 minutes each. Run from the repository
# root on a host with two H100/H200:
#   bash scripts/gpu_two.sh OUT a   tensor parallelism and its GPU tests: test_tp_gpu + test_custom_all_reduce,
#                                   batch-1 latency at the Llama-3-8B shape TP=2 (rank-0 profile) and TP=1,
#                                   Qwen3-14B shape offline at TP=2 against the two-GPU roofline, then the
#                                   two-GPU MoE test (expert parallelism) and speculative decoding under TP
#                                   -> suite.log, latency_tp2.json, latency_tp1.json, throughput_14b_tp2.json
#   bash scripts/gpu_two.sh OUT b   FSDP2 training scaling 1 -> 2 GPUs on the ~1B Llama shape (tokens/s ratio,
#                                   loss curves, rank-0 trace and NCCL/compute overlap), then the
#                                   Qwen3-30B-A3B shape offline at TP=1, TP=2 and TP=2 with expert parallelism
#                                   -> suite.log, train_scaling.json, train_scaling_trace_rank0.json.gz,
#                                      throughput_30b_a3b_tp1.json, _tp2.json, _tp2_ep.json
# OUT defaults to $OUT (the device machine's result folder). Every step has its own time limit, and a
# deadline BUDGET_S seconds (default 560) after the start cuts any limit that would pass it, so a call ends
# inside its 10 minutes with every file written so far; a step that finds under 30 s left is skipped.
# The steps are ordered by what the issue needs most (those with known run times first). Each part ends
# with a summary of its targets in suite.log. Exit status: 0 when every step passed.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
part=${2:-}
case "$part" in
  a|b) ;;
  *) echo "usage: bash scripts/gpu_two.sh OUT a|b" >&2; exit 2 ;;
esac
mkdir -p "$out"
exec > >(tee -a "$out/suite.log") 2>&1
# NVLink multicast stays off everywhere (mandatory on the shared hosts); carpool sets these in its workers too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CARPOOL_CACHE_DIR=${CARPOOL_CACHE_DIR:-/tmp/carpool-cache}
budget=${BUDGET_S:-560}
status=0

# step LIMIT CMD...: CMD under `timeout`, its limit cut to the time left before the deadline (less 15 s for
# the kill and the summary). timeout signals CMD's whole process group, so TP ranks and training ranks end too.
step() {
  local limit=$1; shift
  local left=$((budget - SECONDS - 15))
  if ((left < 30)); then echo "!!! skipped, ${left}s left: $*"; status=1; return 1; fi
  ((limit > left)) && limit=$left
  echo "=== [limit ${limit}s, ${SECONDS}s in] $* ($(date +%T))"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  ((rc == 0)) && return 0
  ((rc == 124 || rc == 137)) && echo "!!! timed out after ${limit}s: $*" || echo "!!! failed (exit $rc): $*"
  status=1
  return $rc
}
pytest_gpu=(python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="")  # (timeout runs programs, not functions)
finish() { echo "=== done in ${SECONDS}s ($(date +%T)), status $status"; sleep 1; exit $status; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if ((gpus < 2)); then echo "!!! $gpus GPU(s) visible: these runs need two"; exit 1; fi

if [ "$part" = a ]; then
  nvidia-smi topo -m
  # (run 54 on two H200: 104 s, 43 s, 19 s, 69 s for the first four)
  step 200 "${pytest_gpu[@]}" -s tests/test_tp_gpu.py tests/test_custom_all_reduce.py
  step 100 python3 benchmarks/bench_latency.py -tp 2 --profile --out "$out/latency_tp2.json"
  step 70 python3 benchmarks/bench_latency.py -tp 1 --out "$out/latency_tp1.json"
  step 150 python3 benchmarks/bench_throughput.py --shape qwen3-14b -tp 2 --load-format dummy \
    --out "$out/throughput_14b_tp2.json"
  step 100 "${pytest_gpu[@]}" tests/test_moe_gpu.py -k expert_parallel
  step 150 "${pytest_gpu[@]}" tests/test_spec_decode_gpu.py -k tensor_parallel
else
  # 150 steps of the ~1B shape on one GPU (micro-batch 2, accumulation 2) and on two (micro-batch 2 each)
  step 280 python3 benchmarks/bench_train_scaling.py --nproc-per-node 2 --steps 150 \
    --trace "$out/train_scaling_trace_rank0.json.gz" --out "$out/train_scaling.json"
  for run in "tp1|-tp 1" "tp2|-tp 2" "tp2_ep|-tp 2 --enable-expert-parallel"; do
    # (the first of these compiles the MoE kernels, and at TP=1 an H100 has room for ~12 GiB of KV cache)
    limit=120; [ "${run%%|*}" = tp1 ] && limit=150
    step $limit python3 benchmarks/bench_throughput.py --shape qwen3-30b-a3b --load-format dummy ${run#*|} \
      --out "$out/throughput_30b_a3b_${run%%|*}.json"
  done
fi

echo "=== summary"
python3 - "$out" "$part" <<'EOF'
import json, os, sys

out, part = sys.argv[1:]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


if part == "a":
    tp2, tp1 = ((load(f"latency_{k}.json") or {}).get("ms_per_token") for k in ("tp2", "tp1"))
    print("batch-1 Llama-3-8B ms/token: TP=2", tp2, "TP=1", tp1,
          "TP2/TP1", tp2 / tp1 if tp2 and tp1 else None, "(target <= 0.6)")
    r = load("throughput_14b_tp2.json") or {}
    print("Qwen3-14B TP=2 offline tokens/s", r.get("tokens_per_s"), "roofline ratio", r.get("roofline_ratio"),
          "(target >= 0.70)")
else:
    r = load("train_scaling.json") or {}
    print("FSDP2 1B: 2 GPUs / 1 GPU tokens/s", r.get("tokens_per_s_ratio"), "(target >= 1.85); loss curves match",
          (r.get("loss_curves") or {}).get("match"), (r.get("loss_curves") or {}).get("max_rel_diff"),
          "; NCCL overlap", r.get("overlap_fraction"), "all-gather overlap", r.get("all_gather_overlap_fraction"))
    runs = {k: load(f"throughput_30b_a3b_{k}.json") or {} for k in ("tp1", "tp2", "tp2_ep")}
    base = runs["tp1"].get("tokens_per_s")
    for k, r in runs.items():
        tps = r.get("tokens_per_s")
        print(f"Qwen3-30B-A3B {k}: tokens/s", tps, "roofline ratio", r.get("roofline_ratio"),
              "vs TP=1", tps / base if tps and base else None)
EOF
finish
