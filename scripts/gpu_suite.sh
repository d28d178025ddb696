#!/usr/bin/env bash
# The GPU suite: GPU tests, then every benchmark; JSON results go to the folder given as $1
# (default: $OUT on the device machine, else ./gpu_out). Run from the repository root on an H100/H200:
#   bash scripts/gpu_suite.sh /path/to/results [quick]
# "final" = GPU tests + latency + serve. "quick" skips the HF baselines and the long throughput runs; "nohf" is full without HF; "serve" runs the serving benchmark
# (needs fastapi/uvicorn/pydantic: `bash scripts/gpu_wheels.sh serve`, then carry .whl); "tp" runs the
# tensor-parallel tests and benchmarks (2 GPUs, ~8 min): 7 JSON files + suite.log, nothing else;
# "pdl [kernels]" compares programmatic dependent launch on and off (and sweeps the decode kernel);
# "ablate" times batch-1 latency with each kernel choice undone in turn; "balance" compares the decode
# attention's work balance on and off; "check" measures the issue's targets twice after the GPU tests;
# "seams" compares this tree with an older commit's copy in .baseline/ (latency and throughput, twice each);
# "features" runs the quantization, MoE and speculative-decoding GPU tests and a short run of each of their
# benchmarks and of the training benchmark (about 9 minutes; suite.log plus one JSON file per benchmark);
# "rest" runs what "features" leaves: the single-GPU tests, the seams comparison once, speculative decoding
# on the shipped demo pair and the compiled training benchmark, in that order of priority (a step cut off by
# the call's limit leaves the earlier steps' files); "priority" is for a session with device time for one
# short call: the single-GPU tests, the seams comparison once, the quantization and MoE GPU tests, the
# training benchmark, in that order. "quant-targets" measures issue 21's engine-level targets, each against
# bf16 in the same process (--peer-bf16): FP8 KV offline, FP8 and AWQ batch-1 decode, FP8 prefill of 32 x
# 4,000 tokens, AWQ at batch 64 (about 9 minutes); "model-targets" the MoE shape's offline and batch-1
# figures (issue 22, batch 1 with the routing in the kernels and without) and speculative decoding on the
# demo pair (issue 23); "train" the training benchmark eager and compiled beside torchtitan and the plain
# FSDP2 loop (issue 20; carry .whl after `bash scripts/gpu_wheels.sh train`, else torchtitan is skipped);
# "moe-hf" the MoE shape beside HF transformers on 32 prompts of the random workload (issue 22); "spec-train"
# the speculative-decoding GPU tests, the demo pair profiled and the compiled training benchmark (one call);
# "spec-verify" the verification cost with short_query_decode off and on, and the demo pair with it on;
# "open-checks" the quantization/MoE and speculative-decoding GPU tests, MoE batch 1 with the routing
# kernel, and the demo pair with short_query_decode off (profiled) and on (one call); "open-checks-2" the
# fused MoE kernels' GPU tests, the demo pair with every method's runs interleaved, MoE batch 1 profiled
# and the FP8 KV cache offline against bf16's (in that order of priority); "short-checks" a two-minute
# subset of it; "open-all" short-checks then quant-targets' first four figures (one full call, carry .whl);
# "one-row" the batch-1 one-row quantized GEMVs: tests, sweep, engine figures, then MoE batch 1;
# "after-one-row" the second call of such a session: the demo pair interleaved over 3 rounds, AWQ at batch
# 64, the quantized-MoE GPU tests and the FP8-cache decode sweep; "fp8-prefill" the norm and SiLU kernels
# that write FP8 activations (GPU tests) and the FP8 prefill figure with them (against bf16) and without
# (KernelConfig.fused_act_quant off), about 200 s; "next" the untimed kernels' GPU tests (one-row GEMVs,
# FP8 activations written by the norm and SiLU, e4m3-pair KV decode), the int4 and FP8 batch-1 sweeps,
# AWQ batch 1, FP8 prefill, the FP8 KV cache offline and MoE batch 1 profiled (one call, about 480 s;
# carry .whl); "next-2" the second call, after the sweeps have set the batch-1 GEMV defaults: FP8 batch 1,
# FP8 prefill without the fused activations, the FP8-cache decode sweep, the demo pair over 3 rounds and
# AWQ at batch 64 (about 520 s).
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mode=${2:-full}
mkdir -p "$out"
# NVLink multicast stays off everywhere (mandatory on the shared hosts); carpool sets these in its workers too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CARPOOL_CACHE_DIR=${CARPOOL_CACHE_DIR:-/tmp/carpool-cache}
status=0
step() { echo "=== $* ($(date +%T))"; "$@" || { echo "!!! failed: $*"; status=1; return 1; }; }
gpu_tests="tests/test_gpu_engine.py tests/test_triton_ops.py tests/test_triton_distributed.py tests/test_triton_worker.py tests/test_spec_decode_gpu.py"  # (the server tests need fastapi/openai)
# the single-GPU tests as one step; $@: what goes before pytest (e.g. "timeout -s INT -k 20 300": SIGINT, so
# that pytest cut by the limit still prints which tests failed)
run_gpu_tests() { step "$@" python3 -m pytest -q -m gpu -p no:cacheprovider $gpu_tests -o addopts=""; }
# the quantization and MoE GPU tests as one step, the same way
quant_moe_tests="tests/test_quant_kernels.py tests/test_quant_engine.py tests/test_fused_moe.py tests/test_moe_gpu.py
  tests/test_fused_moe_quantized.py tests/test_quant_moe.py tests/test_moe_fused_routing.py"
