"""Download the published Parameter Golf FineWeb export (pre-tokenized shards + tokenizer).

    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
    python data/cached_challenge_fineweb.py --train-shards 1 --dry-run   # list only, no network

Source: the Hugging Face dataset repo willdepueoai/parameter-golf, where the
export lives under the remote root folder `datasets/`:

    <root>/datasets/fineweb10B_sp1024/fineweb_val_000000.bin
    <root>/datasets/fineweb10B_sp1024/fineweb_train_000000.bin ... (100M tokens each)
    <root>/tokenizers/fineweb_1024_bpe.model (+ .vocab)

Shards land in data/datasets/fineweb10B_<variant>/, tokenizer files in
data/tokenizers/ (both git-ignored). Files already present are kept (after a
header check). Every shard is checked with shard_io's header/size validation;
a bad download is deleted and reported. Uses huggingface_hub.hf_hub_download
when installed, otherwise plain HTTPS from huggingface.co. If the export's
manifest.json can be fetched, its shard counts are used to validate
--train-shards and to set the number of validation shards.
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

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
DATA_DIR = Path(__file__).resolve().parent


def tokenizer_files(variant: str) -> list[str]:
    if variant.startswith("sp") and variant[2:].isdigit():
        return [f"fineweb_{variant[2:]}_bpe.model", f"fineweb_{variant[2:]}_bpe.vocab"]
    if variant == "byte260":
        return ["fineweb_pure_byte_260.json"]
    raise ValueError(f"unknown variant {variant!r}; expected sp<VOCAB> (e.g. sp1024) or byte260")


def plan(variant: str, train_shards: int, val_shards: int, root: str, local: Path) -> list[tuple[str, Path]]:
    """(remote path, local path) for every file to fetch, val shards first."""
    prefix = f"{root.strip('/')}/" if root.strip("/") else ""
    ds = f"fineweb10B_{variant}"
    files = [(f"{prefix}datasets/{ds}/fineweb_val_{i:06d}.bin", local / "datasets" / ds / f"fineweb_val_{i:06d}.bin")
             for i in range(val_shards)]
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
    dest = local / "manifest.json"
    try:
        if not dest.is_file():
            fetch(repo_id, f"{prefix}manifest.json", dest)
        manifest = json.loads(dest.read_text())
    except Exception as e:  # the manifest is optional
        print(f"note: no manifest.json ({type(e).__name__}: {e}); using --val-shards", file=sys.stderr)
        return None
    for entry in manifest.get("datasets", []):
        if entry.get("name") == f"fineweb10B_{variant}":
            return entry.get("stats") or {}
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sp1024", help="tokenizer family: sp1024 (default), sp4096, byte260, ...")
    ap.add_argument("--train-shards", type=int, default=80, help="number of training shards (default 80)")
    ap.add_argument("--val-shards", type=int, default=1,
                    help="validation shards if the manifest cannot be read (default 1)")
    ap.add_argument("--repo-id", default=REPO_ID, help=f"Hugging Face dataset repo (default {REPO_ID})")
    ap.add_argument("--remote-root", default=REMOTE_ROOT,
                    help=f"folder of the export inside the repo (default {REMOTE_ROOT!r}; '' for the repo root)")
    ap.add_argument("--local-dir", type=Path, default=DATA_DIR, help="where datasets/ and tokenizers/ go (default data/)")
    ap.add_argument("--dry-run", action="store_true", help="print the files that would be fetched and exit")
    args = ap.parse_args(argv)
    if args.train_shards < 0 or args.val_shards < 0:
        ap.error("shard counts must be >= 0")
    try:
        tokenizer_files(args.variant)
    except ValueError as e:
        ap.error(str(e))

    val_shards = args.val_shards
    if not args.dry_run:
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


if __name__ == "__main__":
    main()
