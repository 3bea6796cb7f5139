"""Check the val_bpb byte count of built shards against a direct UTF-8 count.

    python data/check_bytes.py /tmp/sp8192                       # val split, <dir>/tokenizer.model
    python data/check_bytes.py /tmp/sp8192 --split train --tokenizer tok.model
    python data/check_bytes.py /tmp/sp8192 --text val.jsonl.zst  # also compare with the raw input text

Reads the shards of one split (all of them, in order), cuts the stream into
documents at BOS and, for every document, compares three counts:

  direct    len(sp.decode(ids).encode("utf-8")): the bytes of the text after the
            tokenizer's normalisation (nmt_nfkc, whitespace runs collapsed,
            leading/trailing whitespace dropped), the reference;
  builder   build_shards.byte_tables + count_bpb_bytes (numpy, what meta.json's
            "bpb_bytes" holds);
  trainer   train_gpt.build_byte_luts + train_gpt.target_bytes (what val_bpb
            divides by), when train_gpt.py can be imported (needs torch).

Exit status 1 (and the first differing documents are printed) if any count
differs from the direct one. Only a tokenizer without byte fallback can make
them differ, through <unk> tokens (0 bytes by the challenge's rule). With --text, the documents of the input file(s)
are matched one to one with the shard's documents, and the raw UTF-8 bytes and
the documents whose normalised text differs from the raw text are reported
(a difference there is expected: val_bpb charges the normalised bytes).

Byte sidecars (fineweb_val_bytes_*.bin, written by build_shards.py --caseops or --byte-sidecar) are
checked too: header, same length as their token shard, 0 at every BOS, and per document the sum
equals the direct count (plain builds; also position by position against the builder's tables when
the tokenizer normalizes, as the challenge's does).

CaseOps builds (meta.json names the scheme, or --caseops-scheme): the tokens of every document are
decoded and the CaseOps transform inverted; the sidecar's sum must equal the UTF-8 length of that
original text, and with --text the original must equal the input document exactly (the byte-table
counts do not apply to CaseOps text and are skipped).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import caseops  # noqa: E402
from build_shards import BOS_ID, byte_tables, count_bpb_bytes, iter_documents  # noqa: E402
from shard_io import read_byte_sidecars, read_shard, sidecar_path, token_shards  # noqa: E402


def split_documents(stream: np.ndarray) -> list[np.ndarray]:
    """The ids of each document (BOS dropped) of a [BOS] + ids + [BOS] + ids ... stream."""
    starts = np.flatnonzero(stream == BOS_ID)
    if stream.size and (starts.size == 0 or starts[0] != 0):
        raise ValueError("the token stream does not start with BOS")
    ends = np.append(starts[1:], stream.size)
    return [stream[s + 1:e] for s, e in zip(starts, ends)]


def trainer_counts(sp, stream: np.ndarray, docs: list[np.ndarray]) -> list[int] | None:
    """Per-document bytes from train_gpt's own byte tables, or None if train_gpt cannot be imported."""
    sys.path.insert(0, str(HERE.parent))
    try:
        import torch
        import train_gpt
    except ImportError as e:
        print(f"note: train_gpt not importable ({e}); checking the builder's tables only", file=sys.stderr)
        return None
    luts = train_gpt.build_byte_luts(sp, sp.vocab_size())
    t = torch.from_numpy(stream.astype(np.int64))
    nbytes = train_gpt.target_bytes(t[:-1], t[1:], luts).numpy()
    out, pos = [], 0  # nbytes[i] is the count for target stream[i + 1]
    for ids in docs:
        out.append(int(nbytes[pos:pos + len(ids)].sum()))
        pos += len(ids) + 1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", type=Path, help="directory with fineweb_<split>_*.bin (as build_shards.py writes)")
    ap.add_argument("--split", default="val", choices=["val", "train"])
    ap.add_argument("--tokenizer", type=Path, help="SentencePiece model (default <shards>/tokenizer.model)")
    ap.add_argument("--text", nargs="+", type=Path, help="the input file(s) the split was built from")
    ap.add_argument("--caseops-scheme", choices=list(caseops.SCHEMES),
                    help="the build's CaseOps scheme (default: what <shards>/meta.json says)")
    args = ap.parse_args(argv)

    files = token_shards(args.shards, args.split)
    if not files:
        sys.exit(f"check_bytes: no fineweb_{args.split}_*.bin in {args.shards}")
    sp = spm.SentencePieceProcessor(model_file=str(args.tokenizer or args.shards / "tokenizer.model"))
    stream = np.concatenate([read_shard(f).astype(np.int64) for f in files])
    if stream.size and int(stream.max()) >= sp.vocab_size():
        sys.exit(f"check_bytes: token id {int(stream.max())} >= vocab size {sp.vocab_size()}")
    docs = split_documents(stream)
    sidecar = None
    if any(sidecar_path(f).is_file() for f in files):
        try:
            _, sidecar = read_byte_sidecars(args.shards, args.split)
        except ValueError as e:
            print(f"MISMATCH: {e}")
            return 1
        sidecar = sidecar.astype(np.int64)
    scheme_name = args.caseops_scheme
    meta_path = args.shards / "meta.json"
    if scheme_name is None and meta_path.is_file():
        scheme_name = (json.loads(meta_path.read_text()).get("caseops") or {}).get("scheme")
    if scheme_name:
        return check_caseops(args, sp, caseops.CaseOps.from_name(scheme_name), stream, docs, sidecar, len(files))
    decoded = [sp.decode(ids.tolist()) for ids in docs]
    direct = [len(d.encode("utf-8")) for d in decoded]
    tables = byte_tables(sp)
    builder = [count_bpb_bytes(np.concatenate(([BOS_ID], ids)), tables) for ids in docs]
    trainer = trainer_counts(sp, stream, docs)
    n_byte = int(np.isin(stream, [i for i in range(sp.vocab_size()) if sp.is_byte(i)]).sum())
    n_unk = int((stream == sp.unk_id()).sum())

    print(f"{args.shards} {args.split}: {len(files)} shard(s), {len(docs):,} docs, {stream.size:,} tokens "
          f"(BOS included), vocab {sp.vocab_size()}, {n_byte:,} byte-fallback tokens, {n_unk:,} <unk> tokens")
    if n_unk:
        print("  note: <unk> (a tokenizer without byte fallback) counts 0 bytes by the challenge's rule, and the "
              "space of the piece after it is dropped; decode() shows ' \u2047 ' there, so such documents differ")
    print(f"  direct  (decoded, normalised) bytes: {sum(direct):,}  "
          f"({sum(direct) / max(1, stream.size):.4f} bytes/token, "
          f"{sum(direct) / max(1, stream.size - len(docs)):.4f} without BOS)")
    bad = 0
    if sidecar is not None:
        per_doc = _per_doc(sidecar, docs)
        diff = _differing(per_doc, direct)
        base, space, boundary = tables
        lut = np.concatenate(([base[stream[0]]], base[stream[1:]] + (space[stream[1:]] & ~boundary[stream[:-1]])))
        pos = int((lut != sidecar).sum())
        print(f"  byte sidecar: {int(sidecar.sum()):,} bytes, {len(diff)} document(s) differ from direct, "
              f"{pos:,} position(s) differ from the byte tables" + (" (identity normalization: documents "
              "that start with a space count it in the sidecar)" if pos and not diff else ""))
        bad += _show(diff, "sidecar", per_doc, "direct", direct, decoded)
    for name, counts in (("builder", builder), ("trainer", trainer)):
        if counts is None:
            continue
        diff = _differing(counts, direct)
        print(f"  {name} tables: {sum(counts):,} bytes, {len(diff)} document(s) differ")
        bad += _show(diff, name, counts, "direct", direct, decoded)
    if args.text:
        raw = _input_documents(args.text, len(docs))
        raw_bytes = sum(len(t.encode("utf-8")) for t in raw)
        changed = sum(r != d for r, d in zip(raw, decoded))
        print(f"  raw input bytes: {raw_bytes:,} ({raw_bytes - sum(direct):+,} vs normalised); "
              f"normalisation changed {changed} of {len(docs)} documents")
    print("OK: every count matches the direct one" if not bad else f"MISMATCH in {bad} count(s)")
    return 1 if bad else 0


