#!/usr/bin/env bash
# The demo models trained on a lent GPU machine, in calls of at most 10 minutes whose results come back as
# at most 8 files of at most 16 MB (the device tool's limits): one model per call, its export split into
# tar parts. Run from the repository root:
#   bash scripts/gpu_train_demo.sh OUT main [MAX_STEPS]          corpus, tokenizer, main model, eval, card
#   bash scripts/gpu_train_demo.sh OUT draft DIR [MAX_STEPS]     the draft model with the tokenizer in DIR
#                                                                (the main run's), then the training benchmark
# Unpack here: cat OUT/NAME_export.tar.part-* | tar -x -C DEST   (gives DEST/export)
set -uo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd); name=$2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
work=/tmp/carpool-demo
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
if [ "$name" = main ]; then
  steps=${3:-1500}
  bash scripts/train_demo.sh "$work" --device cuda --only main --max-steps "$steps" 2>&1 | tee "$out/train_main.log"
  tar -C "$work" -czf "$out/tokenizer_and_data_meta.tgz" tokenizer data/manifest.json data/corpus.json data/tokens.json \
    main/summary.json main/eval.json $(cd "$work" && ls main/*.jsonl main/*.png 2>/dev/null)
else
  tok=$3; steps=${4:-800}
  bash scripts/train_demo.sh "$work" --device cuda --only draft --tokenizer "$tok" --draft-max-steps "$steps" \
    2>&1 | tee "$out/train_draft.log"
  tar -C "$work" -czf "$out/draft_meta.tgz" draft/summary.json draft/eval.json \
    $(cd "$work" && ls draft/*.jsonl draft/*.png 2>/dev/null)
  timeout 240 python3 benchmarks/bench_train.py --out "$out/bench_train.json" 2>&1 | tail -40
fi
tar -C "$work/$name" -cf - export | split -b 15m - "$out/${name}_export.tar.part-"
ls -la "$out"
