#!/usr/bin/env bash
# CPU side-by-side of the presets at one wall clock and small dims (stand-in corpus, not FineWeb):
#   bash bench/presets_cpu.sh SP1024_DIR SP8192_DIR OUT_DIR SEED [SECONDS]
# Each preset runs with the same small shape (6 x 192, seq 256, 8,192 tokens/step), the same training wall clock
# and TTT and the sliding pass off (the comparison is of training and export, scored on the round trip). The frontier's
# layer indices are scaled to 6 layers: loop over layers 2-3 (its 3-5 of 11), parallel lanes from layer 4 (its 8),
# XSA on every layer (as its 11 of 11). "short" (the baseline's faster optimizer settings) is added to seed and
# frontier, because a few hundred steps are far from the ~7,000 their own settings are tuned for.
# GPTQ_RESERVE_SECONDS=30: a CPU step takes seconds, and a run fails when training + calibration pass the clock.
set -euo pipefail
SP1024=$1 SP8192=$2 OUT=$3 SEED=$4 SECONDS_=${5:-180}
mkdir -p "$OUT"
COMMON="NUM_LAYERS=6 MODEL_DIM=192 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 EVAL_STRIDE=64
 TRAIN_BATCH_TOKENS=8192 MAX_WALLCLOCK_SECONDS=$SECONDS_ WARMUP_STEPS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50
 SLIDING_EVAL=0 TTT=0 GPTQ_CALIB_TOKENS=8192 GPTQ_RESERVE_SECONDS=30 PASSTHROUGH_MAX_NUMEL=16384 SEED=$SEED"
run() {  # name data_dir knobs...
  local name=$1 data=$2; shift 2
  env $COMMON "$@" DATA_PATH="$data" TOKENIZER_PATH="$data/tokenizer.model" LOG_DIR="$OUT" RUN_ID="${name}_s$SEED" \
    ARTIFACT_PATH="$OUT/${name}_s$SEED.ptz" OMP_NUM_THREADS=1 python3 train_gpt.py > /dev/null
  grep -E "^(training stopped|pre_quant|final_|bytes_total)" "$OUT/${name}_s$SEED.txt" | sed "s/^/$name s$SEED: /"
}
run naive_baseline "$SP1024" PRESET=naive_baseline
run seed_short "$SP1024" PRESET=seed,short BIGRAM_BUCKETS=2048 BIGRAM_DIM=64 XSA_LAST_N=2
run frontier_short "$SP8192" PRESET=frontier,short LOOP_START=2 LOOP_END=3 PARALLEL_RESID_FROM=4 XSA_LAST_N=6
