"""Build train/val shards and a 1024-piece tokenizer from the embedded sample.

    python data/build_sample.py            # -> data/sample_build/ (git-ignored)
    python data/build_sample.py --force    # rebuild even if up to date
    python data/build_sample.py --vocab-size 8192 --out /tmp/sample_sp8192   # sp8192-style, ~3 s
    python data/build_sample.py --caseops --out /tmp/sample_caseops   # CaseOps shards + val byte sidecar

Reads data/sample/sample_train.jsonl.zst and sample_val.jsonl.zst (see
data/sample/SOURCE.md) and the committed tokenizer data/sample/sample_1024_bpe.model
(a 1024-piece BPE with the challenge settings, trained on sample_train by
`--retrain-tokenizer`, which takes about a second) and writes, in ~2 s on 2 cores:

    data/sample_build/fineweb_train_000000.bin ...   (1M-token shards)
    data/sample_build/fineweb_val_000000.bin
    data/sample_build/tokenizer.model
    data/sample_build/meta.json

Any other --vocab-size (4096, 8192, ...: exactly that many pieces, byte
fallback and the challenge settings, see build_shards.py) trains a tokenizer on
sample_train first, in about a second (its 6.5M characters are enough for any
size up to 65536).

The build is deterministic (same shard bytes every time) and idempotent: if
meta.json and all shards it lists exist, were built with the same settings and
are newer than the sample, the tokenizer and the build scripts, nothing is done.
--caseops [--caseops-scheme NAME] builds CaseOps data instead (see build_shards.py --caseops): a
tokenizer of --vocab-size pieces trained on the transformed sample, transformed shards and the val
byte sidecar fineweb_val_bytes_000000.bin (about 10 s at 1024 pieces on 2 busy cores; the tests'
CaseOps fixture).

Importable: build_sample(out=..., force=..., caseops_scheme=None) -> meta dict, and the quick
test fixture build_caseops_sample(out) -> meta dict (CaseOps tokenizer trained on 2M characters,
all 222 val documents in 3 shards with their 3 byte sidecars, 200k train tokens; a few seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from .build_shards import build, print_summary
except ImportError:  # run as a script, or with data/ on sys.path
    from build_shards import build, print_summary

HERE = Path(__file__).resolve().parent
SAMPLE_TRAIN = HERE / "sample" / "sample_train.jsonl.zst"
SAMPLE_VAL = HERE / "sample" / "sample_val.jsonl.zst"
SAMPLE_TOKENIZER = HERE / "sample" / "sample_1024_bpe.model"  # trained on sample_train by this script
DEFAULT_OUT = HERE / "sample_build"
SOURCES = [SAMPLE_TRAIN, SAMPLE_VAL, SAMPLE_TOKENIZER, HERE / "caseops.py",
           HERE / "build_shards.py", HERE / "shard_io.py", Path(__file__).resolve()]


def up_to_date(out: Path, shard_tokens: int, vocab_size: int, tokenizer_source: str,
               caseops_scheme: str | None = None) -> dict | None:
    """Return the existing meta dict if `out` holds a complete build, with the same
    settings, newer than its sources; else None."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        outputs = [out / n for split in ("train", "val") for n in meta[split]["shards"]] + [out / "tokenizer.model"]
    except (ValueError, KeyError, TypeError):
        return None
    if (meta.get("shard_tokens"), meta.get("vocab_size"), meta.get("tokenizer_source")) != \
            (shard_tokens, vocab_size, tokenizer_source):
        return None
    if (meta.get("caseops") or {}).get("scheme") != caseops_scheme:
        return None
    outputs += [out / n for n in meta["val"].get("byte_sidecars", [])]
    if not all(p.is_file() for p in outputs):
        return None
    oldest = min(p.stat().st_mtime for p in outputs + [meta_path])
    newest_source = max(p.stat().st_mtime for p in SOURCES if p.exists())
    return meta if oldest >= newest_source else None


def build_sample(out=DEFAULT_OUT, force: bool = False, shard_tokens: int = 1_000_000,
                 vocab_size: int = 1024, retrain: bool = False, quiet: bool = False,
                 caseops_scheme: str | None = None) -> dict:
    """Build (or reuse) the sample shards in `out`; return the meta dict.

    Uses the committed data/sample/sample_1024_bpe.model unless `retrain` or
    vocab_size != 1024, in which case a tokenizer is trained on the sample.
    caseops_scheme (e.g. "caseops_v1"): CaseOps shards + val byte sidecar, with a CaseOps tokenizer
    trained on the transformed sample.
    """
    out = Path(out)
    tokenizer = None if (retrain or vocab_size != 1024 or caseops_scheme
                         or not SAMPLE_TOKENIZER.is_file()) else SAMPLE_TOKENIZER
    source = str(tokenizer) if tokenizer else "trained"
    meta = None if force else up_to_date(out, shard_tokens, vocab_size, source, caseops_scheme)
    if meta is not None:
        if not quiet:
            print(f"{out} is up to date (use --force to rebuild)")
        return meta
    meta = build([SAMPLE_TRAIN], out, val_input=[SAMPLE_VAL], tokenizer=tokenizer, vocab_size=vocab_size,
                 shard_tokens=shard_tokens, overwrite=True, caseops_scheme=caseops_scheme)
    if not quiet:
        print_summary(meta)
    return meta


def build_caseops_sample(out, scheme: str = "caseops_v1", vocab_size: int = 1024,
                         max_train_tokens: int = 200_000, tokenizer_chars: int = 2_000_000,
                         shard_tokens: int = 100_000, threads: int | None = 1) -> dict:
    """A small CaseOps build of the embedded sample in `out` (always rebuilt), for tests: every val
    document (several shards, each with its byte sidecar), a cut train split; returns the meta dict."""
    return build([SAMPLE_TRAIN], out, val_input=[SAMPLE_VAL], vocab_size=vocab_size, shard_tokens=shard_tokens,
                 max_train_tokens=max_train_tokens, tokenizer_chars=tokenizer_chars, threads=threads,
                 overwrite=True, caseops_scheme=scheme)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output dir (default data/sample_build)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the outputs are up to date")
    ap.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard (default 1M)")
    ap.add_argument("--vocab-size", type=int, default=1024,
                    help="tokenizer size (default 1024); any other, e.g. 4096 or 8192, implies --retrain-tokenizer")
    ap.add_argument("--retrain-tokenizer", action="store_true",
                    help="train a tokenizer on the sample instead of using data/sample/sample_1024_bpe.model")
    ap.add_argument("--caseops", action="store_true", help="CaseOps shards + val byte sidecar (trains a tokenizer)")
    ap.add_argument("--caseops-scheme", default="caseops_v1", help="CaseOps variant (see build_shards.py)")
    args = ap.parse_args()
    try:
        build_sample(args.out, args.force, args.shard_tokens, args.vocab_size, args.retrain_tokenizer,
                     caseops_scheme=args.caseops_scheme if args.caseops else None)
    except (OSError, ValueError) as e:
        sys.exit(f"build_sample: error: {e}")


if __name__ == "__main__":
    main()