run_quant_moe_tests() {
  step "$@" python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --durations 5 --tb=short -rf $quant_moe_tests
}
# a command run on the older commit's copy in .baseline/ ("seams", "rest"): `step base timeout N python3 ...`
# (timeout cannot run a shell function, so it goes inside)
here=$PWD
base() { (cd "$here/.baseline" && PYTHONPATH="$here/.baseline" "$@"); }
# end of a mode: the exit status of its steps; the pause lets tee write the end of the log
finish() { echo "=== done ($(date +%T)), status $status"; sleep 1; exit $status; }

device_file="$out/device.txt"
if [ "$mode" = tp ] || [ "$mode" = balance ] || [ "$mode" = check ] || [ "$mode" = seams ] || [ "$mode" = features ] || [ "$mode" = rest ] || [ "$mode" = priority ] || [ "$mode" = quant-targets ] || [ "$mode" = model-targets ] || [ "$mode" = train ] || [ "$mode" = moe-hf ] || [ "$mode" = spec-train ] || [ "$mode" = spec-verify ] || [ "$mode" = open-checks ] || [ "$mode" = open-checks-2 ] || [ "$mode" = short-checks ] || [ "$mode" = open-all ] || [ "$mode" = one-row ] || [ "$mode" = one-row-short ] || [ "$mode" = one-row-min ] || [ "$mode" = after-one-row ] || [ "$mode" = fp8-prefill ] || [ "$mode" = next ] || [ "$mode" = next-2 ]; then  # at most 8 files come back: the device goes into the log
  exec > >(tee -a "$out/suite.log") 2>&1
  device_file=/dev/null
fi
# Packages the image lacks, carried as wheels in .whl/ (scripts/gpu_wheels.sh): installed beside the image's.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$device_file"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$device_file"

