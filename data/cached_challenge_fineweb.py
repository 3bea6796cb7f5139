"""Download the published Parameter Golf FineWeb export (pre-tokenized shards + tokenizer).

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80
    python data/cached_challenge_fineweb.py --variant sp8192 --train-shards 1 --dry-run   # list only, no network
    python data/cached_challenge_fineweb.py --variant sp8192_caseops --train-shards 80
    python data/cached_challenge_fineweb.py --variant docs --dry-run   # raw documents for build_shards.py

Variants (each from the Hugging Face dataset repo its records used):

    sp1024         willdepueoai/parameter-golf      the challenge's own export and the scored default
    byte260        willdepueoai/parameter-golf      raw bytes (260 ids), same repo
    sp4096         kevclark/parameter-golf          4096-piece BPE (the V4K record and later SP4096 ones)
    sp8192         kevclark/parameter-golf          8192-piece BPE (the SP8K record and the SP8192 ones after it)
    sp8192_caseops romeerp/parameter-golf-caseops-v1  the CaseOps records' export (2026-04-18 onward, PR #1729):
                   8192-piece CaseOps tokenizer, transformed shards and the val byte sidecar
    docs           willdepueoai/parameter-golf      the raw documents (docs_selected.jsonl, the frozen shuffled
                   FineWeb list every export was cut from; val = its first 50,000 documents), to build
                   our own CaseOps (or any) shards: data/build_shards.py ... --caseops

The CaseOps export lives under <root>/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/
(fineweb_train_*.bin, fineweb_val_000000.bin and its byte sidecar fineweb_val_bytes_000000.bin) with
<root>/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model; locally it keeps that
dataset name. Its val_bpb must divide by the sidecar (shard_io.read_byte_sidecars), never by the
piece byte tables. Two differences from what build_shards.py --caseops makes: that tokenizer
normalizes with nmt_nfkc (whitespace runs collapse, newlines become spaces) while ours is
identity-normalized, and its sidecar gives each piece the bytes of its source span in the raw text
(so collapsed whitespace is charged to the next piece, and whitespace at a document's ends is not
counted) while ours charges exactly the bytes each token spells. The sidecar file format is the same.
The raw docs file holds every document of the export (large); its first 50,000 lines are the
validation documents, docs go to the --local-dir root (data/docs_selected.jsonl).

Any other --variant is an error that lists these. Every repo keeps its export
under the remote root folder `datasets/`:

    <root>/datasets/fineweb10B_<variant>/fineweb_val_000000.bin
    <root>/datasets/fineweb10B_<variant>/fineweb_train_000000.bin ... (100M tokens each)
    <root>/tokenizers/fineweb_<V>_bpe.model (+ .vocab)   e.g. fineweb_8192_bpe.model
    <root>/manifest.json

--repo-id / --remote-root (or, as in the records' READMEs, the environment
variables MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX) override
the variant's source.

Shards land in data/datasets/fineweb10B_<variant>/, tokenizer files in
data/tokenizers/ (both git-ignored). Files already present are kept (after a
header check). Every shard is checked with shard_io's header/size validation;
a bad download is deleted and reported. Uses huggingface_hub.hf_hub_download
when installed, otherwise plain HTTPS from huggingface.co. If the export's
manifest.json can be fetched, its shard counts are used to validate
--train-shards and to set the number of validation shards (the default repo's
manifest is cached as data/manifest.json, another repo's as
data/manifest.<owner>--<name>.json, so the two never mix).

To train on a larger vocabulary, point train_gpt.py at it, e.g. for sp8192:

    VOCAB_SIZE=8192 DATA_PATH=./data/datasets/fineweb10B_sp8192 \\
        TOKENIZER_PATH=./data/tokenizers/fineweb_8192_bpe.model torchrun ... train_gpt.py
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

try:
    from .shard_io import read_header
except ImportError:  # run as a script, or with data/ on sys.path
    from shard_io import read_header

REPO_ID = "willdepueoai/parameter-golf"      # the challenge's own export (sp1024, byte260)
LARGE_VOCAB_REPO_ID = "kevclark/parameter-golf"  # sp4096 / sp8192, as the records' READMEs download them
REMOTE_ROOT = "datasets"
DATA_DIR = Path(__file__).resolve().parent

CASEOPS_REPO_ID = "romeerp/parameter-golf-caseops-v1"  # the CaseOps records' export (PR #1729)
CASEOPS_DATASET = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")  # under <root>/, in REPO_ID

# variant -> (dataset repo, vocabulary size, tokenizer files under <root>/tokenizers/)
VARIANTS: dict[str, tuple[str, int, tuple[str, ...]]] = {
    "sp1024": (REPO_ID, 1024, ("fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab")),
    "byte260": (REPO_ID, 260, ("fineweb_pure_byte_260.json",)),
    "sp4096": (LARGE_VOCAB_REPO_ID, 4096, ("fineweb_4096_bpe.model", "fineweb_4096_bpe.vocab")),
    "sp8192": (LARGE_VOCAB_REPO_ID, 8192, ("fineweb_8192_bpe.model", "fineweb_8192_bpe.vocab")),
    "sp8192_caseops": (CASEOPS_REPO_ID, 8192, ("fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",)),
    "docs": (REPO_ID, 0, ()),
}
# variants whose val shards come with byte sidecars (fineweb_val_bytes_*.bin)
SIDECAR_VARIANTS = {"sp8192_caseops"}


def _variant(variant: str) -> tuple[str, int, tuple[str, ...]]:
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r}; known variants: {', '.join(VARIANTS)}") from None


def dataset_name(variant: str) -> str:
    """The export's folder under datasets/ (also the local one)."""
    _variant(variant)
    return CASEOPS_DATASET if variant == "sp8192_caseops" else f"fineweb10B_{variant}"


