#!/usr/bin/env bash
# The first-GPU proof (issue 10), one command for one short lease. Run from the repository root on the device:
#   bash bench/gpu_proof.sh                      # smoke + baseline-shape speed (about 6-8 min on one H100)
#   FULL=1 bash bench/gpu_proof.sh               # + the default config for FULL_SECONDS (default 300) of training
#   REHEARSE=1 bash bench/gpu_proof.sh           # CPU rehearsal with tiny knobs (what to run before a device call)
# Data: SHARDS=DIR (carried shards with tokenizer.model), else shards are built from ../shared/corpus/wikipedia
# (val_000 + train_000, tokenized with the challenge's sp1024) into /tmp/gpu_proof_shards. zstandard: installed
# from a carried wheel under ./.whl/ when the image lacks it. Everything lands in $OUT (default bench/out/gpu_proof):
# one JSON line per run (results.jsonl), each run's log, stdout and artifact, versions.txt and a summary table.
# Stand-in corpus numbers are not FineWeb scores.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu_proof}
mkdir -p "$OUT"
python3 -c "import zstandard" 2>/dev/null || python3 -m pip install -q --no-index --find-links ./.whl zstandard
python3 - <<'EOF' | tee "$OUT/versions.txt"
import torch, numpy, sentencepiece, zstandard
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
print("numpy", numpy.__version__, "sentencepiece", sentencepiece.__version__, "zstandard", zstandard.__version__)
EOF
if [ -n "${SHARDS:-}" ]; then
  DATA=(--data-path "$SHARDS")
else
  CORPUS=${CORPUS:-../shared/corpus/wikipedia}
  DATA=(--corpus "$CORPUS/train_000.jsonl.zst" --val-corpus "$CORPUS/val_000.jsonl.zst"
        --tokenizer ../shared/tokenizers/fineweb_1024_bpe.model --shards-dir /tmp/gpu_proof_shards)
fi
BENCH=(python3 bench/run_bench.py "${DATA[@]}" --nproc 1 --out-dir "$OUT/runs" --out-jsonl "$OUT/results.jsonl")
if [ "${REHEARSE:-0}" = 1 ]; then  # tiny shapes on CPU: the same commands, seconds each
  TINY=(--knob DEVICE=cpu --knob NUM_LAYERS=2 --knob MODEL_DIM=64 --knob NUM_HEADS=4 --knob NUM_KV_HEADS=2
        --knob TRAIN_SEQ_LEN=64 --knob EVAL_SEQ_LEN=64 --knob TRAIN_BATCH_TOKENS=4096 --knob BIGRAM_BUCKETS=256
        --knob BIGRAM_DIM=16 --knob XSA_LAST_N=1 --knob GPTQ_CALIB_TOKENS=256 --knob PASSTHROUGH_MAX_NUMEL=1024
        --knob VAL_BATCH_SEQS=8 --knob TTT_BATCH_SEQS=8 --knob TTT_CHUNK_TOKENS=4096 --knob GPTQ_RESERVE_SECONDS=20)
  SMOKE_S=30 SPEED_S=20
else
  TINY=()
  SMOKE_S=60 SPEED_S=120
fi
status=0
# 1. smoke: the default config compiled, a short training, export, round trip, sliding window, a short TTT
"${BENCH[@]}" "${TINY[@]}" --seconds "$SMOKE_S" --timeout 900 --config \
  smoke=VAL_MAX_TOKENS=262144,TTT_EPOCHS=1,TTT_CHUNK_TOKENS=65536,SLIDING_EVAL=1,VAL_LOSS_EVERY=0 || status=1
# 2. speed at the naive baseline's shape (reference on 1xH100: 353 ms/step, 1.48M tokens/s, 10.3 GiB)
"${BENCH[@]}" "${TINY[@]}" --seconds "$SPEED_S" --timeout 600 --config \
  baseline_shape=PRESET=naive_baseline,VAL_MAX_TOKENS=262144,VAL_LOSS_EVERY=0 || status=1
# 3. optional: the default config for longer (8-step gradient accumulation: ~1/8 of an 8xH100 run's steps)
if [ "${FULL:-0}" = 1 ]; then
  "${BENCH[@]}" "${TINY[@]}" --seconds "${FULL_SECONDS:-300}" --timeout 1200 --config \
    default=VAL_MAX_TOKENS=1048576,SLIDING_EVAL=1,VAL_LOSS_EVERY=0 || status=1
fi
python3 bench/run_bench.py --table-only --out-jsonl "$OUT/results.jsonl" | tee "$OUT/summary.md"
exit $status