if [ "$mode" = serve ] || [ "$mode" = final ]; then
  # serve: the serving benchmark (engine core in its own process, the default) with the offline run it
  # is compared against; the saturated run is repeated with the in-process thread engine
  # (--disable-frontend-multiprocessing). final: the GPU tests and the latency benchmark first.
  # At most 8 files come back from the device: logs and JSON only.
  exec > >(tee -a "$out/suite.log") 2>&1
  if [ "$mode" = final ]; then
    run_gpu_tests
    step python3 benchmarks/bench_latency.py --profile --out "$out/latency.json"
    step python3 benchmarks/bench_kernels.py --parts mixed  # JSON into suite.log (no file left to return)
  fi
  step python3 benchmarks/bench_throughput.py --num-prompts 256 --out "$out/throughput_same_run.json"
  ckpt=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from common import write_random_checkpoint as w; print(w('/tmp/carpool-bench/qwen3-0.6b', 'qwen3-0.6b'))")
  # --random-vocab-size 10001 --seed 0: the same prompts and output lengths as the offline run
  common="--base-url http://127.0.0.1:8011 --random-vocab-size 10001 --seed 0"
  serve() {  # $1: extra server flags; waits until healthy
    python3 -m carpool.entrypoints.cli serve "$ckpt" --port 8011 --served-model-name qwen3 $1 > /tmp/server.log 2>&1 &
    server=$!
    for _ in $(seq 180); do curl -sf http://127.0.0.1:8011/health >/dev/null && break; sleep 1; done
  }
  stop_server() { kill -TERM $server; wait $server; echo "server exit: $?"; tail -5 /tmp/server.log; }
  # CPU seconds (user + system) of the server process and of its children (the engine core), so a
  # saturated run shows whether the frontend or the core was the busy one
  cpu_of() { awk '{printf "%.2f", ($14 + $15) / 100}' /proc/$1/stat 2>/dev/null || echo 0; }
  cpu_report() { echo "cpu_s $1: frontend $(cpu_of $server) core $(for c in $(pgrep -P $server); do cpu_of $c; echo -n ' '; done)"; }
  saturated() {  # $1: output file
    cpu_report before
    local t0=$EPOCHREALTIME
    step python3 benchmarks/bench_serve.py $common --temperature 0.6 --request-rate inf --num-prompts 256 \
      --output-json "$1"
    echo "saturated wall_s $(awk "BEGIN {print $EPOCHREALTIME - $t0}")"
    cpu_report after
  }
  serve ""
  step python3 benchmarks/bench_serve.py $common --temperature 0.6 --request-rate 5 10 20 --num-prompts 200 \
    --output-json "$out/serve_rates.json" --plot "$out/serve_rates.png"
  saturated "$out/serve_saturated.json"
  stop_server
  serve --disable-frontend-multiprocessing
  saturated "$out/serve_saturated_thread.json"
  stop_server
  finish
fi
if [ "$mode" = balance ]; then
  # The decode attention's work balance for mixed context lengths: the GPU tests, batch-1 latency, the
  # decode kernel on equal and on mixed contexts (balanced and not), offline throughput with and without it.
  run_gpu_tests timeout -s INT -k 20 400
  step timeout 200 python3 benchmarks/bench_latency.py --breakdown --out "$out/latency.json"
  step timeout 300 python3 benchmarks/bench_kernels.py --quick --parts decode,mixed --out "$out/kernels.json"
  step timeout 240 python3 benchmarks/bench_throughput.py --profile --out "$out/throughput.json"
  finish
fi
if [ "$mode" = seams ]; then
  # A change against the code before it, side by side on one machine: the GPU tests of this tree, then
  # batch-1 latency and offline throughput alternating this tree and the baseline's (a copy of the older
  # commit's carpool/ and benchmarks/ in .baseline/, carried to the machine), ${3:-2} times each.
  # Even pairs run the baseline first (ABBA): a run's place in the call (the first throughput run of a call
  # was the slow one in both H100 checks) then weighs on both trees alike.
  run_gpu_tests timeout -s INT -k 20 240
  for i in $(seq "${3:-2}"); do
    this() { step timeout 100 python3 benchmarks/bench_latency.py --out "$out/latency_$i.json"; }
    that() { step base timeout 100 python3 benchmarks/bench_latency.py --out "$out/latency_base_$i.json"; }
    if [ $((i % 2)) = 1 ]; then this; that; else that; this; fi
  done
  for i in $(seq "${3:-2}"); do  # (the second pair's JSON is in suite.log only: at most 8 files come back)
    dir=$out; [ $i = 2 ] && dir=/tmp
    this() { step timeout 150 python3 benchmarks/bench_throughput.py --out "$dir/throughput_$i.json"; }
    that() { step base timeout 150 python3 benchmarks/bench_throughput.py --out "$dir/throughput_base_$i.json"; }
    if [ $((i % 2)) = 1 ]; then this; that; else that; this; fi
  done
  finish
