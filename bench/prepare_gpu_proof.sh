#!/usr/bin/env bash
# Build, on this machine, everything bench/gpu_proof.sh needs on the device that the tree does not carry:
#   .gpu_proof/sp1024/  the challenge's sp1024 tokenizer; train shard = the first TRAIN_TOKENS_1024 (8M) tokens of
#                       the stand-in train_000, val shard = the first VAL_DOCS (120) articles of val_000
#   .gpu_proof/sp8192/  an 8192-piece tokenizer trained by data/build_shards.py on the first 20M characters of
#                       train_000; train shard = its first TRAIN_TOKENS_8192 (6M) tokens, val = the same articles
#   .whl/zstandard-*.whl  for the device's Python 3.12 (its image has no zstandard)
# Both folders are git-ignored and travel as `carry` paths. Prints the sizes; fails if the tree plus both folders
# pass LIMIT_MIB (60; the device tool takes 64 MiB). Usage, from anywhere:
#   bash bench/prepare_gpu_proof.sh            # skips what is already built (--force rebuilds)
# CORPUS=DIR (default /work/shared/corpus/wikipedia), TOKENIZER_1024=PATH (default
# /work/shared/tokenizers/fineweb_1024_bpe.model), ZSTD_VERSION (default: this machine's zstandard).
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${CORPUS:-/work/shared/corpus/wikipedia}
TOKENIZER_1024=${TOKENIZER_1024:-/work/shared/tokenizers/fineweb_1024_bpe.model}
VAL_DOCS=${VAL_DOCS:-120}
TRAIN_TOKENS_1024=${TRAIN_TOKENS_1024:-8000000}
TRAIN_TOKENS_8192=${TRAIN_TOKENS_8192:-6000000}
LIMIT_MIB=${LIMIT_MIB:-60}
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
DEST=.gpu_proof
VAL_JSONL=${TMPDIR:-/tmp}/gpu_proof_val_docs.jsonl  # the validation articles' text, input to both builds
mkdir -p "$DEST"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ ! -s "$VAL_JSONL" ] || [ $FORCE = 1 ]; then
  python3 - "$CORPUS/val_000.jsonl.zst" "$VAL_JSONL" "$VAL_DOCS" <<'EOF'
import io, sys, zstandard
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(src, "rb") as f, open(dst, "w", encoding="utf-8") as out:
    reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
    for i, line in enumerate(reader):
        if i >= n:
            break
        out.write(line if line.endswith("\n") else line + "\n")
print(f"prepare_gpu_proof: the first {n} validation articles of {src}")
EOF
fi

build() {  # DIR ARGS...
  local dir=$1
  shift
  if [ -s "$dir/fineweb_val_000000.bin" ] && [ -s "$dir/tokenizer.model" ] && [ $FORCE = 0 ]; then
    echo "prepare_gpu_proof: $dir already built"
    return
  fi
  python3 data/build_shards.py "$CORPUS/train_000.jsonl.zst" --val-input "$VAL_JSONL" --out "$dir" \
    --overwrite "$@"
}
build "$DEST/sp1024" --tokenizer "$TOKENIZER_1024" --max-train-tokens "$TRAIN_TOKENS_1024"
build "$DEST/sp8192" --vocab-size 8192 --tokenizer-chars 20000000 --max-train-tokens "$TRAIN_TOKENS_8192"

if ! ls .whl/zstandard-*.whl >/dev/null 2>&1; then
  version=${ZSTD_VERSION:-$(python3 -c "import zstandard; print(zstandard.__version__)")}
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "zstandard==$version"
fi

# what a device call carries: tracked files + untracked files git does not ignore + the carried folders
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r du -cb 2>/dev/null \
  | awk '/\ttotal$/ {s += $1} END {print s + 0}')
data=$(du -sb "$DEST" | cut -f1)
wheels=$(du -sb .whl | cut -f1)
total=$((tree + data + wheels))
python3 - "$tree" "$data" "$wheels" "$total" "$LIMIT_MIB" <<'EOF'
import sys
tree, data, wheels, total, limit = map(int, sys.argv[1:])
mib = lambda n: f"{n / 2**20:.1f} MiB"
print(f"prepare_gpu_proof: tree {mib(tree)} + .gpu_proof {mib(data)} + .whl {mib(wheels)} = {mib(total)} "
      f"(limit {limit} MiB; the device tool takes 64 MiB)")
sys.exit(0 if total <= limit * 2**20 else 1)
EOF
du -sh "$DEST"/* .whl/* | sed 's/^/prepare_gpu_proof:   /'
