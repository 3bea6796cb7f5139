"""Write submission.json from a train_gpt.py log, in the field layout of the challenge's record folders.

Usage: python bench/make_submission.py LOG --name NAME --author AUTHOR --hardware HW --data DATA [--note TEXT]
Every number comes from the log; the note says on what hardware and data the run was made.
"""
import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_bench import parse_log, summarize  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", default="")
    ap.add_argument("--hardware", required=True, help='e.g. "8xH100 SXM" or "2-core CPU, no GPU"')
    ap.add_argument("--data", required=True, help='e.g. "FineWeb sp1024" or "stand-in Wikipedia corpus"')
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default="submission.json")
    args = ap.parse_args()
    with open(args.log, encoding="utf-8") as f:
        s = summarize(parse_log(f.read()))
    if s.get("bytes_total") is None or s.get("final_bpb") is None:
        raise SystemExit(f"{args.log} has no final score or byte counts: did the run finish?")
    out = {
        "name": args.name, "author": args.author, "github_id": args.github_id,
        "date": datetime.date.today().isoformat(), "track": "10min_16mb",
        "val_bpb": s["final_bpb"], "val_bpb_source": s.get("final_source"),
        "pre_quant_val_bpb": s.get("pre_quant_bpb"), "roundtrip_val_bpb": s.get("roundtrip_bpb"),
        "sliding_val_bpb": s.get("sliding_bpb"), "ttt_val_bpb": s.get("ttt_bpb"),
        "bytes_total": s["bytes_total"], "bytes_model": s.get("bytes_model"), "bytes_code": s.get("bytes_code"),
        "steps": s.get("steps"), "train_seconds": s.get("train_seconds"), "eval_seconds": s.get("eval_seconds"),
        "hardware": args.hardware, "data": args.data, "world_size": s.get("world"),
        "device_in_log": s.get("gpu") or s.get("device"), "note": args.note,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