fi
if [ "$mode" = quant-targets ]; then
  # Each step's limit leaves the later ones their time; the limits add up to 590 s.
  step timeout 110 python3 benchmarks/bench_throughput.py --kv-cache-dtype fp8 --peer-bf16 --out "$out/kv_fp8_offline.json"
  step timeout 110 python3 benchmarks/bench_latency.py --quantization fp8 --peer-bf16 --out "$out/latency_fp8.json"
  step timeout 110 python3 benchmarks/bench_latency.py --quant-format awq --peer-bf16 --out "$out/latency_awq.json"
  step timeout 120 python3 benchmarks/bench_throughput.py --workload prefill --shape llama3-8b --load-format dummy \
    --quantization fp8 --peer-bf16 --out "$out/prefill_fp8.json"
  step timeout 140 python3 benchmarks/bench_throughput.py --shape llama3-8b --load-format dummy --quant-format awq \
    --max-num-seqs 64 --num-prompts 64 --peer-bf16 --out "$out/batch64_awq.json"
  finish
fi
if [ "$mode" = model-targets ]; then
  # MoE with its routing in the kernels and without (a ratio in one call), then speculative decoding
  step timeout 150 python3 benchmarks/bench_throughput.py --shape qwen3-30b-a3b --load-format dummy --out "$out/moe_offline.json"
  step timeout 75 python3 benchmarks/bench_latency.py --shape qwen3-30b-a3b --out "$out/moe_latency.json"
  step timeout 75 python3 benchmarks/bench_latency.py --shape qwen3-30b-a3b --no-fused-moe-routing --out "$out/moe_latency_torch_routing.json"
  step timeout 60 python3 benchmarks/bench_moe.py --quick --batches 1,2,4,8,16 --out "$out/moe_routing.json"
  step timeout 120 python3 benchmarks/bench_spec_decode.py --skip-mechanics --model carpool/demo_models/main \
    --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo.json"
  finish
fi
if [ "$mode" = moe-hf ]; then
  # Issue 22's side by side: carpool and HF transformers on the MoE shape and the random workload, cut to 32
  # prompts (HF's continuous batching over 30B parameters is slow; its run stops at 240 s, reported as partial)
  step timeout 560 python3 benchmarks/bench_throughput.py --shape qwen3-30b-a3b --load-format dummy --num-prompts 32 \
    --hf --out "$out/moe_hf.json"
  finish
fi
if [ "$mode" = spec-train ]; then
  # Issue 23's GPU tests, speculative decoding on the demo pair with a profile of each method's batch-1
  # steps (host against device time) and again without CUDA graphs, then issue 20's compiled training
  # beside torchtitan (carry .whl); limits add up to 590 s.
  step timeout -s INT -k 20 140 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --tb=short -rf tests/test_spec_decode_gpu.py
  step timeout 150 python3 benchmarks/bench_spec_decode.py --skip-mechanics --profile --model carpool/demo_models/main \
    --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo.json"
  # the same pair without graphs: the draft's acceptance with and without them (0.63 graphed, 0.76 before)
  step timeout 60 python3 benchmarks/bench_spec_decode.py --skip-mechanics --enforce-eager --throughput-batch 4 \
    --model carpool/demo_models/main --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo_eager.json"
  step timeout 240 python3 benchmarks/bench_train.py --compile --steps 10 --warmup 3 --out "$out/train_compile.json"
  finish
fi
if [ "$mode" = spec-verify ]; then
  # short_query_decode off and on: the cost of verifying k = 1..8 tokens on the Llama-3-8B shape (part 1;
  # part 2 cut to batch 1 at acceptance 1.0), then the demo pair with it on (limits add up to 580 s)
  step timeout 220 python3 benchmarks/bench_spec_decode.py --rates 1.0 --batch-sizes 1 --out "$out/verify_cost.json"
  step timeout 220 python3 benchmarks/bench_spec_decode.py --short-query-decode --rates 1.0 --batch-sizes 1 \
    --out "$out/verify_cost_decode_rows.json"
  step timeout 140 python3 benchmarks/bench_spec_decode.py --skip-mechanics --short-query-decode --profile \
    --model carpool/demo_models/main --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo_decode_rows.json"
  finish
