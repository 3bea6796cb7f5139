#!/usr/bin/env bash
# The GPU proof for one short device lease (issue 21): one call of at most BUDGET_S (540 s) on one GPU, stages in
# priority order, each under its own `timeout`, each appending one summary line to $OUT/summary.txt as soon as it
# ends (also when it fails or is killed), so what ran is known even if a later stage or the whole call dies.
#   (a) env       torch, CUDA, GPU, free memory, SDPA backends, zstandard / triton versions        (timeout 30 s)
#   (b) smoke     the default config compiled, AUTO_FIT=0, 60 s of training, GPTQ, export, round trip, a
#                 short chunked TTT on the first 131,072 validation tokens (~20 documents)           (timeout 180 s)
#   (c) speed     ms/step, tokens/s, MFU, peak memory over the 40 steps after step 5 (3 compile-priming steps
#                 run and undone before step 1) at the real single-GPU batch (786,432 tokens, 8-step gradient
#                 accumulation), default config then PRESET=naive_baseline (run from the packed train_gpt.py),
#                 and their ratio                                                                     (100 s + 80 s)
#   (d) frontier  PRESET=frontier on sp8192 stand-in shards, 60 s: compiled flex attention forward and backward
#                 (document mask), loops, two lanes, phased LoRA TTT on the first 32,768 tokens        (timeout 150 s)
# A stage starts only with >= 20 s of BUDGET_S left, and its timeout is cut to what is left.
#
#   bash bench/prepare_gpu_proof.sh    # here, once: .gpu_proof/{sp1024,sp8192} shards + the zstandard wheel in .whl/
#   bash bench/gpu_proof.sh            # on the device (bench/README.md: the exact `run` call)
#   REHEARSE=1 bash bench/gpu_proof.sh # CPU rehearsal: the same stages, tiny knobs, data/sample shards, ~2-4 min
#   REHEARSE=1 FAST=1 bash ...         # the CI rehearsal (tests/test_gpu_proof.py): fewer steps and tokens
#
# $OUT (default bench/out/gpu_proof) receives summary.txt (the stage lines) and logs.tar.gz (every stage's log and
# stdout, rewritten after each stage): two files. Figures are "1xH200, stand-in corpus": absolute times are H200
# times on Wikipedia stand-in shards, not FineWeb scores; the default/naive ratio is the comparable figure.
# Knobs: SP1024=DIR SP8192=DIR (shards with tokenizer.model; rehearsal default: data/sample shards, frontier at
# vocab 1024), BUDGET_S, TIMEOUT_SCALE (1; rehearsal 3), WORK (scratch, default /tmp/gpu_proof_work), STAGES
# (default "env smoke speed frontier").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_proof}
WORK=${WORK:-/tmp/gpu_proof_work}
REHEARSE=${REHEARSE:-0}
# stage timeouts are sized for the H200; a CPU rehearsal gets TIMEOUT_SCALE (default 3) times them and the budget
SCALE=${TIMEOUT_SCALE:-$([ "$REHEARSE" = 1 ] && echo 3 || echo 1)}
BUDGET_S=${BUDGET_S:-$((540 * SCALE))}
STAGES=${STAGES:-env smoke speed frontier}
export PYTHONUNBUFFERED=1 REHEARSE
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK/logs"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
START=$(date +%s.%N)
now() { python3 -c "import time; print(f'{time.time() - $START:.1f}')"; }

