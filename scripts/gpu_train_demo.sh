#!/usr/bin/env bash
# The demo models trained on a lent GPU machine within one call of at most 10 minutes whose results come
# back as at most 8 files of at most 16 MB (the device tool's limits). Run from the repository root:
#   bash scripts/gpu_train_demo.sh OUT [MAIN_STEPS] [DRAFT_STEPS] [SECONDS] [MAIN_MINUTES]
# The main model first (corpus, tokenizer, token files, training, eval, card), then the draft model on the
# same data and tokenizer if time is left; both stop at SECONDS (default 480) so that the exports are
# packed before the call's limit. Each export comes back as tar parts of 15 MB:
#   cat OUT/NAME_export.tar.part-* | tar -x -C DEST      (gives DEST/export)
set -uo pipefail
out=$(mkdir -p "$1" && cd "$1" && pwd); main_steps=${2:-1500}; draft_steps=${3:-800}; budget=${4:-480}
main_minutes=${5:-3.5}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
work=/tmp/carpool-demo
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
# (the device goes into the log: at most 8 files come back, and the exports take six of them)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$out/train.log"
timeout "$(left)" bash scripts/train_demo.sh "$work" --device cuda --only main --max-steps "$main_steps" \
  --max-minutes "$main_minutes" \
  2>&1 | tee -a "$out/train.log"
if [ "$(left)" -gt 120 ] && [ -f "$work/main/eval.json" ]; then
  timeout "$(left)" bash scripts/train_demo.sh "$work" --device cuda --only draft --tokenizer "$work/tokenizer" \
    --draft-max-steps "$draft_steps" 2>&1 | tee -a "$out/train.log"
fi
# With time left, the speculative-decoding figures on the real pair (n-gram and draft model, batch 1 and the
# large batch); its JSON also goes to the log.
if [ "$(left)" -gt 100 ] && [ -f "$work/draft/export/config.json" ]; then
  timeout $(( $(left) - 30 )) python3 benchmarks/bench_spec_decode.py --skip-mechanics --model "$work/main/export" \
    --draft-model "$work/draft/export" --out "$out/spec_decode_demo.json" 2>&1 | tee -a "$out/train.log"
fi
(cd "$work" && tar -czf "$out/meta.tgz" tokenizer data/manifest.json data/corpus.json data/tokens.json \
  $(ls -d main/*.json main/*.jsonl main/*.png draft/*.json draft/*.jsonl draft/*.png 2>/dev/null))
for name in main draft; do
  [ -f "$work/$name/export/config.json" ] && tar -C "$work/$name" -cf - export | split -b 15m - "$out/${name}_export.tar.part-"
done
ls -la "$out"
