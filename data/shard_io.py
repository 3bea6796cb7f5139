"""Read and write token shards in the Parameter Golf challenge format.

A shard is a 1024-byte header of 256 little-endian int32 values followed by
the token ids as little-endian uint16:

    header[0] = 20240520   (magic)
    header[1] = 1          (version)
    header[2] = n          (number of tokens)
    header[3:] = 0

so a valid file is exactly 1024 + 2 * n bytes long.

Usage:
    from data.shard_io import read_shard, write_shard   # or: from shard_io import ...
    write_shard("fineweb_val_000000.bin", tokens)
    tokens = read_shard("fineweb_val_000000.bin")         # np.ndarray[uint16]

A validation byte sidecar (CaseOps; the records' fineweb_val_bytes_XXXXXX.bin) has exactly the same
format: the same header (magic 20240520, version 1, count) and one little-endian uint16 per token of
its token shard fineweb_val_XXXXXX.bin, same length, entry i for token i: the number of original
UTF-8 bytes token i stands for (0 for BOS and for CaseOps operators). val_bpb divides by the sum of
the entries at the scored target positions.

    token_shards(dir, "val")                  # fineweb_val_000000.bin, ... (sidecars excluded)
    sidecar_path("fineweb_val_000000.bin")    # fineweb_val_bytes_000000.bin
    counts = read_byte_sidecar(sidecar, tokens_path)   # header + same-length check

Only numpy is needed (no torch).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # 1024
MAX_TOKEN_ID = 65535


def make_header(num_tokens: int) -> np.ndarray:
    """Return the 256-int32 little-endian header for a shard of `num_tokens` tokens."""
    if not 0 <= num_tokens < 2**31:
        raise ValueError(f"token count {num_tokens} does not fit the int32 header")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    return header


def write_shard(path, tokens) -> None:
    """Write `tokens` (any integer sequence/array) to `path` as a challenge shard.

    Raises ValueError if any id is negative or >= 65536, or if `tokens` is not 1-D
    integer data. The file is written to a temporary name and renamed into place,
    so a crash never leaves a half-written shard under the final name.
    """
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_TOKEN_ID:
            raise ValueError(
                f"{path}: token ids must be in [0, {MAX_TOKEN_ID}] for uint16 shards, "
                f"got min={lo} max={hi}"
            )
    data = arr.astype("<u2", copy=False)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(make_header(data.size).tobytes())
        f.write(data.tobytes())
    os.replace(tmp, path)


def read_header(path) -> int:
    """Validate the header and file size of shard `path`; return its token count."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: file is {size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise ValueError(f"{path}: bad magic number {int(header[0])} (expected {MAGIC}); not a challenge shard")
    if int(header[1]) != VERSION:
        raise ValueError(f"{path}: unsupported shard version {int(header[1])} (expected {VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        raise ValueError(
            f"{path}: header says {n} tokens, so the file should be {expected} bytes, but it is {size} bytes"
        )
    return n


def read_shard(path) -> np.ndarray:
    """Return the tokens of shard `path` as a 1-D np.uint16 array (header checked)."""
    n = read_header(path)
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        tokens = np.fromfile(f, dtype="<u2", count=n)
    if tokens.size != n:  # file changed under us
        raise ValueError(f"{path}: expected {n} tokens, read {tokens.size}")
    return tokens.astype(np.uint16, copy=False)


# ------------------------------------------------------------------ byte sidecars
SIDECAR_TAG = "bytes"  # fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin
_SHARD_NAME = re.compile(r"fineweb_(?P<split>[a-z]+)_(?P<index>\d+)\.bin")


def token_shards(directory, split: str) -> list[Path]:
    """The token shards fineweb_{split}_NNNNNN.bin in `directory`, sorted (byte sidecars excluded).

    A plain glob("fineweb_val_*.bin") also matches the sidecars fineweb_val_bytes_*.bin: use this.
    """
    paths = []
    for path in Path(directory).glob(f"fineweb_{split}_*.bin"):
        m = _SHARD_NAME.fullmatch(path.name)
        if m and m["split"] == split:
            paths.append(path)
    return sorted(paths)


def sidecar_path(token_shard) -> Path:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin (same folder)."""
    path = Path(token_shard)
    m = _SHARD_NAME.fullmatch(path.name)
    if not m:
        raise ValueError(f"{path}: not a token shard name (fineweb_<split>_<index>.bin)")
    return path.with_name(f"fineweb_{m['split']}_{SIDECAR_TAG}_{m['index']}.bin")


def read_byte_sidecar(path, tokens_path=None, tokens=None, bos_id: int = 1) -> np.ndarray:
    """The per-token byte counts of sidecar `path` (np.uint16), header checked.

    With `tokens_path` (its token shard) the two must have the same length, and with the tokens (read
    from `tokens_path`, or given as `tokens`) every BOS position must count 0 bytes; ValueError otherwise.
    """
    counts = read_shard(path)
    if tokens is None and tokens_path is not None:
        tokens = read_shard(tokens_path)
    if tokens is not None:
        where = tokens_path if tokens_path is not None else "its token shard"
        if len(tokens) != len(counts):
            raise ValueError(f"{path}: byte sidecar has {len(counts)} entries but {where} has "
                             f"{len(tokens)} tokens; they must be parallel (same length)")
        bad = np.flatnonzero((np.asarray(tokens) == bos_id) & (counts != 0))
        if bad.size:
            raise ValueError(f"{path}: BOS at position {int(bad[0])} has {int(counts[bad[0]])} bytes (must be 0)")
    return counts


def read_byte_sidecars(directory, split: str = "val", bos_id: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, byte counts) of a whole split, every sidecar checked against its token shard.

    ValueError if there are no token shards or any token shard has no sidecar.
    """
    shards = token_shards(directory, split)
    if not shards:
        raise ValueError(f"{directory}: no fineweb_{split}_*.bin token shards")
    toks, counts = [], []
    for shard in shards:
        side = sidecar_path(shard)
        if not side.is_file():
            raise ValueError(f"{shard}: no byte sidecar {side.name} next to it")
        t = read_shard(shard)
        toks.append(t)
        counts.append(read_byte_sidecar(side, tokens=t, bos_id=bos_id))
    return np.concatenate(toks), np.concatenate(counts)