# zstandard: the H200 image lacks it; install the carried wheel (bench/prepare_gpu_proof.sh puts it in .whl/)
if ! python3 -c "import zstandard" 2>/dev/null && ls .whl/zstandard-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/zstandard-*.whl >"$WORK/pip.out" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$REHEARSE" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  if [ -z "${SP1024:-}" ]; then
    SP1024=$WORK/sample
    python3 data/build_shards.py data/sample/sample_train.jsonl.zst --val-input data/sample/sample_val.jsonl.zst \
      --tokenizer data/sample/sample_1024_bpe.model --out "$SP1024" --threads 1 >"$WORK/build_sample.out" 2>&1
  fi
  TINY=(DEVICE=cpu COMPILE=0 NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=64 EVAL_SEQ_LEN=64
        EVAL_STRIDE=32 TRAIN_BATCH_TOKENS=4096 BIGRAM_BUCKETS=256 BIGRAM_DIM=16 XSA_LAST_N=1 ROPE_DIMS=8
        GPTQ_CALIB_TOKENS=256 PASSTHROUGH_MAX_NUMEL=1024 VAL_BATCH_SEQS=8 TTT_BATCH_SEQS=8 TTT_CHUNK_TOKENS=1024
        VAL_MAX_TOKENS=4096 WARMUP_STEPS=1 TTT_LORA_RANK=4 TTT_LORA_CHUNK=32)
  SHORT=(ITERATIONS=6 MAX_WALLCLOCK_SECONDS=0)
  SPEED_LEN=(ITERATIONS=10)
  FRONTIER_TINY=(NUM_LAYERS=4 LOOP_START=1 LOOP_END=2 PARALLEL_RESID_FROM=2 XSA_LAST_N=4)
  [ -z "${SP8192:-}" ] && FRONTIER_TINY+=(VOCAB_SIZE=1024)
  if [ "${FAST:-0}" = 1 ]; then  # the CI rehearsal: every stage, fewest steps and tokens
    TINY+=(VAL_MAX_TOKENS=2048 TTT_CHUNK_TOKENS=1024 TTT_PHASE_DOCS=2 TTT_LORA_DOCS=2 TTT_LORA_CHUNK=64
          TRAIN_BATCH_TOKENS=2048 GPTQ_CALIB_TOKENS=128)
    SHORT=(ITERATIONS=3 MAX_WALLCLOCK_SECONDS=0)
    SPEED_LEN=(ITERATIONS=7 TRAIN_LOG_EVERY=1)
    FRONTIER_TINY+=(NUM_LAYERS=2 LOOP_START=0 LOOP_END=1 PARALLEL_RESID_FROM=1 XSA_LAST_N=2)
  fi
  SP8192=${SP8192:-$SP1024}
else
  TINY=()
  SHORT=()
  SPEED_LEN=(ITERATIONS=45)
  FRONTIER_TINY=()
  SP1024=${SP1024:-.gpu_proof/sp1024}
  SP8192=${SP8192:-.gpu_proof/sp8192}
fi

pack_logs() { tar -czf "$OUT/logs.tar.gz.tmp" --exclude='*.ptz' --exclude='./packed' --exclude='./sample' -C "$WORK" . \
  2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"; }

emit() {  # one summary line: to the file first, then to stdout
  echo "$1" >>"$SUMMARY"
  echo "== $1"
}

left() { python3 -c "import time; print(int($BUDGET_S - (time.time() - $START)))"; }

# run_stage NAME KIND TIMEOUT SCRIPT KNOB=VALUE... : train_gpt.py (or the packed copy) under `timeout`, then its line
run_stage() {
  local name=$1 kind=$2 limit=$(($3 * SCALE)) script=$4 rem t0 rc elapsed summary
  shift 4
  rem=$(left)
  if [ "$rem" -lt 20 ]; then
    emit "stage:$name status:skipped elapsed_s:0.0 reason:budget_spent(${BUDGET_S}s) at_s:$(now)"
    return 1
  fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  echo "== stage $name: timeout ${limit}s, started at $(now)s"
  t0=$(date +%s.%N)
  env "$@" RUN_ID="$name" LOG_DIR="$WORK/logs" ARTIFACT_PATH="$WORK/$name.ptz" \
    timeout -k 10 "$limit" python3 "$script" >"$WORK/$name.out" 2>&1
  rc=$?
  elapsed=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
  summary=$(python3 bench/gpu_proof.py run "$kind" "$name" "$WORK/logs/$name.txt" "$rc" "$elapsed" \
    --out "$WORK/$name.out" 2>>"$WORK/report_errors.out")
  [ -n "$summary" ] || summary="stage:$name status:$([ $rc = 124 ] || [ $rc = 137 ] && echo timeout || echo fail) \
elapsed_s:$elapsed rc:$rc note:no_report(see_report_errors.out)"
  emit "$summary at_s:$(now)"
  pack_logs
  case "$summary" in *"status:ok"*) return 0 ;; *) return 1 ;; esac
}

