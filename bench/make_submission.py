"""Write submission.json from one or more train_gpt.py logs (one per seed), in the layout of the record folders.

Usage:
    python bench/make_submission.py LOG [LOG ...] --name NAME --author AUTHOR --github-id ID \\
        --hardware HW --data DATA [--blurb TEXT] [--note TEXT] [--out submission.json] [--table]

Every number comes from the logs. With several logs (seeds) they must be runs of the same code and config: the
tool refuses logs whose provenance code_sha256 differs, or whose hyperparameters differ in anything but
seed, run_id, log_dir and artifact_path. It also refuses any log whose bytes_total is over 16,000,000
(whatever MAX_ARTIFACT_BYTES the run used) or that did not finish.

submission.json: val_bpb / val_loss (and the pre-quant / roundtrip / sliding / TTT scores) are means over the
seeds, with a per-seed list under `seed_results`; bytes_total (and its bytes_model / bytes_code) come from the
largest log; seeds is the sorted seed list; train/eval seconds are the largest over the seeds; steps the mean.
--table prints a markdown results table (one row per seed, then mean and std) for the README instead of the JSON.

Record folder: --record-dir DIR writes DIR/train_gpt.py (the code the logs ran: --code PATH, else the repository's
train_gpt.py packed by bench/pack_code.py with the codec, readable or minified, whose size and inner hash the logs
show), copies the logs into DIR, writes DIR/submission.json and, unless DIR has one, a README.md skeleton (results
table, code bytes readable vs packed, how to unpack). It refuses when the logs' code_sha256 / bytes_code do not
match the code it would write: the logs must come from a run of that very file (for a packed record, the packed
file: `python bench/pack_code.py --out /tmp/packed/train_gpt.py`, then torchrun that file).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pack_code  # noqa: E402
from run_bench import parse_log, summarize  # noqa: E402
from significance import mean_std  # noqa: E402

LIMIT_BYTES = 16_000_000
PER_SEED_KNOBS = ("seed", "run_id", "log_dir", "artifact_path")  # may differ between the seeds' logs


class SubmissionError(Exception):
    """A log set that cannot make one submission; the message names the log and the knob / hash."""


def load(path: str) -> dict:
    with open(path, encoding="utf-8", errors="replace") as f:
        parsed = parse_log(f.read())
    s = summarize(parsed)
    s["log"] = path
    s["hparams"] = parsed.get("hparams") or {}
    s["provenance"] = parsed.get("provenance")
    return s


def _name(s: dict) -> str:
    return os.path.basename(s["log"])


def validate(runs: list[dict]) -> None:
    """Raise SubmissionError unless the runs finished, fit in 16,000,000 bytes and share code and config."""
    for s in runs:
        if s.get("bytes_total") is None or s.get("final_bpb") is None:
            raise SubmissionError(f"{s['log']} has no final score or byte counts: did the run finish?")
        if s["bytes_total"] > LIMIT_BYTES:
            raise SubmissionError(f"{s['log']}: bytes_total {s['bytes_total']:,} is over the 16,000,000-byte limit "
                                  f"(MAX_ARTIFACT_BYTES in the log: {s['hparams'].get('max_artifact_bytes')})")
    if len(runs) < 2:
        if runs and runs[0].get("code_sha256") is None:
            print(f"make_submission: warning: {runs[0]['log']} has no provenance line (code_sha256)", file=sys.stderr)
        return
    first = runs[0]
    for s in runs:
        if s.get("code_sha256") is None:
            raise SubmissionError(f"{s['log']} has no provenance line: cannot check its code_sha256 against the "
                                  "other logs")
    for s in runs[1:]:
        if s["code_sha256"] != first["code_sha256"]:
            raise SubmissionError(f"code_sha256 differs: {_name(first)} {first['code_sha256']} vs {_name(s)} "
                                  f"{s['code_sha256']}")
        a = {k: v for k, v in first["hparams"].items() if k not in PER_SEED_KNOBS}
        b = {k: v for k, v in s["hparams"].items() if k not in PER_SEED_KNOBS}
        if not a or not b:
            raise SubmissionError(f"{_name(first if not a else s)} has no hyperparameters line")
        differing = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
        if differing:
            k = differing[0]
            raise SubmissionError(f"hyperparameter {k!r} differs: {_name(first)} {a.get(k, '<absent>')!r} vs "
                                  f"{_name(s)} {b.get(k, '<absent>')!r}"
                                  + (f" (also: {', '.join(differing[1:])})" if len(differing) > 1 else ""))
    seeds = [s.get("seed") for s in runs]
    if None in seeds:
        raise SubmissionError(f"{runs[seeds.index(None)]['log']} has no seed in its hyperparameters")
    dup = sorted({x for x in seeds if seeds.count(x) > 1})
    if dup:
        raise SubmissionError(f"two logs have the same seed {dup[0]}: "
                              + ", ".join(_name(s) for s in runs if s.get("seed") == dup[0]))
    for key in ("gpu", "world"):
        values = {str(s.get(key)) for s in runs}
        if len(values) > 1:
            print(f"make_submission: warning: the logs differ in {key}: {sorted(values)}", file=sys.stderr)


def _mean(runs, key):
    vals = [s.get(key) for s in runs]
    if any(v is None for v in vals):
        return None
    return round(sum(vals) / len(vals), 10)


def _max(runs, key):
    vals = [s.get(key) for s in runs if s.get(key) is not None]
    return max(vals) if vals else None


def train_s(s):
    return s.get("train_clock_seconds") if s.get("train_clock_seconds") is not None else s.get("train_seconds")


def eval_s(s):
    return s.get("eval_clock_seconds") if s.get("eval_clock_seconds") is not None else s.get("eval_seconds")


def build(runs: list[dict], args) -> dict:
    validate(runs)
    runs = sorted(runs, key=lambda s: (s.get("seed") is None, s.get("seed") or 0))
    biggest = max(runs, key=lambda s: s["bytes_total"])
    steps = [s.get("steps") for s in runs]
    return {
        "name": args.name, "author": args.author, "github_id": args.github_id,
        "date": datetime.date.today().isoformat(), "track": "10min_16mb",
        "val_bpb": _mean(runs, "final_bpb"), "val_loss": _mean(runs, "final_loss"),
        "val_bpb_std": round(mean_std([s["final_bpb"] for s in runs])[1], 10) if len(runs) > 1 else None,
        "val_bpb_source": runs[0].get("final_source"),
        "seeds": sorted(s["seed"] for s in runs if s.get("seed") is not None),
        "pre_quant_val_bpb": _mean(runs, "pre_quant_bpb"), "roundtrip_val_bpb": _mean(runs, "roundtrip_bpb"),
        "sliding_val_bpb": _mean(runs, "sliding_bpb"), "ttt_val_bpb": _mean(runs, "ttt_bpb"),
        "bytes_total": biggest["bytes_total"], "bytes_model": biggest.get("bytes_model"),
        "bytes_code": biggest.get("bytes_code"),
        "steps": None if None in steps else round(sum(steps) / len(steps)),
        "train_seconds": _max(runs, "train_clock_seconds") or _max(runs, "train_seconds"),
        "eval_seconds": _max(runs, "eval_clock_seconds") or _max(runs, "eval_seconds"),
        "hardware": args.hardware, "data": args.data, "world_size": runs[0].get("world"),
        "device_in_log": runs[0].get("gpu") or runs[0].get("device"),
        "code_sha256": runs[0].get("code_sha256"),
        "val_tokens": runs[0].get("val_tokens"), "val_max_tokens": runs[0].get("val_max_tokens"),
        "blurb": args.blurb if args.blurb is not None else args.note,
        "note": args.note,
        "seed_results": [
            {"seed": s.get("seed"), "log": _name(s), "val_bpb": s["final_bpb"], "val_loss": s.get("final_loss"),
             "pre_quant_val_bpb": s.get("pre_quant_bpb"), "roundtrip_val_bpb": s.get("roundtrip_bpb"),
             "sliding_val_bpb": s.get("sliding_bpb"), "ttt_val_bpb": s.get("ttt_bpb"),
             "bytes_total": s["bytes_total"], "steps": s.get("steps"), "train_seconds": train_s(s),
             "eval_seconds": eval_s(s)} for s in runs],
    }


def _cell(value, fmt):
    return "" if value is None else format(value, fmt)


def results_table(runs: list[dict]) -> str:
    """Markdown: one row per seed, then mean and std rows."""
    runs = sorted(runs, key=lambda s: (s.get("seed") is None, s.get("seed") or 0))
    cols = [("seed", lambda s: s.get("seed"), "d"), ("steps", lambda s: s.get("steps"), "d"),
            ("pre-quant", lambda s: s.get("pre_quant_bpb"), ".5f"),
            ("roundtrip", lambda s: s.get("roundtrip_bpb"), ".5f"),
            ("sliding", lambda s: s.get("sliding_bpb"), ".5f"), ("ttt", lambda s: s.get("ttt_bpb"), ".5f"),
            ("final val_bpb", lambda s: s.get("final_bpb"), ".8f"),
            ("val_loss", lambda s: s.get("final_loss"), ".8f"),
            ("bytes_total", lambda s: s.get("bytes_total"), ",d"), ("train s", train_s, ".1f"),
            ("eval s", eval_s, ".1f")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for s in runs:
        lines.append("| " + " | ".join(_cell(get(s), fmt) for _, get, fmt in cols) + " |")
    for label, which in (("mean", 0), ("std", 1)):
        cells = [f"**{label}**"]
        for title, get, fmt in cols[1:]:
            vals = [get(s) for s in runs]
            if any(v is None for v in vals) or (which == 1 and len(vals) < 2):
                cells.append("")
                continue
            value = mean_std([float(v) for v in vals])[which]
            cells.append(format(value, {"d": ".1f", ",d": ",.0f"}.get(fmt, fmt)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def code_candidates(code: str | None) -> list[tuple[str, bytes]]:
    """(label, file bytes) a record's train_gpt.py could be: the --code file as it is, else the repository's
    readable train_gpt.py as it is and packed by each codec, readable and minified."""
    if code is not None:
        with open(code, "rb") as f:
            return [(code, f.read())]
    with open(pack_code.DEFAULT_SOURCE, "rb") as f:
        source = f.read()
    out = [("train_gpt.py (readable)", source)]
    for form, inner in (("readable", source), ("minified", pack_code.minify(source))):
        out += [(f"train_gpt.py packed ({codec}, {form})", pack_code.pack(inner, codec)) for codec in pack_code.CODECS]
    return out


def pick_code(runs: list[dict], code: str | None) -> tuple[str, bytes]:
    """The candidate whose code_sha256 (inner source's if packed) and bytes_code every log shows."""
    tried = []
    for label, data in code_candidates(code):
        ident = pack_code.code_identity(data)
        if all(s.get("code_sha256") == ident["code_sha256"] and s.get("bytes_code") == ident["bytes_code"]
               for s in runs):
            return label, data
        tried.append(f"{label}: sha256 {ident['code_sha256'][:12]}... {ident['bytes_code']:,} bytes")
    logged = "; ".join(f"{_name(s)}: sha256 {(s.get('code_sha256') or 'none')[:12]}... bytes_code "
                       f"{s.get('bytes_code')}" for s in runs)
    raise SubmissionError(f"no code matches the logs ({logged}); tried {'; '.join(tried)}. The logs must come from a "
                          "run of the file the record holds (pass it with --code)")


def record_readme(args, sub: dict, runs: list[dict], label: str, data: bytes) -> str:
    ident = pack_code.code_identity(data)
    lines = [f"# {args.name}", "", sub.get("blurb") or "", "",
             f"val_bpb {sub['val_bpb']:.8f} (mean over seeds {sub['seeds']}), bytes_total {sub['bytes_total']:,} "
             f"(largest seed), hardware: {args.hardware}, data: {args.data}.", "", "## Results", "",
             results_table(runs), "", "## Code bytes", "",
             "| train_gpt.py | bytes |", "|---|---:|", f"| readable source (sha256 `{ident['code_sha256']}`) | "
             f"{ident['source_bytes']:,} |", f"| submitted ({label}) | {ident['bytes_code']:,} |", ""]
    if ident["packed"]:
        lines += ["train_gpt.py is a self-extracting file: it decompresses the source "
                  f"({ident['codec']} + base85) and runs it. The readable source: "
                  "`python bench/pack_code.py --unpack train_gpt.py` (or the project's repository); its sha256 is the "
                  "`code_sha256` of every log's provenance line, and `bytes_code` the packed file's size.", ""]
    lines += ["Reproduce: `SEED=<seed> torchrun --standalone --nproc_per_node=8 train_gpt.py` per seed.", ""]
    return "\n".join(lines)


def write_record(runs: list[dict], args, out: dict) -> str:
    label, data = pick_code(runs, args.code)
    os.makedirs(args.record_dir, exist_ok=True)
    with open(os.path.join(args.record_dir, "train_gpt.py"), "wb") as f:
        f.write(data)
    for s in runs:
        dest = os.path.join(args.record_dir, _name(s))
        if os.path.abspath(dest) != os.path.abspath(s["log"]):
            shutil.copyfile(s["log"], dest)
    readme = os.path.join(args.record_dir, "README.md")
    if not os.path.exists(readme):
        with open(readme, "w", encoding="utf-8") as f:
            f.write(record_readme(args, out, runs, label, data))
    return label


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", metavar="LOG", help="one train_gpt.py log per seed")
    ap.add_argument("--name", required=True)
    ap.add_argument("--author", required=True)
    ap.add_argument("--github-id", default="")
    ap.add_argument("--hardware", required=True, help='e.g. "8xH100 SXM" or "2-core CPU, no GPU"')
    ap.add_argument("--data", required=True, help='e.g. "FineWeb sp1024" or "stand-in Wikipedia corpus"')
    ap.add_argument("--blurb", default=None, help="one-paragraph summary (default: --note)")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=None, help="default: submission.json (DIR/submission.json with --record-dir)")
    ap.add_argument("--table", action="store_true", help="print a markdown results table instead of the JSON")
    ap.add_argument("--record-dir", metavar="DIR", help="write a record folder: train_gpt.py, logs, submission.json, "
                    "README.md")
    ap.add_argument("--code", metavar="PATH", help="with --record-dir: the train_gpt.py the logs ran (packed or not)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(args.record_dir, "submission.json") if args.record_dir else "submission.json"
    try:
        runs = [load(p) for p in args.logs]
        out = build(runs, args)
        if args.record_dir:
            label = write_record(runs, args, out)
            print(f"make_submission: record folder {args.record_dir}: train_gpt.py = {label}", file=sys.stderr)
    except OSError as e:
        print(f"make_submission: {e}", file=sys.stderr)
        return 2
    except SubmissionError as e:
        print(f"make_submission: refused: {e}", file=sys.stderr)
        return 1
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    if args.table:
        print(results_table(runs))
    else:
        print(json.dumps(out, indent=2))
    print(f"make_submission: wrote {args.out} ({len(runs)} log(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