fi
if [ "$mode" = open-checks ] || [ "$mode" = open-checks-2 ]; then
  # limits add up to 580 s
  run_quant_moe_tests timeout -s INT -k 20 170
  step timeout -s INT -k 20 100 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --tb=short -rf tests/test_spec_decode_gpu.py
  step timeout 70 python3 benchmarks/bench_latency.py --shape qwen3-30b-a3b --out "$out/moe_latency.json"
  step timeout 130 python3 benchmarks/bench_spec_decode.py --skip-mechanics --profile --model carpool/demo_models/main \
    --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo.json"
  step timeout 110 python3 benchmarks/bench_spec_decode.py --skip-mechanics --short-query-decode \
    --model carpool/demo_models/main --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo_decode_rows.json"
  finish
fi
if [ "$mode" = open-checks-2 ]; then
  # limits add up to 380 s, in order of priority (a call cut short by the session's device time keeps the first)
  step timeout -s INT -k 20 60 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --durations 5 --tb=short -rf \
    tests/test_fused_moe.py tests/test_fused_moe_quantized.py
  step timeout 140 python3 benchmarks/bench_spec_decode.py --skip-mechanics --profile \
    --model carpool/demo_models/main --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo.json"
  step timeout 70 python3 benchmarks/bench_latency.py --shape qwen3-30b-a3b --profile --out "$out/moe_latency.json"
  step timeout 110 python3 benchmarks/bench_throughput.py --kv-cache-dtype fp8 --peer-bf16 --out "$out/kv_fp8_offline.json"
  finish
fi
if [ "$mode" = short-checks ] || [ "$mode" = open-all ]; then
  # a call of about two minutes, in order of priority: the fused MoE kernels' GPU tests, MoE batch 1, the
  # demo pair interleaved over two rounds
  step timeout -s INT -k 10 45 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --tb=short -rf tests/test_fused_moe.py
  step timeout 35 python3 benchmarks/bench_latency.py --shape qwen3-30b-a3b --out "$out/moe_latency.json"
  step timeout 80 python3 benchmarks/bench_spec_decode.py --skip-mechanics --repeats 2 \
    --model carpool/demo_models/main --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo.json"
  if [ "$mode" = open-all ]; then  # then issue 21's targets, as quant-targets, with shorter limits (585 s in all)
    step timeout 110 python3 benchmarks/bench_throughput.py --kv-cache-dtype fp8 --peer-bf16 --out "$out/kv_fp8_offline.json"
    step timeout 100 python3 benchmarks/bench_latency.py --quantization fp8 --peer-bf16 --out "$out/latency_fp8.json"
    step timeout 100 python3 benchmarks/bench_latency.py --quant-format awq --peer-bf16 --out "$out/latency_awq.json"
    step timeout 115 python3 benchmarks/bench_throughput.py --workload prefill --shape llama3-8b --load-format dummy \
      --quantization fp8 --peer-bf16 --out "$out/prefill_fp8.json"
  fi
  finish
fi
if [ "$mode" = one-row ] || [ "$mode" = one-row-short ] || [ "$mode" = one-row-min ]; then
  # the batch-1 one-row GEMV kernels: their GPU tests, the batch-1 GEMV sweep (both kernels, per method and
  # projection; int4 first), the AWQ and FP8 batch-1 engine figures, then MoE batch 1 (about 480 s);
  # one-row-short: the tests, the sweep cut at 170 s and AWQ batch 1 (about 310 s)
  step timeout -s INT -k 10 40 python3 -m pytest -q -p no:cacheprovider -o addopts="" --tb=short -rf \
    tests/test_quant_kernels.py -k "gemv or one_row"
  if [ "$mode" = one-row-min ]; then  # int4 only (about 230 s in all)
    step timeout 100 python3 benchmarks/bench_quant.py --batch-one --sweep --sweep-methods int4 \
      --out "$out/quant_batch_one.json"
  else
    step timeout $([ "$mode" = one-row ] && echo 240 || echo 170) python3 benchmarks/bench_quant.py --batch-one --sweep \
      --out "$out/quant_batch_one.json"
  fi
  step timeout 100 python3 benchmarks/bench_latency.py --quant-format awq --peer-bf16 --profile --out "$out/latency_awq.json"
  if [ "$mode" = one-row ]; then
    step timeout 75 python3 benchmarks/bench_latency.py --quantization fp8 --peer-bf16 --out "$out/latency_fp8.json"
    step timeout 75 python3 benchmarks/bench_latency.py --shape qwen3-30b-a3b --profile --out "$out/moe_latency.json"
  fi
  finish