status=0
for stage in $STAGES; do
  case $stage in
  env)
    t0=$(date +%s.%N)
    { nvidia-smi 2>&1 || echo "no nvidia-smi"; } >"$WORK/env.out"
    line=$(timeout -k 5 $((30 * SCALE)) python3 bench/gpu_proof.py env env 2>>"$WORK/env.out") || status=1
    [ -n "$line" ] || line="stage:env status:fail elapsed_s:$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')") note:env_probe_died"
    emit "$line at_s:$(now)"
    pack_logs
    ;;
  smoke)
    run_stage smoke smoke 180 train_gpt.py "DATA_PATH=$SP1024" "TOKENIZER_PATH=$SP1024/tokenizer.model" \
      AUTO_FIT=0 MAX_WALLCLOCK_SECONDS=60 WARMUP_STEPS=3 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=10 \
      VAL_MAX_TOKENS=131072 TTT=1 TTT_MODE=chunked TTT_EPOCHS=1 TTT_CHUNK_TOKENS=32768 \
      "${SHORT[@]}" "${TINY[@]}" || status=1
    ;;
  speed)
    # timed: the 40 steps after step 5; QAT off (it would switch on mid-window), no GPTQ / TTT / budget search,
    # zstd level 3 and a small validation slice so the run ends soon after the timed steps
    SPEED=("DATA_PATH=$SP1024" "TOKENIZER_PATH=$SP1024/tokenizer.model" MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=3
           TRAIN_LOG_EVERY=5 VAL_LOSS_EVERY=0 VAL_MAX_TOKENS=65536 TTT=0 SLIDING_EVAL=0 GPTQ=0 AUTO_FIT=0 QAT=0
           ZSTD_LEVEL=3)
    run_stage speed_default speed 100 train_gpt.py "${SPEED[@]}" "${SPEED_LEN[@]}" "${TINY[@]}" || status=1
    packed=train_gpt.py
    if python3 bench/pack_code.py --out "$WORK/packed/train_gpt.py" 2>"$WORK/pack.out"; then
      packed=$WORK/packed/train_gpt.py
    fi
    run_stage speed_naive speed 80 "$packed" PRESET=naive_baseline "${SPEED[@]}" QUANT_ATTN_BITS=6 QUANT_MLP_BITS=6 \
      "${SPEED_LEN[@]}" "${TINY[@]}" || status=1
    line=$(python3 bench/gpu_proof.py ratio speed_ratio "$WORK/logs/speed_default.txt" "$WORK/logs/speed_naive.txt" \
      2>>"$WORK/report_errors.out")
    emit "${line:-stage:speed_ratio status:fail elapsed_s:0.0 note:no_report} at_s:$(now)"
    ;;
  frontier)
    run_stage frontier frontier 150 train_gpt.py PRESET=frontier "DATA_PATH=$SP8192" \
      "TOKENIZER_PATH=$SP8192/tokenizer.model" AUTO_FIT=0 QUANT_MLP_BITS=5 MAX_WALLCLOCK_SECONDS=60 WARMUP_STEPS=4 \
      VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=10 VAL_MAX_TOKENS=32768 TTT=1 TTT_MODE=phased TTT_LORA_DOCS=2 \
      TTT_PHASE_DOCS=4 TTT_PHASES=2 TTT_LORA_CHUNK=256 GPTQ_CALIB_TOKENS=262144 \
      "${SHORT[@]}" "${TINY[@]}" "${FRONTIER_TINY[@]}" || status=1
    ;;
  *) emit "stage:$stage status:fail elapsed_s:0.0 note:unknown_stage" ; status=1 ;;
  esac
done
pack_logs
echo "== gpu_proof: $(grep -c 'status:ok' "$SUMMARY") ok of $(wc -l <"$SUMMARY") lines in $(now)s; $SUMMARY:"
cat "$SUMMARY"
exit $status