def _input_documents(path, n: int) -> list[str]:
    """The first n non-empty documents of --text (the shards skip empty ones); fewer is an error."""
    raw = [t for t in iter_documents(path) if t.strip()]
    if len(raw) < n:
        sys.exit(f"check_bytes: {len(raw)} non-empty input documents but {n} in the shards")
    return raw[:n]


def _differing(counts: list[int], reference: list) -> list[int]:
    """Documents whose count differs from the reference's (a None reference is not checked)."""
    return [k for k, (c, r) in enumerate(zip(counts, reference)) if r is not None and c != r]


def _show(diff: list[int], name: str, counts, ref_name: str, reference, texts) -> int:
    """Prints the first five differing documents; returns how many differ."""
    for k in diff[:5]:
        print(f"    doc {k}: {name} {counts[k]} vs {ref_name} {reference[k]}: {texts[k][:80]!r}")
    return len(diff)


def _per_doc(counts: np.ndarray, docs: list[np.ndarray]) -> list[int]:
    """Per-document sums of a per-token array parallel to the [BOS] + ids ... stream."""
    out, pos = [], 0
    for ids in docs:
        out.append(int(counts[pos:pos + len(ids) + 1].sum()))  # BOS included (it counts 0)
        pos += len(ids) + 1
    return out