fi
if [ "$mode" = after-one-row ]; then
  step timeout 120 python3 benchmarks/bench_spec_decode.py --skip-mechanics --repeats 3 \
    --model carpool/demo_models/main --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo.json"
  step timeout 150 python3 benchmarks/bench_throughput.py --shape llama3-8b --load-format dummy --quant-format awq \
    --max-num-seqs 64 --num-prompts 64 --peer-bf16 --out "$out/batch64_awq.json"
  step timeout -s INT -k 10 140 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" --tb=short -rf \
    tests/test_fused_moe_quantized.py tests/test_quant_moe.py tests/test_moe_fused_routing.py tests/test_moe_gpu.py
  step timeout 140 python3 benchmarks/bench_kernels.py --parts fp8 --quick --out "$out/kernels_fp8.json"
  finish
fi
if [ "$mode" = next ]; then
  step timeout -s INT -k 10 80 python3 -m pytest -q -p no:cacheprovider -o addopts="" --tb=short -rf \
    tests/test_quant_kernels.py tests/test_quant_kv.py -k "gemv or one_row or written_as_fp8 or activation or pairs or fp8_decode"
  step timeout 95 python3 benchmarks/bench_quant.py --batch-one --sweep --sweep-methods int4 --out "$out/quant_batch_one.json"
  step timeout 95 python3 benchmarks/bench_quant.py --batch-one --sweep --sweep-methods fp8 \
    --out "$out/quant_batch_one_fp8.json"
  step timeout 75 python3 benchmarks/bench_latency.py --quant-format awq --peer-bf16 --out "$out/latency_awq.json"
  step timeout 70 python3 benchmarks/bench_throughput.py --workload prefill --shape llama3-8b --load-format dummy \
    --quantization fp8 --peer-bf16 --out "$out/prefill_fp8.json"
  step timeout 95 python3 benchmarks/bench_throughput.py --kv-cache-dtype fp8 --peer-bf16 --out "$out/kv_fp8_offline.json"
  step timeout 75 python3 benchmarks/bench_latency.py --shape qwen3-30b-a3b --profile --out "$out/moe_latency.json"
  finish
fi
if [ "$mode" = next-2 ]; then
  step timeout 60 python3 benchmarks/bench_latency.py --quantization fp8 --peer-bf16 --out "$out/latency_fp8.json"
  step timeout 60 python3 benchmarks/bench_throughput.py --workload prefill --shape llama3-8b --load-format dummy \
    --quantization fp8 --no-fused-act-quant --out "$out/prefill_fp8_unfused.json"
  step timeout 130 python3 benchmarks/bench_kernels.py --parts fp8 --quick --out "$out/kernels_fp8.json"
  step timeout 120 python3 benchmarks/bench_spec_decode.py --skip-mechanics --repeats 3 \
    --model carpool/demo_models/main --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo.json"
  step timeout 130 python3 benchmarks/bench_throughput.py --shape llama3-8b --load-format dummy --quant-format awq \
    --max-num-seqs 64 --num-prompts 64 --peer-bf16 --out "$out/batch64_awq.json"
  finish
fi
if [ "$mode" = fp8-prefill ]; then
  step timeout -s INT -k 10 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" --tb=short -rf \
    tests/test_quant_kernels.py -k "written_as_fp8 or activation_quantization or channel_scales or block_scales"
  step timeout 120 python3 benchmarks/bench_throughput.py --workload prefill --shape llama3-8b --load-format dummy \
    --quantization fp8 --peer-bf16 --out "$out/prefill_fp8.json"
  step timeout 80 python3 benchmarks/bench_throughput.py --workload prefill --shape llama3-8b --load-format dummy \
    --quantization fp8 --no-fused-act-quant --out "$out/prefill_fp8_unfused.json"
  finish
