#!/usr/bin/env python3
"""Bytes of one quantized state under each compressor and code layout (the measurement behind the artifact format).

The state: the weights of --checkpoint (bench/export_compare.py's format, the knobs given by --knob) or, without a
checkpoint, the model of the knobs at its initial weights (bench/artifact_size.py's init_model: full-size shapes, for
the dry-run figure), quantized by quantize_state at step multiplier --mult, with GPTQ when --gptq-tokens > 0 (Hessians
from DATA_PATH's training shards).

Layouts of the code tensors (scales, fp16 tensors and the config always go in one extra stream of the compressor):
    state      one stream over torch.save of everything (one general-purpose compressor over the whole state)
    tensor     a stream per code tensor (artifact format 3 with zstd)
    group      code tensors grouped by role (train_gpt.tensor_role), a stream each (format 4 with zstd-literal)
    group_t    the same, each matrix transposed (column after column)
    group_st   the same, the rows of the large groups sorted so neighbours are similar (greedy L1), then
               transposed; the permutations (uint16) are one more stream, counted
Compressors: zstd-22, zstd-literal (the artifact's code frames: train_gpt.CODE_ZSTD, Huffman-coded literals only; the
rest with zstd-22), lzma (xz, preset 9 extreme), brotli-11 (if installed). One JSON line per (layout, compressor),
then a markdown table. Also printed: the artifact's own size (train_gpt.serialize_artifact) for reference.

    python bench/serialize_compare.py --checkpoint /tmp/ckpt_s1.pt --data /tmp/wiki_sp1024 --mult 3.4 \\
        --knob NUM_LAYERS=6 --knob MODEL_DIM=192 ...
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import zstandard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import train_gpt as tg  # noqa: E402

try:
    import brotli
except ImportError:  # optional: compared only when installed
    brotli = None

COMPRESSORS = {  # name -> (compressor of the code streams, of the rest)
    "zstd-22": lambda b: zstandard.ZstdCompressor(level=22).compress(b),
    "zstd-literal": lambda b: zstandard.ZstdCompressor(compression_params=tg.CODE_ZSTD).compress(b),
    "lzma-9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}
if brotli is not None:
    COMPRESSORS["brotli-11"] = lambda b: brotli.compress(b, quality=11, lgwin=24)


role = tg.tensor_role


def simsort(q: torch.Tensor) -> np.ndarray:
    """Greedy nearest-neighbour order of the rows in L1 distance, from row 0."""
    x = q.float()
    d = torch.cdist(x, x, p=1).numpy()
    n = d.shape[0]
    order, used = [0], np.zeros(n, bool)
    used[0] = True
    big = np.float32(np.inf)
    d[:, 0] = big
    for _ in range(n - 1):
        nxt = int(np.argmin(d[order[-1]]))
        order.append(nxt)
        d[:, nxt] = big
    return np.array(order, dtype=np.uint16)


def order0_bytes(data: bytes) -> float:
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256).astype(np.float64)
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / counts.sum())).sum() / 8)


def streams(qstate: dict, config: dict, layout: str, sort_roles=("embed", "attn_qo", "mlp_up")) -> list[bytes]:
    coded = {n: e for n, e in qstate.items() if "q" in e}
    rest = {"config": config, "scales": {n: e["scale"] for n, e in coded.items()},
            "fp16": {n: e["data"] for n, e in qstate.items() if "data" in e}}
    if layout == "state":
        buf = io.BytesIO()
        torch.save({**rest, "codes": {n: e["q"] for n, e in coded.items()}}, buf)
        return [buf.getvalue()]
    buf = io.BytesIO()
    torch.save(rest, buf)
    out = [buf.getvalue()]
    if layout == "tensor":
        return out + [e["q"].numpy().tobytes() for e in coded.values()]
    groups: dict[str, list[bytes]] = {}
    perms = []
    for n, e in coded.items():
        q = e["q"]
        if layout in ("group_t", "group_st") and q.ndim == 2:
            if layout == "group_st" and role(n) in sort_roles and q.size(0) <= 8192:
                order = simsort(q)
                perms.append(order.tobytes())
                q = q[torch.from_numpy(order.astype(np.int64))]
            q = q.T.contiguous()
        groups.setdefault(role(n), []).append(q.numpy().tobytes())
    out += [b"".join(v) for v in groups.values()]
    return out + ([b"".join(perms)] if perms else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="shard folder (for GPTQ calibration; tokenizer not needed)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--knob", action="append", default=[])
    ap.add_argument("--mult", type=float, default=1.0)
    ap.add_argument("--gptq-tokens", type=int, default=0, help="GPTQ calibration tokens (0: round to nearest)")
    ap.add_argument("--layouts", default="state,tensor,group,group_t,group_st")
    ap.add_argument("--only", default="", help="layout/compressor pairs to run, comma-separated (default: all)")
    ap.add_argument("--label", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    knobs = dict(k.split("=", 1) for k in args.knob)
    if args.data:
        knobs["DATA_PATH"] = args.data
    h = tg.Hyperparameters.from_env(knobs)
    if args.checkpoint:
        model = tg.GPT(h)
        saved = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state"])
    else:
        from artifact_size import init_model
        model = init_model(h)
    hessians = None
    if args.gptq_tokens:
        hh = replace(h, gptq_calib_tokens=args.gptq_tokens, max_wallclock_seconds=0)
        hessians = tg.calibrate(hh, model, tg.Runtime(torch.device("cpu")), print, 0.0)
    t0 = time.perf_counter()
    qstate = tg.quantize_state(model, h, hessians, args.mult)
    print(f"quantized at x{args.mult} in {time.perf_counter() - t0:.1f}s")
    config = tg.model_config(h, False)
    ref = len(tg.serialize_artifact(qstate, config, h))
    print(json.dumps({"layout": "artifact (serialize_artifact)", "bytes": ref}))
    rows = {}
    for layout in args.layouts.split(","):
        t0 = time.perf_counter()
        parts = streams(qstate, config, layout)
        prep = time.perf_counter() - t0
        for cname, fn in COMPRESSORS.items():
            if args.only and f"{layout}/{cname}" not in args.only.split(","):
                continue
            t0 = time.perf_counter()
            rest = COMPRESSORS["zstd-22"] if cname == "zstd-literal" else fn  # literals only: the codes' streams
            size = len(rest(parts[0])) + sum(len(fn(p)) for p in parts[1:])
            rows[(layout, cname)] = size
            print(json.dumps({"label": args.label, "layout": layout, "compressor": cname, "bytes": size,
                              "streams": len(parts), "prep_s": round(prep, 1),
                              "compress_s": round(time.perf_counter() - t0, 1)}), flush=True)
    layouts = args.layouts.split(",")
    floor = sum(order0_bytes(b) for b in streams(qstate, config, "group")[1:])
    print(json.dumps({"label": args.label, "layout": "group", "compressor": "order-0 entropy of the codes (a floor "
                      "for a coder without context)", "bytes": round(floor)}))
    print(f"\nartifact format in train_gpt.py: {ref:,} bytes; order-0 entropy of the grouped codes: {floor:,.0f}\n")
    print("| layout | " + " | ".join(COMPRESSORS) + " |\n|---|" + "---|" * len(COMPRESSORS))
    for layout in layouts:
        print(f"| {layout} | " + " | ".join(f"{rows[(layout, c)]:,}" if (layout, c) in rows else "—"
                                             for c in COMPRESSORS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
