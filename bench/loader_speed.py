#!/usr/bin/env python3
"""Speed of the training loaders (stream vs TRAIN_DOC_ROWS=1 document rows), without the prefetch thread.

One call = one rank's micro-batch; with WORLD ranks every rank also plans the other ranks' document rows, so the
docs figure includes that work. Also reports, for the docs rows, the share of row tokens that are a filler prefix
(a document start trained twice) and the share of rows that start with a BOS.

    python bench/loader_speed.py --data /tmp/wiki_sp1024 --vocab 1024
    python bench/loader_speed.py --synthetic /tmp/fwlike --vocab 8192     # FineWeb-like document lengths
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402


def synthetic_shards(out: str, vocab: int, shards: int = 2, tokens: int = 5_000_000, seed: int = 0) -> None:
    """Log-normal document lengths, median 420 tokens, sigma 1.0 (mean ~690, ~6 % of documents past 2048): an
    assumption about FineWeb sp8192, not a measurement of it. Random ids; BOS opens each document."""
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(shards):
        lengths = np.maximum(2, rng.lognormal(np.log(420), 1.0, tokens // 300).astype(np.int64))
        lengths = lengths[:np.searchsorted(np.cumsum(lengths), tokens) + 1]
        t = rng.integers(2, vocab, int(lengths.sum())).astype(np.uint16)
        t[np.r_[0, np.cumsum(lengths)[:-1]]] = tg.BOS_ID
        header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
        header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(t))
        with open(os.path.join(out, f"fineweb_train_{i:06d}.bin"), "wb") as f:
            f.write(header.tobytes() + t.astype("<u2").tobytes())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="folder with fineweb_train_*.bin")
    ap.add_argument("--synthetic", help="write FineWeb-like synthetic shards here (if absent) and use them")
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-tokens", type=int, default=786_432, help="tokens per step, all ranks")
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = args.synthetic or args.data
    if args.synthetic and not os.path.isdir(args.synthetic):
        synthetic_shards(args.synthetic, args.vocab)
    pattern = os.path.join(data, "fineweb_train_*.bin")
    grad_accum = 8 // args.world
    print(f"{pattern}: seq {args.seq_len}, {args.batch_tokens} tokens/step, world {args.world}, rank 0")
    for docs in (False, True):
        ld = tg.DistributedTokenLoader(pattern, args.vocab, 0, args.world, torch.device("cpu"),
                                       args.batch_tokens // grad_accum, args.seq_len, prefetch=False, docs=docs)
        ld.next_batch()
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            ld.next_batch()
            times.append(time.perf_counter() - t0)
        s = float(np.median(times))
        extra = ""
        if docs:  # a second pass, instrumented: which row tails are a filler prefix
            real, fill, rows, bos = ld._row, 0, 0, 0
            for _ in range(max(1, args.calls // 2) * args.world * (args.batch_tokens // grad_accum // args.world)
                           // args.seq_len):
                parts = real()
                head = ld.waiting[-ld.fits[0][1]]
                fill += len(parts[-1]) - 1 if parts[-1].__array_interface__["data"] == head.__array_interface__["data"] else 0
                rows, bos = rows + 1, bos + int(parts[0][0] == tg.BOS_ID)
            extra = f", filler {fill / (rows * args.seq_len):.3%} of row tokens, rows starting at a BOS {bos / rows:.1%}"
        own = args.batch_tokens // grad_accum // args.world
        print(f"{'docs' if docs else 'stream':6s}: {1000 * s:7.1f} ms/call (median of {args.calls}), "
              f"{own / s / 1e6:6.2f} M tokens/s for this rank's rows{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