fi
if [ "$mode" = train ]; then
  step timeout 200 python3 benchmarks/bench_train.py --steps 10 --warmup 3 --out "$out/train.json"
  step timeout 390 python3 benchmarks/bench_train.py --compile --steps 10 --warmup 3 --out "$out/train_compile.json"
  finish
fi
if [ "$mode" = features ]; then
  # Each step has its own limit so that one slow or hung step leaves time for the rest; the limits add up
  # to 595 s, inside one 10-minute call.
  run_quant_moe_tests timeout -s INT -k 20 220
  step timeout 75 python3 benchmarks/bench_train.py --steps 8 --warmup 2 --peers plain --out "$out/train.json"
  step timeout 75 python3 benchmarks/bench_quant.py --quick --out "$out/quant.json"
  step timeout 55 python3 benchmarks/bench_moe.py --quick --out "$out/moe.json"
  step timeout 75 python3 benchmarks/bench_moe.py --quick --fp8 block --batches 1,8,64,256 --out "$out/moe_fp8.json"
  step timeout 95 python3 benchmarks/bench_spec_decode.py --rates 0.5,0.8,1.0 --new-tokens 64 --out "$out/spec_decode.json"
  finish
fi

if [ "$mode" = rest ] || [ "$mode" = priority ]; then
  run_gpu_tests timeout -s INT -k 20 240
  step timeout 100 python3 benchmarks/bench_latency.py --out "$out/latency.json"
  step base timeout 100 python3 benchmarks/bench_latency.py --out "$out/latency_base.json"
  step timeout 150 python3 benchmarks/bench_throughput.py --out "$out/throughput.json"
  step base timeout 150 python3 benchmarks/bench_throughput.py --out "$out/throughput_base.json"
  if [ "$mode" = priority ]; then
    run_quant_moe_tests timeout -s INT -k 20 170
    step timeout 75 python3 benchmarks/bench_train.py --steps 8 --warmup 2 --peers plain --out "$out/train.json"
    finish
  fi
  step timeout 120 python3 benchmarks/bench_spec_decode.py --skip-mechanics --model carpool/demo_models/main \
    --draft-model carpool/demo_models/draft --out "$out/spec_decode_demo.json"
  step timeout 120 python3 benchmarks/bench_train.py --compile --steps 8 --warmup 3 --peers plain --out "$out/train_compile.json"
  finish
fi
if [ "$mode" = check ]; then
  # The figures of the issue's targets, each measured twice, with the GPU tests first: batch-1 latency
  # (profiled, repeated, and without the fused gate/up GEMV + SiLU) and offline throughput (plain, profiled).
  run_gpu_tests timeout -s INT -k 20 300
  step timeout 150 python3 benchmarks/bench_latency.py --profile --out "$out/latency.json"
  step timeout 150 python3 benchmarks/bench_latency.py --no-fused-gemv-silu --out "$out/latency_unfused_silu.json"
  step timeout 150 python3 benchmarks/bench_latency.py --out "$out/latency_repeat.json"
  step timeout 240 python3 benchmarks/bench_throughput.py --out "$out/throughput.json"
  step timeout 240 python3 benchmarks/bench_throughput.py --profile --out "$out/throughput_profiled.json"
  finish
fi
if [ "$mode" = pdl ] || [ "$mode" = ablate ]; then
  # pdl: programmatic dependent launch on and off, side by side on one machine: the GPU tests (one of
  # them compares the two bit for bit), batch-1 latency and offline throughput with profiles, and with
  # "kernels" the decode kernel sweeps. ablate: the GPU tests, then batch-1 latency with each kernel
  # choice undone in turn (PDL, GEMV step widths) and offline
  # throughput. At most 8 files come back.
  exec > >(tee -a "$out/suite.log") 2>&1
  run_gpu_tests
  if [ "$mode" = pdl ]; then
    step python3 benchmarks/bench_latency.py --profile --out "$out/latency.json"
    step python3 benchmarks/bench_latency.py --no-pdl --out "$out/latency_nopdl.json"
    step python3 benchmarks/bench_throughput.py --profile --out "$out/throughput.json"
    step python3 benchmarks/bench_throughput.py --no-pdl --out "$out/throughput_nopdl.json"
    [ "${3:-}" = kernels ] && step python3 benchmarks/bench_kernels.py --quick --parts decode,mixed --out "$out/kernels.json"
  else
    step python3 benchmarks/bench_latency.py --out "$out/latency.json"
    step python3 benchmarks/bench_latency.py --no-pdl --out "$out/latency_nopdl.json"
    step python3 benchmarks/bench_latency.py --no-fused-qkv-rope --out "$out/latency_unfused_rope.json"
    step python3 benchmarks/bench_latency.py --no-kernel-host-io --out "$out/latency_no_host_io.json"
    step python3 benchmarks/bench_throughput.py --out "$out/throughput.json"
  fi
  finish
