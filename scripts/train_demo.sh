#!/usr/bin/env bash
# Train carpool's demo models from nothing but the machine's own Python sources, in one go:
#   corpus (stdlib + installed packages) -> BPE tokenizer (vocab 8192) -> token files ->
#   main model (~23M params, scripts/train_demo/main.toml) and draft model (~4.9M, draft.toml) ->
#   export (bf16 safetensors, shards <= 15 MB) -> held-out perplexity and the ast-parse fraction of 100
#   held-out Python function completions -> model card (README.md) in each export.
# Everything is written under OUT. On one H100 the whole run takes about 10 minutes.
#
# usage: scripts/train_demo.sh OUT [--smoke] [--device cpu|cuda] [--max-steps N] [--draft-max-steps N]
#                              [--max-minutes M] [--vocab-size N] [--packages "a b c"] [--code-prompts N] [--only main|draft]
#                              [--tokenizer DIR] [-- TRAIN FLAGS...]
#   --smoke   toy sizes on CPU (a few seconds of training; checks the pipeline, not the model)
#   --only    train (evaluate, card) one of the two models; --tokenizer reuses a trained tokenizer (the
#             other model's run), so two runs on two machines share one vocabulary
#   after --, flags go to both `carpool train` runs (e.g. -- --compile true)
#
# Then, to ship: python -c "from carpool.training.demo_model import install_demo_model as i; \
#                 i('OUT/main/export', 'main'); i('OUT/draft/export', 'draft')"
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    sed -n '2,17p' "$0"; exit 2
fi
COMMAND="scripts/train_demo.sh OUT ${*:2}"
OUT=$(mkdir -p "$1" && cd "$1" && pwd); shift
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python}
CARPOOL=("$PY" -m carpool.entrypoints.cli)

DEVICE=""; MAX_STEPS=""; MAX_MINUTES=""; DRAFT_MAX_STEPS=""; VOCAB=8192; ONLY=""; TOKENIZER=""; TOKENIZER_BYTES=60000000; CODE_PROMPTS=100
PACKAGES="torch transformers numpy sympy networkx setuptools pip huggingface_hub jinja2 tokenizers safetensors \
fastapi pydantic starlette uvicorn tqdm triton"
CORPUS_FLAGS=(); SMOKE_FLAGS=(); EXTRA=(); SMOKE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --smoke) SMOKE=1; shift ;;
        --device) DEVICE=$2; shift 2 ;;
        --max-steps) MAX_STEPS=$2; shift 2 ;;
        --draft-max-steps) DRAFT_MAX_STEPS=$2; shift 2 ;;
        --max-minutes) MAX_MINUTES=$2; shift 2 ;;
        --vocab-size) VOCAB=$2; shift 2 ;;
        --packages) PACKAGES=$2; shift 2 ;;
        --code-prompts) CODE_PROMPTS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --tokenizer) TOKENIZER=$(cd "$2" && pwd); shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "train_demo.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [[ $SMOKE == 1 ]]; then
    DEVICE=${DEVICE:-cpu}; MAX_STEPS=${MAX_STEPS:-3}; DRAFT_MAX_STEPS=${DRAFT_MAX_STEPS:-2}; VOCAB=400
    CODE_PROMPTS=5; PACKAGES="tqdm"; CORPUS_FLAGS=(--no-stdlib --heldout-fraction 0.3)
    SMOKE_FLAGS=(--seq-len 64 --micro-batch-size 2 --precision fp32 --eval-sequences 4 --optim.warmup-steps 1
                 --model.hidden-size 64 --model.intermediate-size 128 --model.num-hidden-layers 2
                 --model.num-attention-heads 4 --model.num-key-value-heads 2 --progress-bar false)
fi
COMMON=()
[[ -n $DEVICE ]] && COMMON+=(--device "$DEVICE")
MAIN_FLAGS=("${COMMON[@]}"); DRAFT_FLAGS=("${COMMON[@]}")
[[ -n $MAX_STEPS ]] && MAIN_FLAGS+=(--max-steps "$MAX_STEPS")
[[ -n $MAX_MINUTES ]] && MAIN_FLAGS+=(--max-minutes "$MAX_MINUTES")
[[ -n $DRAFT_MAX_STEPS ]] && DRAFT_FLAGS+=(--max-steps "$DRAFT_MAX_STEPS")
START=$(date +%s)
log() { echo "[train_demo $(( $(date +%s) - START ))s] $*" >&2; }

