#!/usr/bin/env bash
# Small-scale CPU side-by-sides on the stand-in corpus (README, "Frontier before and after; CaseOps vs plain"):
# PRESET=frontier,short at 4x128 (loops 1-2, two lanes from layer 2), seq 256, 4,096 tokens a step, a fixed number
# of steps, TTT off, scored on the round trip over the first DOCS validation documents.
#   bash bench/sxs_cpu.sh build OUT                      # sp8192 shards: plain (nmt_nfkc), plain identity, CaseOps
#   bash bench/sxs_cpu.sh run CODE_DIR NAME SEED DATA OUT [KNOB=VALUE ...]
set -euo pipefail
W=${CORPUS:-../shared/corpus/wikipedia}
if [ "$1" = build ]; then
  OUT=$2
  for cfg in "plain_nfkc:" "plain_id:--normalization identity" "caseops:--caseops"; do
    name=${cfg%%:*}; flags=${cfg#*:}
    # shellcheck disable=SC2086
    python3 data/build_shards.py "$W/train_000.jsonl.zst" --val-input "$W/val_000.jsonl.zst" --out "$OUT/full_$name" \
      --vocab-size 8192 --byte-sidecar $flags
    # plain_nfkc keeps no sidecar: the "before" code of the frontier pair predates sidecars (bytes from the tables)
    python3 - "$OUT/full_$name" "$OUT/$name" "${DOCS:-40}" "$name" <<'PY'
import os, sys
import numpy as np
src, dst, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(dst, exist_ok=True)
for name in ("fineweb_train_000000.bin", "tokenizer.model"):
    if not os.path.exists(os.path.join(dst, name)):
        os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
def read(p):
    h = np.fromfile(p, dtype="<i4", count=256)
    return h, np.fromfile(p, dtype="<u2", offset=1024, count=int(h[2]))
def write(p, header, arr):
    header = header.copy(); header[2] = len(arr)
    with open(p, "wb") as f:
        f.write(header.astype("<i4").tobytes()); f.write(arr.astype("<u2").tobytes())
h, tok = read(os.path.join(src, "fineweb_val_000000.bin"))
bos = np.flatnonzero(tok == 1)
end = bos[k] if k < len(bos) else len(tok)  # the first k documents
write(os.path.join(dst, "fineweb_val_000000.bin"), h, tok[:end])
hs, cnt = read(os.path.join(src, "fineweb_val_bytes_000000.bin"))
if sys.argv[4] != "plain_nfkc":
    write(os.path.join(dst, "fineweb_val_bytes_000000.bin"), hs, cnt[:end])
print(dst, "tokens", end, "bytes", int(cnt[:end].sum()))
PY
  done
  exit 0
fi
shift; CODE=$1 NAME=$2 SEED=$3 DATA=$4 OUT=$5; shift 5
mkdir -p "$OUT"
cd "$CODE"
env PRESET=frontier,short NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 \
  EVAL_STRIDE=64 TRAIN_BATCH_TOKENS=4096 ITERATIONS="${STEPS:-120}" MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=0 \
  VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=20 SLIDING_EVAL=0 TTT=0 PASSTHROUGH_MAX_NUMEL=16384 LOOP_START=1 LOOP_END=2 \
  PARALLEL_RESID_FROM=2 XSA_LAST_N=4 SEED="$SEED" DATA_PATH="$DATA" TOKENIZER_PATH="$DATA/tokenizer.model" \
  LOG_DIR="$OUT" RUN_ID="${NAME}_s$SEED" ARTIFACT_PATH="$OUT/${NAME}_s$SEED.ptz" OMP_NUM_THREADS=1 "$@" \
  python3 train_gpt.py > "$OUT/${NAME}_s$SEED.stdout" 2>&1
grep -E "^(params|training stopped|pre_quant|final_|bytes_total)" "$OUT/${NAME}_s$SEED.txt" | sed "s/^/$NAME s$SEED: /"