def check_caseops(args, sp, scheme, stream, docs, sidecar, n_files) -> int:
    """The CaseOps checks: decode every document, compare the sidecar (and --text) with the originals."""
    print(f"{args.shards} {args.split}: {n_files} shard(s), {len(docs):,} docs, {stream.size:,} tokens "
          f"(BOS included), vocab {sp.vocab_size()}, CaseOps {scheme.name}")
    originals, undecodable = [], []
    for k, ids in enumerate(docs):
        try:
            originals.append(scheme.decode(sp.decode(ids.tolist()), from_sentencepiece=True))
        except ValueError as e:
            originals.append(None)
            undecodable.append((k, str(e)))
    bad = len(undecodable)
    for k, err in undecodable[:5]:
        print(f"    doc {k}: does not invert the transform: {err}")
    direct = [None if t is None else len(t.encode("utf-8")) for t in originals]
    n_op = int(np.isin(stream, [sp.piece_to_id(op) for op in caseops.OPERATORS]).sum())
    print(f"  original (decoded, transform inverted) bytes: {sum(d or 0 for d in direct):,}, "
          f"{n_op:,} operator tokens ({n_op / max(1, stream.size):.2%})")
    if sidecar is None:
        print("  note: no byte sidecar for this split" + ("" if args.split == "train" else " (val_bpb needs one)"))
        bad += args.split == "val"
    else:
        per_doc = _per_doc(sidecar, docs)
        diff = _differing(per_doc, direct)
        print(f"  byte sidecar: {int(sidecar.sum()):,} bytes, {len(diff)} document(s) differ from the original")
        bad += _show(diff, "sidecar", per_doc, "original", direct, originals)
    if args.text:
        raw = _input_documents(args.text, len(docs))
        differ = [k for k in range(len(docs)) if originals[k] is not None and originals[k] != raw[k]]
        print(f"  input text: {len(differ)} of {len(docs)} documents differ from the decoded original")
        bad += len(differ)
    print("OK: every document round-trips and every count matches" if not bad else f"MISMATCH in {bad} count(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