DATA="$OUT/data"; mkdir -p "$DATA"
if [[ -n $TOKENIZER && $TOKENIZER == "$OUT/tokenizer" && -f "$DATA/tokens.json" ]]; then
    log "corpus, tokenizer and token files: reusing those in $OUT"  # (the other model's run, same OUT)
else
    log "corpus"
    # shellcheck disable=SC2086
    "${CARPOOL[@]}" corpus "$DATA/manifest.json" --packages $PACKAGES --skip-missing \
        ${CORPUS_FLAGS[@]+"${CORPUS_FLAGS[@]}"} > "$DATA/corpus.json"
    if [[ -n $TOKENIZER ]]; then
        log "tokenizer: $TOKENIZER"
        [[ $TOKENIZER == "$OUT/tokenizer" ]] || { rm -rf "$OUT/tokenizer"; cp -r "$TOKENIZER" "$OUT/tokenizer"; }
    else
        log "tokenizer (vocab $VOCAB)"
        "${CARPOOL[@]}" train-tokenizer --manifest "$DATA/manifest.json" --vocab-size "$VOCAB" \
            --max-bytes "$TOKENIZER_BYTES" --out "$OUT/tokenizer" > /dev/null
    fi
    log "token files"
    "${CARPOOL[@]}" pretokenize --manifest "$DATA/manifest.json" --tokenizer "$OUT/tokenizer" --out "$DATA" \
        > "$DATA/tokens.json"
fi
TRAIN_TOKENS=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['train']['tokens'])" "$DATA/tokens.json")

train() {  # NAME TOML FLAGS...
    local name=$1 toml=$2; shift 2
    log "train $name"
    "${CARPOOL[@]}" train --config "$toml" --data.train "$DATA/train" --data.heldout "$DATA/heldout" \
        --data.tokenizer "$OUT/tokenizer" --output-dir "$OUT/$name" --checkpoint.resume false \
        ${SMOKE_FLAGS[@]+"${SMOKE_FLAGS[@]}"} "$@" ${EXTRA[@]+"${EXTRA[@]}"} > "$OUT/$name/train_result.json"
}
NAMES=(main draft); [[ -n $ONLY ]] && NAMES=("$ONLY")
for name in "${NAMES[@]}"; do
    mkdir -p "$OUT/$name"
    if [[ $name == main ]]; then
        train main "$HERE/train_demo/main.toml" ${MAIN_FLAGS[@]+"${MAIN_FLAGS[@]}"}
    else
        train draft "$HERE/train_demo/draft.toml" ${DRAFT_FLAGS[@]+"${DRAFT_FLAGS[@]}"}
    fi
done

for name in "${NAMES[@]}"; do
    log "eval $name"
    SEQ=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['config']['seq_len'])" "$OUT/$name/summary.json")
    "${CARPOOL[@]}" eval "$OUT/$name/export" --data "$DATA/heldout" --seq-len "$SEQ" \
        --code-manifest "$DATA/manifest.json" --code-prompts "$CODE_PROMPTS" --code-max-tokens 64 \
        ${COMMON[@]+"${COMMON[@]}"} > "$OUT/$name/eval.json"
done

ELAPSED=$(( $(date +%s) - START ))
for name in "${NAMES[@]}"; do
    ROLE=""; [[ $name == draft ]] && ROLE=" (the draft model of carpool's demo model, same tokenizer)"
    "$PY" -m carpool.training.model_card --export "$OUT/$name/export" --summary "$OUT/$name/summary.json" \
        --eval "$OUT/$name/eval.json" --manifest "$DATA/manifest.json" --command "$COMMAND" \
        --name "carpool-demo-$name" --role "$ROLE" --pipeline-seconds "$ELAPSED" --train-tokens "$TRAIN_TOKENS" > /dev/null
done
log "done in ${ELAPSED}s"
"$PY" - "$OUT" "${NAMES[@]}" <<'EOF'
import json, sys
out = sys.argv[1]
result = {}
for name in sys.argv[2:]:
    s = json.load(open(f"{out}/{name}/summary.json"))
    e = json.load(open(f"{out}/{name}/eval.json"))
    result[name] = {"params": s["num_params"], "steps": s["steps"], "tokens_seen": s["tokens_seen"],
                    "train_minutes": round(s["elapsed_s"] / 60, 2), "final_train_loss": s["final_train_loss"],
                    "heldout_ppl": e["heldout"]["perplexity"], "ast_parse_fraction": e["code"]["parse_fraction"],
                    "tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "device": s["device"]}
print(json.dumps(result, indent=1))
EOF