def tokenizer_files(variant: str) -> list[str]:
    return list(_variant(variant)[2])


def default_repo(variant: str) -> str:
    """The Hugging Face dataset repo that publishes `variant`."""
    return _variant(variant)[0]


def vocab_size(variant: str) -> int:
    return _variant(variant)[1]


def manifest_name(repo_id: str) -> str:
    """Local cache name of a repo's manifest.json (the default repo's keeps the plain name)."""
    return "manifest.json" if repo_id == REPO_ID else f"manifest.{repo_id.replace('/', '--')}.json"


def plan(variant: str, train_shards: int, val_shards: int, root: str, local: Path) -> list[tuple[str, Path]]:
    """(remote path, local path) for every file to fetch, val shards (each before its byte sidecar) first."""
    prefix = f"{root.strip('/')}/" if root.strip("/") else ""
    ds = dataset_name(variant)
    if variant == "docs":
        return [(f"{prefix}{name}", local / name) for name in DOCS_FILES]
    names = [f"fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    if variant in SIDECAR_VARIANTS:
        names = [n for i in range(val_shards) for n in (f"fineweb_val_{i:06d}.bin", f"fineweb_val_bytes_{i:06d}.bin")]
    files = [(f"{prefix}datasets/{ds}/{n}", local / "datasets" / ds / n) for n in names]
    files += [(f"{prefix}datasets/{ds}/fineweb_train_{i:06d}.bin",
               local / "datasets" / ds / f"fineweb_train_{i:06d}.bin") for i in range(train_shards)]
    files += [(f"{prefix}tokenizers/{name}", local / "tokenizers" / name) for name in tokenizer_files(variant)]
    return files


def fetch(repo_id: str, remote: str, dest: Path) -> None:
    """Download one file of the dataset repo to `dest` (atomic rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        hf_hub_download = None
    if hf_hub_download is not None:
        cached = Path(hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset")).resolve()
        try:
            os.link(cached, tmp)  # same filesystem: no second copy
        except OSError:
            shutil.copyfile(cached, tmp)
    else:
        url = f"https://huggingface.co/datasets/{repo_id}/resolve/main/{remote}"
        req = urllib.request.Request(url, headers={"User-Agent": "parameter-golf-data/1.0"})
        with urllib.request.urlopen(req, timeout=60) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f, length=1 << 20)
    os.replace(tmp, dest)


def verify(path: Path) -> None:
    if path.suffix == ".bin":
        read_header(path)  # raises ValueError naming the file
    elif path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")


def read_manifest(repo_id: str, root: str, local: Path, variant: str) -> dict | None:
    """Fetch <root>/manifest.json and return this variant's stats, or None if unavailable."""
    prefix = f"{root.strip('/')}/" if root.strip("/") else ""
    dest = local / manifest_name(repo_id)

    def entry(manifest: dict) -> dict | None:
        for e in manifest.get("datasets", []):
            if e.get("name") == dataset_name(variant):
                return e.get("stats") or {}
        return None

    try:
        cached = dest.is_file()
        if not cached:
            fetch(repo_id, f"{prefix}manifest.json", dest)
        manifest = json.loads(dest.read_text())
        if entry(manifest) is None and cached:  # a stale cached copy: fetch it once more
            dest.unlink()
            fetch(repo_id, f"{prefix}manifest.json", dest)
            manifest = json.loads(dest.read_text())
    except Exception as e:  # the manifest is optional
        print(f"note: no manifest.json ({type(e).__name__}: {e}); using --val-shards", file=sys.stderr)
        return None
    return entry(manifest)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sp1024",
                    help=f"tokenizer family: {', '.join(VARIANTS)} (default sp1024; docs: the raw documents)")
    ap.add_argument("--train-shards", type=int, default=80, help="number of training shards (default 80)")
    ap.add_argument("--val-shards", type=int, default=1,
                    help="validation shards if the manifest cannot be read (default 1)")
    ap.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID"),
                    help=f"Hugging Face dataset repo (default: the variant's, {REPO_ID} for sp1024/byte260, "
                         f"{LARGE_VOCAB_REPO_ID} for sp4096/sp8192; env MATCHED_FINEWEB_REPO_ID)")
    ap.add_argument("--remote-root", default=os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", REMOTE_ROOT),
                    help=f"folder of the export inside the repo (default {REMOTE_ROOT!r}; '' for the repo root; "
                         "env MATCHED_FINEWEB_REMOTE_ROOT_PREFIX)")
    ap.add_argument("--local-dir", type=Path, default=DATA_DIR, help="where datasets/ and tokenizers/ go (default data/)")
    ap.add_argument("--dry-run", action="store_true", help="print the files that would be fetched and exit")
    args = ap.parse_args(argv)
    if args.train_shards < 0 or args.val_shards < 0:
        ap.error("shard counts must be >= 0")
    try:
        tokenizer_files(args.variant)
    except ValueError as e:
        ap.error(str(e))
    if not args.repo_id:
        args.repo_id = default_repo(args.variant)

    val_shards = args.val_shards
    if not args.dry_run and args.variant != "docs":
        stats = read_manifest(args.repo_id, args.remote_root, args.local_dir, args.variant)
        if stats:
            val_shards = int(stats.get("files_val", val_shards))
            available = stats.get("files_train")
            if available is not None and args.train_shards > int(available):
                sys.exit(f"error: {args.variant} has only {available} train shards, asked for {args.train_shards}")
    files = plan(args.variant, args.train_shards, val_shards, args.remote_root, args.local_dir)
    if args.dry_run:
        print(f"would fetch {len(files)} files from hf://datasets/{args.repo_id}:")
        for remote, dest in files:
            print(f"  {remote} -> {dest}")
        _print_next_step(args.variant, args.local_dir, file=sys.stderr)  # stdout stays the bare listing
        return

    for n, (remote, dest) in enumerate(files, 1):
        if dest.is_file():
            try:
                verify(dest)
                print(f"[{n}/{len(files)}] ok (present) {dest}")
                continue
            except ValueError as e:
                print(f"[{n}/{len(files)}] re-downloading bad file: {e}")
                dest.unlink()
        print(f"[{n}/{len(files)}] fetching {remote}")
        try:
            fetch(args.repo_id, remote, dest)
            verify(dest)
        except ValueError as e:
            dest.unlink(missing_ok=True)
            sys.exit(f"error: downloaded file failed the shard check: {e}")
        except Exception as e:
            sys.exit(f"error: could not download {remote} from {args.repo_id}: {type(e).__name__}: {e}")
    print(f"done: {len(files)} files under {args.local_dir}")
    _print_next_step(args.variant, args.local_dir)


def _print_next_step(variant: str, local: Path, file=None) -> None:
    if variant == "docs":
        print(f"then build CaseOps shards (val = the first 50,000 documents, as the records): python "
              f"data/build_shards.py {local / DOCS_FILES[0]} --val-docs 50000 --caseops --vocab-size 8192 "
              f"--out {local / 'datasets' / 'fineweb10B_sp8192_caseops_ours'} (add --max-train-tokens N to stop early)", file=file)
    elif variant.startswith("sp") and variant != "sp1024":
        ds = local / "datasets" / dataset_name(variant)
        print(f"train with: VOCAB_SIZE={vocab_size(variant)} DATA_PATH={ds} "
              f"TOKENIZER_PATH={local / 'tokenizers' / tokenizer_files(variant)[0]}"
              + (" (val_bpb from the byte sidecar fineweb_val_bytes_*.bin)" if variant in SIDECAR_VARIANTS else ""),
              file=file)


if __name__ == "__main__":
    main()
