#!/usr/bin/env python3
"""Compare export methods and TTT modes on one trained model, in-process (CPU or GPU).

Trains the model given by the knobs once (fixed ITERATIONS, no wall clock), keeps its weights in --checkpoint (reused
when the file exists), then for every --variant NAME=K=V,K=V... re-runs calibration and the budget-fitting export
with those knobs and scores the artifact's round trip; for every --ttt-mode it scores the first variant's artifact
with that TTT mode. One JSON line per row goes to --out-jsonl, and a markdown table is printed.

Example (CPU, stand-in corpus, not FineWeb; export variants against the knobs' own export):
    python bench/export_compare.py --data /tmp/wiki_sp1024 --checkpoint /tmp/ckpt_s1.pt --budget 1200000 \\
        --knob NUM_LAYERS=6 --knob MODEL_DIM=192 ... \\
        --variant base= --variant gptq_embed=GPTQ_EMBED=1 --variant lqer=LQER_RANK=4 \\
        --ttt-mode chunked --ttt-mode lora --ttt-mode phased
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch  # noqa: E402

import train_gpt as tg  # noqa: E402


def parse_knobs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = value
    return out


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition("=")
    return name, parse_knobs([kv for kv in rest.split(",") if kv])


def knobs_to_hparams(knobs: dict[str, str]) -> tg.Hyperparameters:
    env = {k: v for k, v in os.environ.items() if k not in {f.upper() for f in tg.Hyperparameters.__dataclass_fields__}}
    return tg.Hyperparameters.from_env({**env, **knobs})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder with fineweb_train_*/fineweb_val_* shards and tokenizer.model")
    ap.add_argument("--tokenizer", default=None, help="default: DATA/tokenizer.model")
    ap.add_argument("--knob", action="append", default=[], help="K=V for the trained model (repeatable)")
    ap.add_argument("--variant", action="append", default=[], help="NAME=K=V,K=V export knobs (repeatable)")
    ap.add_argument("--ttt-mode", action="append", default=[], help="chunked | lora | phased (repeatable)")
    ap.add_argument("--budget", type=int, required=True, help="artifact bytes for the model (code bytes are added)")
    ap.add_argument("--checkpoint", required=True, help="trained weights (written after training, reused if present)")
    ap.add_argument("--out-jsonl", default=os.path.join(ROOT, "bench", "out", "export_compare.jsonl"))
    ap.add_argument("--label", default="", help="a tag stored in every JSON line (e.g. seed1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    base = {"DATA_PATH": args.data, "TOKENIZER_PATH": args.tokenizer or os.path.join(args.data, "tokenizer.model"),
            "MAX_WALLCLOCK_SECONDS": "0", **parse_knobs(args.knob)}
    h = knobs_to_hparams(base)
    rt = tg.setup_runtime(h)
    torch.manual_seed(h.seed)
    luts = tg.build_byte_luts(tg.spm.SentencePieceProcessor(model_file=h.tokenizer_path), h.vocab_size, rt.device)
    val = tg.load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"), h.train_seq_len, h.vocab_size,
                                    h.val_max_tokens).to(rt.device)
    model = tg.GPT(h).to(rt.device)
    if os.path.isfile(args.checkpoint):
        saved = torch.load(args.checkpoint, map_location=rt.device, weights_only=True)
        model.load_state_dict(saved["state"])
        model.set_looping(saved["looping"])
        print(f"loaded {args.checkpoint} (trained {saved['seconds']:.0f}s)")
    else:
        t0 = time.perf_counter()
        tg.train_model(h, model, rt, print, val, luts, tg.CompileGuard())
        torch.save({"state": model.state_dict(), "looping": model.looping, "seconds": time.perf_counter() - t0},
                   args.checkpoint)
    model.set_qat(False)
    trained = copy.deepcopy(model.state_dict())
    pre = tg.eval_plain(model, val, h.train_seq_len, h.val_batch_seqs, luts, rt)
    print(f"pre-quant val_bpb {pre.val_bpb:.6f}")
    os.makedirs(os.path.dirname(args.out_jsonl), exist_ok=True)
    rows, first_blob, first_h = [], None, None
    for text in args.variant or ["default="]:
        name, knobs = parse_variant(text)
        hv = replace(knobs_to_hparams({**base, **knobs}), max_artifact_bytes=args.budget + tg.code_bytes())
        model.load_state_dict(trained)
        t0 = time.perf_counter()
        hessians = tg.calibrate(hv, model, rt, print, 0.0)
        blob = tg.quantize_within_budget(model, hv, hessians, tg.model_config(hv, model.looping), print)
        export_s = time.perf_counter() - t0
        tg.load_artifact_into(model, blob, hv, rt.device)
        rtrip = tg.eval_plain(model, val, h.train_seq_len, h.val_batch_seqs, luts, rt)
        row = {"kind": "export", "name": name, "knobs": knobs, "label": args.label, "bytes_model": len(blob),
               "budget": args.budget, "pre_quant_bpb": pre.val_bpb, "roundtrip_bpb": rtrip.val_bpb,
               "quant_gap": rtrip.val_bpb - pre.val_bpb, "export_seconds": round(export_s, 1)}
        rows.append(row)
        print(json.dumps(row))
        if first_blob is None:
            first_blob, first_h = blob, hv
    for mode in args.ttt_mode:
        hm = replace(first_h, ttt_mode=mode)
        model = tg.load_artifact_into(None, first_blob, hm, rt.device)
        t0 = time.perf_counter()
        scores = (tg.eval_ttt if mode == "chunked" else tg.eval_lora)(model, val, hm, luts, rt)[0]
        seconds = time.perf_counter() - t0
        base_row = rows[0]
        row = {"kind": "ttt", "name": mode, "label": args.label, "roundtrip_bpb": base_row["roundtrip_bpb"],
               "ttt_bpb": scores.val_bpb, "gain": scores.val_bpb - base_row["roundtrip_bpb"],
               "eval_seconds": round(seconds, 1), "tokens": int(scores.sums[1]), "bytes": int(scores.sums[2])}
        rows.append(row)
        print(json.dumps(row))
    with open(args.out_jsonl, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("\n| export | bytes | round-trip val_bpb | quant gap | export s |\n|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "export":
            print(f"| {r['name']} | {r['bytes_model']:,} | {r['roundtrip_bpb']:.5f} | {r['quant_gap']:+.5f} | "
                  f"{r['export_seconds']} |")
    if args.ttt_mode:
        print("\n| TTT mode | val_bpb | gain | eval s |\n|---|---|---|---|")
        for r in rows:
            if r["kind"] == "ttt":
                print(f"| {r['name']} | {r['ttt_bpb']:.5f} | {r['gain']:+.5f} | {r['eval_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
