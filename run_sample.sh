#!/usr/bin/env bash
# Smoke run on the embedded sample, CPU-sized: builds the sample shards (seconds), trains a tiny model for
# about a minute, exports the artifact and prints val_bpb. Sample-data scores are not FineWeb scores.
# Any knob can be overridden from the environment, e.g. `ITERATIONS=200 bash run_sample.sh`.
set -euo pipefail
cd "$(dirname "$0")"
python3 data/build_sample.py
export DATA_PATH="${DATA_PATH:-data/sample_build}" TOKENIZER_PATH="${TOKENIZER_PATH:-data/sample_build/tokenizer.model}"
export NUM_LAYERS="${NUM_LAYERS:-4}" MODEL_DIM="${MODEL_DIM:-128}" NUM_HEADS="${NUM_HEADS:-4}" NUM_KV_HEADS="${NUM_KV_HEADS:-2}"
export TRAIN_SEQ_LEN="${TRAIN_SEQ_LEN:-128}" TRAIN_BATCH_TOKENS="${TRAIN_BATCH_TOKENS:-8192}" ITERATIONS="${ITERATIONS:-60}"
export MAX_WALLCLOCK_SECONDS="${MAX_WALLCLOCK_SECONDS:-0}" WARMUP_STEPS="${WARMUP_STEPS:-0}" VAL_LOSS_EVERY="${VAL_LOSS_EVERY:-20}"
export TRAIN_LOG_EVERY="${TRAIN_LOG_EVERY:-10}" VAL_MAX_TOKENS="${VAL_MAX_TOKENS:-16384}" EVAL_SEQ_LEN="${EVAL_SEQ_LEN:-128}"
export SLIDING_EVAL="${SLIDING_EVAL:-1}" EVAL_STRIDE="${EVAL_STRIDE:-32}" TTT_CHUNK_TOKENS="${TTT_CHUNK_TOKENS:-4096}" TTT_EPOCHS="${TTT_EPOCHS:-1}"
export BIGRAM_BUCKETS="${BIGRAM_BUCKETS:-1024}" BIGRAM_DIM="${BIGRAM_DIM:-32}" XSA_LAST_N="${XSA_LAST_N:-2}"
export GPTQ_CALIB_TOKENS="${GPTQ_CALIB_TOKENS:-2048}" PASSTHROUGH_MAX_NUMEL="${PASSTHROUGH_MAX_NUMEL:-4096}"
export AVERAGING="${AVERAGING:-ema}" EMA_DECAY="${EMA_DECAY:-0.9}" EMBED_LR="${EMBED_LR:-0.05}"
export LOG_DIR="${LOG_DIR:-logs}" ARTIFACT_PATH="${ARTIFACT_PATH:-final_model.ptz}"
python3 train_gpt.py