fi
if [ "$mode" = tp ]; then
  nvidia-smi topo -m
  # (each step has a time limit: a collective that never completes must not eat the whole session)
  # First the fused all-reduce + RMSNorm kernel and the batch-1 push exchange with ranks simulated on one
  # GPU (streams); if they fail, the rest runs without the push exchange.
  # (the model-family push test is a CPU test of the wiring: on a GPU its engine start-up compiles for
  # minutes, which once ran this step past its limit)
  step timeout -s INT -k 20 150 python3 -m pytest -q -p no:cacheprovider tests/test_triton_distributed.py -o addopts="" \
    -k "over_simulated_ranks or pushes_to_the_norm" \
    || { push_off=--no-push-all-reduce; echo "!!! push exchange off for the remaining steps"; }
  step timeout -s INT -k 20 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_ops.py -o addopts="" \
    -k "gemv_silu or gemv_rope"
  step timeout -s INT -k 20 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_tp_gpu.py tests/test_custom_all_reduce.py -o addopts="" -s
  # Llama-3-8B shape, batch 1: TP=2 (rank-0 profile), TP=2 without the push exchange (the fused exchange
  # after each row-parallel GEMV instead), TP=1, and both sizes with the q/k/v GEMV and RoPE + KV store
  # as two kernels.
  # (The NCCL logits all-gather, --no-push-logits, was last compared in run 55.)
  step timeout 150 python3 benchmarks/bench_latency.py -tp 2 ${push_off:-} --profile --out "$out/latency_tp2.json"
  step timeout 150 python3 benchmarks/bench_latency.py -tp 2 --no-push-all-reduce --out "$out/latency_tp2_no_push.json"
  step timeout 150 python3 benchmarks/bench_latency.py -tp 1 --out "$out/latency_tp1.json"
  step timeout 150 python3 benchmarks/bench_latency.py -tp 2 --no-fused-qkv-rope --out "$out/latency_tp2_unfused_rope.json"
  step timeout 150 python3 benchmarks/bench_latency.py -tp 1 --no-fused-qkv-rope --out "$out/latency_tp1_unfused_rope.json"
  # Qwen3-14B shape, 256 requests, TP=2 (batches above one row: the fused exchange)
  step timeout 200 python3 benchmarks/bench_throughput.py --shape qwen3-14b -tp 2 --load-format dummy --out "$out/throughput_14b_tp2.json"
  finish
fi
step python3 -m pytest -q -m gpu -p no:cacheprovider $gpu_tests -o addopts="" --junitxml="$out/gpu_tests.xml" -s
if [ "$mode" = quick ]; then
  step python3 benchmarks/bench_latency.py --out "$out/latency.json"
  step python3 benchmarks/bench_throughput.py --num-prompts 64 --out "$out/throughput_quick.json"
else
  hf=--hf; [ "$mode" = nohf ] && hf=  # nohf: the full suite without the (slow) HF baselines
  step python3 benchmarks/bench_latency.py $hf --profile --out "$out/latency.json"
  step python3 benchmarks/bench_throughput.py $hf --profile --out "$out/throughput.json"
  step python3 benchmarks/bench_throughput.py --workload shared-prefix --out "$out/shared_prefix.json"
fi
# the full split/tile sweep takes 5-8 minutes; --quick sweeps enough to check the split table
step python3 benchmarks/bench_kernels.py --quick --out "$out/kernels.json"
[ "$mode" = quick ] || step python3 benchmarks/bench_gemv.py --quick --out "$out/gemv.json"
exit $status
