"""Check a record folder (track 10min_16mb) against the challenge's rules before opening the PR.

Usage: python bench/check_record.py FOLDER [--prior-bpb X] [--artifact PATH]

Prints one line per check, PASS / FAIL / NOTE and a short message naming the problem, and exits 1 on any FAIL
(2 on bad arguments). The folder must hold README.md, submission.json, train_gpt.py and at least one training log
(a *.log or *.txt file with a `hyperparameters {json}` line; one log per seed); final_model.ptz is optional
(--artifact points at it elsewhere). Checks:

  files          the required files are present
  compile        train_gpt.py compiles (packed by bench/pack_code.py: it unpacks, without running, and both the
                 wrapper and the inner source compile)
  code_sha256    every log's provenance code_sha256 equals sha256(train_gpt.py), or of its inner source if packed
  bytes_code     every log's bytes_code equals the size of train_gpt.py (its UTF-8 bytes)
  bytes_total    per log: bytes_model + size(train_gpt.py) == logged bytes_total <= 16,000,000 (decimal); with an
                 artifact, size(artifact) + size(train_gpt.py) must equal one log's bytes_total, and be <= 16,000,000
  hardware       8xH100: the gpu name contains H100 and world == 8 (else NOTE: not an 8xH100 run)
  train_time     clock_train training + GPTQ calibration <= 600 s (NOTE for runs not on 8xH100)
  eval_time      clock_eval total <= 600 s (NOTE for runs not on 8xH100, with the 8-GPU estimate)
  full_val       val_max_tokens == 0: the whole validation split was scored (FAIL on 8xH100, NOTE otherwise)
  ttt            TTT off, or ttt_mode in {chunked, lora, phased} (a missing ttt_mode means chunked)
  finished       the log has its `final val_loss:` and `bytes_total:` lines
  submission     submission.json has name, author, github_id, val_bpb, val_loss, bytes_total, seeds, date, blurb;
                 val_bpb / val_loss equal the mean over the logs (|diff| <= 5e-9), bytes_total the max over the logs,
                 seeds the sorted list of the logs' seeds
  seeds / significance (with --prior-bpb): at least 3 seeds, and a one-sided one-sample t-test over seeds
                 (df = n-1) that the improvement over the prior record exceeds 0.005 nats per token at p < 0.01.
                 Per seed, nats improvement = (prior_bpb - val_bpb_i) * val_loss_i / val_bpb_i
                 (val_loss / val_bpb = ln 2 * bytes per token of that log's final evaluation).

Every check is a function returning Check records (check, status, message, log), so tests assert on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pack_code  # noqa: E402
from run_bench import parse_log  # noqa: E402
from significance import mean_std, one_sample_greater  # noqa: E402

LIMIT_BYTES = 16_000_000  # decimal: 16 MB
LIMIT_TRAIN_S = 600.0     # training + GPTQ calibration (it reads training data), on 8xH100
LIMIT_EVAL_S = 600.0      # all of evaluation, on 8xH100
MIN_NATS = 0.005          # a new record beats the prior one by at least this many nats per token ...
MAX_P = 0.01              # ... at p < 0.01 ...
MIN_SEEDS = 3             # ... over at least 3 seeds
LEGAL_TTT_MODES = ("chunked", "lora", "phased")
SCORE_TOL = 5e-9 + 1e-12  # submission.json vs the mean of the logs (8-decimal rounding, plus float slack)
REQUIRED_FILES = ("README.md", "submission.json", "train_gpt.py")
SUBMISSION_FIELDS = ("name", "author", "github_id", "val_bpb", "val_loss", "bytes_total", "seeds", "date", "blurb")
NOT_8XH100 = "not an 8xH100 run"

PASS, FAIL, NOTE = "PASS", "FAIL", "NOTE"


@dataclasses.dataclass
class Check:
    check: str
    status: str  # PASS | FAIL | NOTE
    message: str
    log: str | None = None  # the log file name for per-log checks

    def line(self) -> str:
        where = f"[{self.log}] " if self.log else ""
        return f"{self.status:<4}  {self.check:<13} {where}{self.message}"


@dataclasses.dataclass
class Log:
    name: str  # file name inside the folder
    path: str
    parsed: dict

    @property
    def hp(self) -> dict:
        return self.parsed.get("hparams") or {}

    @property
    def prov(self) -> dict:
        return self.parsed.get("provenance") or {}

    @property
    def gpu(self):
        return self.prov.get("gpu") or self.parsed.get("gpu")

    @property
    def world(self):
        return self.prov["world"] if self.prov.get("world") is not None else self.parsed.get("world")

    @property
    def seed(self):
        return self.hp.get("seed")

    @property
    def is_8xh100(self) -> bool:
        return bool(self.gpu) and "H100" in self.gpu and self.world == 8


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def find_logs(folder: str) -> list[Log]:
    """The training logs of a record folder: *.log / *.txt files (not recursive) with a `hyperparameters ` line."""
    logs = []
    paths = sorted(set(glob.glob(os.path.join(folder, "*.log")) + glob.glob(os.path.join(folder, "*.txt"))))
    for path in paths:
        if not os.path.isfile(path):
            continue
        text = _read(path)
        if any(line.strip().startswith("hyperparameters ") for line in text.splitlines()):
            logs.append(Log(os.path.basename(path), path, parse_log(text)))
    return logs


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _fmt_bytes(n) -> str:
    return "?" if n is None else f"{n:,}"


def ttt_on(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "off", "no", "none")
    return bool(value)


# ----------------------------------------------------------------------------------------------
# Checks (each returns a list of Check)
# ----------------------------------------------------------------------------------------------


def check_files(folder: str, logs: list[Log]) -> list[Check]:
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    out = []
    if missing:
        out.append(Check("files", FAIL, "missing required file(s): " + ", ".join(missing)))
    if not logs:
        out.append(Check("files", FAIL, "no training log (a *.log or *.txt file with a 'hyperparameters' line)"))
    if not out:
        out.append(Check("files", PASS, ", ".join(REQUIRED_FILES) + f", {len(logs)} log(s): "
                         + ", ".join(log.name for log in logs)))
    return out


def check_code(folder: str, logs: list[Log]) -> list[Check]:
    """train_gpt.py compiles; every log's code_sha256 is its sha256. A packed train_gpt.py (bench/pack_code.py) is
    read without running it: the wrapper and its inner source must compile, and the logs' code_sha256 is the inner
    source's sha256 (what a run of the packed file logs)."""
    code = os.path.join(folder, "train_gpt.py")
    if not os.path.isfile(code):
        return [Check("compile", FAIL, "train_gpt.py missing: nothing to compile or hash")]
    with open(code, "rb") as f:
        src = f.read()
    out, what = [], "train_gpt.py"
    try:
        compile(src, code, "exec", dont_inherit=True)
        if pack_code.is_packed(src):
            info = pack_code.parse_packed(src)
            compile(info["source"], code, "exec", dont_inherit=True)
            what = "train_gpt.py's inner source"
            out.append(Check("compile", PASS, f"train_gpt.py is packed ({info['codec']}, {len(src):,} bytes); it "
                             f"and its inner source ({info['source_bytes']:,} bytes) compile"))
            src = info["source"]
        else:
            out.append(Check("compile", PASS, f"train_gpt.py compiles ({len(src):,} bytes)"))
    except (SyntaxError, ValueError) as e:  # PackError is a ValueError
        out.append(Check("compile", FAIL, f"train_gpt.py does not compile or unpack: {e}"))
    sha = hashlib.sha256(src).hexdigest()
    for log in logs:
        logged = log.prov.get("code_sha256")
        if "provenance" not in log.parsed:
            out.append(Check("code_sha256", FAIL, "log has no provenance line", log.name))
        elif logged != sha:
            out.append(Check("code_sha256", FAIL, f"code_sha256 mismatch: log {logged} != {what} {sha}", log.name))
        else:
            out.append(Check("code_sha256", PASS, f"code_sha256 matches {what} ({sha[:12]}...)", log.name))
    return out


def check_bytes(folder: str, logs: list[Log], artifact: str | None = None) -> list[Check]:
    """bytes_code == size(train_gpt.py); bytes_model + code == bytes_total <= 16e6; the artifact matches a log."""
    code = os.path.join(folder, "train_gpt.py")
    if not os.path.isfile(code):
        return [Check("bytes_total", FAIL, "train_gpt.py missing: cannot count code bytes")]
    code_bytes = os.path.getsize(code)
    with open(code, "rb") as f:
        packed = pack_code.is_packed(f.read(len(pack_code.MARKER)))
    out = []
    for log in logs:
        p = log.parsed
        logged_code, logged_model, logged_total = p.get("bytes_code"), p.get("bytes_model"), p.get("bytes_total")
        if logged_code is None:
            out.append(Check("bytes_code", FAIL, "log has no bytes_code line", log.name))
        elif logged_code != code_bytes:
            hint = ""
            if log.prov.get("packed_bytes") is None and packed:
                hint = " (train_gpt.py is packed but the log's run was not: run the packed file)"
            elif log.prov.get("packed_bytes") is not None and not packed:
                hint = " (the log's run was of a packed file: put that packed train_gpt.py in the folder)"
            out.append(Check("bytes_code", FAIL, f"bytes_code mismatch: log {logged_code:,} != train_gpt.py "
                             f"{code_bytes:,} bytes{hint}", log.name))
        else:
            out.append(Check("bytes_code", PASS, f"bytes_code {code_bytes:,} = size of train_gpt.py", log.name))
        if logged_total is None or logged_model is None:
            out.append(Check("bytes_total", FAIL, "log has no bytes_model/bytes_total line", log.name))
            continue
        recomputed = logged_model + code_bytes
        if recomputed != logged_total:
            out.append(Check("bytes_total", FAIL, f"bytes_total mismatch: bytes_model {logged_model:,} + code "
                             f"{code_bytes:,} = {recomputed:,} != logged {logged_total:,}", log.name))
        elif logged_total > LIMIT_BYTES:
            out.append(Check("bytes_total", FAIL, f"bytes_total {logged_total:,} over the limit "
                             f"{LIMIT_BYTES:,}", log.name))
        else:
            out.append(Check("bytes_total", PASS, f"bytes_total {logged_total:,} = model {logged_model:,} + code "
                             f"{code_bytes:,} <= {LIMIT_BYTES:,}", log.name))
    given = artifact is not None
    artifact = artifact or os.path.join(folder, "final_model.ptz")
    if not os.path.isfile(artifact):
        if given:
            out.append(Check("artifact", FAIL, f"artifact {artifact} not found"))
        else:
            out.append(Check("artifact", NOTE, "no final_model.ptz in the folder (--artifact PATH checks one): "
                             "bytes_total taken from the logs' bytes_model"))
        return out
    art = os.path.getsize(artifact)
    total = art + code_bytes
    name = os.path.basename(artifact)
    matching = [log.name for log in logs if log.parsed.get("bytes_total") == total]
    if total > LIMIT_BYTES:
        out.append(Check("artifact", FAIL, f"bytes_total {total:,} = {name} {art:,} + code {code_bytes:,} over the "
                         f"limit {LIMIT_BYTES:,}"))
    elif logs and not matching:
        logged = ", ".join(f"{log.name} {_fmt_bytes(log.parsed.get('bytes_total'))}" for log in logs)
        out.append(Check("artifact", FAIL, f"bytes_total mismatch: {name} {art:,} + code {code_bytes:,} = "
                         f"{total:,} equals no log's bytes_total ({logged})"))
    else:
        out.append(Check("artifact", PASS, f"bytes_total {total:,} = {name} {art:,} + code {code_bytes:,} <= "
                         f"{LIMIT_BYTES:,}" + (f" (= {', '.join(matching)})" if matching else "")))
    return out


def _where(log: Log) -> str:
    return f"gpu:{log.gpu or 'none'} world:{log.world if log.world is not None else '?'}"


def check_log(log: Log) -> list[Check]:
    """Per-log rules: hardware, the 600 s clocks, full validation split, legal TTT, finished."""
    p, hp, on8 = log.parsed, log.hp, log.is_8xh100
    out = []
    # hardware
    if on8:
        out.append(Check("hardware", PASS, f"8xH100 ({log.gpu}, world {log.world})", log.name))
    else:
        out.append(Check("hardware", NOTE, f"{NOT_8XH100} ({_where(log)})", log.name))
    # training clock (training + calibration)
    ct = p.get("clock_train")
    if ct is None:
        out.append(Check("train_time", FAIL if on8 else NOTE, ("" if on8 else f"{NOT_8XH100}; ")
                         + "log has no clock_train line", log.name))
    else:
        judged = max(ct["total"], ct["training"] + ct["calibration"])
        figures = f"training {ct['training']:g}s + calibration {ct['calibration']:g}s = {judged:.1f}s"
        if not on8:
            out.append(Check("train_time", NOTE, f"{NOT_8XH100}: {figures} on {_where(log)} (the {LIMIT_TRAIN_S:g}s "
                             "limit applies on 8xH100)", log.name))
        elif judged > LIMIT_TRAIN_S:
            out.append(Check("train_time", FAIL, f"training over {LIMIT_TRAIN_S:g}s: {figures}", log.name))
        else:
            out.append(Check("train_time", PASS, f"{figures} <= {LIMIT_TRAIN_S:g}s", log.name))
    # evaluation clock
    ce = p.get("clock_eval")
    if ce is None:
        out.append(Check("eval_time", FAIL if on8 else NOTE, ("" if on8 else f"{NOT_8XH100}; ")
                         + "log has no clock_eval line", log.name))
    elif not on8:
        est = f", est_8gpu {ce['est_8gpu']:g}s (estimate)" if ce.get("est_8gpu") is not None else ""
        out.append(Check("eval_time", NOTE, f"{NOT_8XH100}: eval {ce['total']:g}s on {_where(log)}{est}", log.name))
    elif ce["total"] > LIMIT_EVAL_S:
        out.append(Check("eval_time", FAIL, f"evaluation over {LIMIT_EVAL_S:g}s: {ce['total']:g}s", log.name))
    else:
        out.append(Check("eval_time", PASS, f"evaluation {ce['total']:g}s <= {LIMIT_EVAL_S:g}s", log.name))
    # full validation split
    vmax = (p.get("data") or {}).get("val_max_tokens", hp.get("val_max_tokens"))
    tokens = p.get("val_tokens")
    tok_text = f"{tokens:,} tokens" if isinstance(tokens, int) else "token count not logged"
    if vmax is None:
        out.append(Check("full_val", FAIL if on8 else NOTE, ("" if on8 else f"{NOT_8XH100}; ")
                         + "log has no val_max_tokens (data line or hyperparameters)", log.name))
    elif vmax == 0:
        out.append(Check("full_val", PASS, f"full validation split scored (val_max_tokens:0, {tok_text})", log.name))
    else:
        msg = f"partial validation: val_max_tokens:{vmax} ({tok_text}), not the full split"
        out.append(Check("full_val", FAIL if on8 else NOTE, msg if on8 else f"{msg}; {NOT_8XH100}", log.name))
    # TTT legality
    if not hp:
        out.append(Check("ttt", FAIL, "log has no parseable hyperparameters line", log.name))
    elif not ttt_on(hp.get("ttt", False)):
        out.append(Check("ttt", PASS, "ttt off", log.name))
    else:
        mode = hp.get("ttt_mode", "chunked")
        if mode in LEGAL_TTT_MODES:
            out.append(Check("ttt", PASS, f"ttt on, ttt_mode {mode}" + ("" if "ttt_mode" in hp else
                                                                       " (ttt_mode absent: chunked)"), log.name))
        else:
            out.append(Check("ttt", FAIL, f"illegal/unknown TTT mode {mode!r} (legal: {', '.join(LEGAL_TTT_MODES)})",
                             log.name))
    # finished
    lacking = [what for what, key in (("'final val_loss:'", "final_bpb"), ("'final val_loss:'", "final_loss"),
                                      ("'bytes_total:'", "bytes_total")) if p.get(key) is None]
    if lacking:
        out.append(Check("finished", FAIL, "log did not finish: no " + " / ".join(dict.fromkeys(lacking)) + " line",
                         log.name))
    else:
        out.append(Check("finished", PASS, f"finished: val_bpb {p['final_bpb']:.8f} val_loss {p['final_loss']:.8f} "
                         f"(source {p.get('final_source')}, seed {log.seed})", log.name))
    return out


def _scored(logs: list[Log]) -> list[Log]:
    return [log for log in logs if log.parsed.get("final_bpb") is not None and log.parsed.get("final_loss") is not None]


def check_submission(folder: str, logs: list[Log]) -> list[Check]:
    path = os.path.join(folder, "submission.json")
    if not os.path.isfile(path):
        return [Check("submission", FAIL, "submission.json missing")]
    try:
        with open(path, encoding="utf-8") as f:
            sub = json.load(f)
    except (OSError, ValueError) as e:
        return [Check("submission", FAIL, f"submission.json is not valid JSON: {e}")]
    if not isinstance(sub, dict):
        return [Check("submission", FAIL, "submission.json is not a JSON object")]
    out = []
    missing = [k for k in SUBMISSION_FIELDS if k not in sub or sub[k] in (None, "")]
    if missing:
        out.append(Check("submission", FAIL, "submission.json field(s) missing or empty: " + ", ".join(missing)))
    else:
        out.append(Check("submission", PASS, "submission.json has " + ", ".join(SUBMISSION_FIELDS)))
    scored = _scored(logs)
    if not scored:
        out.append(Check("submission", FAIL, "no finished log to compare submission.json with"))
        return out
    for key, parsed_key in (("val_bpb", "final_bpb"), ("val_loss", "final_loss")):
        if key not in sub:
            continue
        mean = sum(log.parsed[parsed_key] for log in scored) / len(scored)
        value = sub[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            out.append(Check("submission", FAIL, f"submission.json {key} {value!r} is not a number"))
        elif abs(value - mean) > SCORE_TOL:
            out.append(Check("submission", FAIL, f"submission.json {key} {value!r} != mean over {len(scored)} log(s) "
                             f"{mean:.10f} (mean mismatch)"))
        else:
            out.append(Check("submission", PASS, f"{key} {value} = mean over {len(scored)} log(s)"))
    if "bytes_total" in sub:
        totals = [log.parsed.get("bytes_total") for log in logs if log.parsed.get("bytes_total") is not None]
        if totals and sub["bytes_total"] != max(totals):
            out.append(Check("submission", FAIL, f"submission.json bytes_total {sub['bytes_total']!r} != max over the "
                             f"logs {max(totals):,}"))
        elif totals:
            out.append(Check("submission", PASS, f"bytes_total {max(totals):,} = max over the logs"))
    seeds = [log.seed for log in logs]
    if None in seeds:
        out.append(Check("submission", FAIL, "a log has no seed in its hyperparameters: "
                         + ", ".join(log.name for log in logs if log.seed is None)))
    else:
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            out.append(Check("submission", FAIL, f"duplicate seed(s) among the logs: {dup}"))
        if "seeds" in sub:
            want = sorted(seeds)
            if sub["seeds"] != want:
                out.append(Check("submission", FAIL, f"submission.json seeds {sub['seeds']!r} != the logs' seeds "
                                 f"{want}"))
            else:
                out.append(Check("submission", PASS, f"seeds {want} = the logs' seeds"))
    return out


def improvement_nats(log: Log, prior_bpb: float) -> float:
    """Per-token improvement in nats: (prior - bpb) * ln2 * bytes/token, with ln2 * bytes/token = val_loss / val_bpb."""
    bpb, loss = log.parsed["final_bpb"], log.parsed["final_loss"]
    return (prior_bpb - bpb) * loss / bpb


def significance(logs: list[Log], prior_bpb: float) -> dict:
    """The figures of the one-sided test H0: mean improvement <= 0.005 nats vs H1: > 0.005, over the seeds."""
    scored = _scored(logs)
    gains = [improvement_nats(log, prior_bpb) for log in scored]
    res = {"n": len(gains), "seeds": sorted({log.seed for log in scored if log.seed is not None}),
           "improvements": gains, "mean": None, "std": None, "t": None, "df": None, "p": None}
    if gains:
        res["mean"], res["std"] = mean_std(gains)
    if len(gains) >= 2:
        res["t"], res["df"], res["p"] = one_sample_greater(gains, MIN_NATS)
    return res


def check_significance(logs: list[Log], prior_bpb: float | None) -> list[Check]:
    if prior_bpb is None:
        return [Check("significance", NOTE, "no --prior-bpb given: improvement over the prior record not tested")]
    r = significance(logs, prior_bpb)
    out = []
    n_seeds = len(r["seeds"])
    if n_seeds < MIN_SEEDS or r["n"] < MIN_SEEDS:
        out.append(Check("seeds", FAIL, f"too few seeds: {r['n']} scored log(s), {n_seeds} distinct seed(s) "
                         f"(need at least {MIN_SEEDS})"))
    else:
        out.append(Check("seeds", PASS, f"{n_seeds} seeds: {r['seeds']}"))
    if r["p"] is None:
        out.append(Check("significance", FAIL, f"cannot test the improvement with {r['n']} scored log(s)"))
        return out
    figures = (f"n={r['n']} mean={r['mean']:.5f} std={r['std']:.5f} nats, t={r['t']:.3f} df={r['df']:g} "
               f"p={r['p']:.3g} (H0: improvement <= {MIN_NATS} nats vs prior {prior_bpb} bpb)")
    if r["p"] < MAX_P:
        out.append(Check("significance", PASS, f"improvement > {MIN_NATS} nats at p < {MAX_P}: {figures}"))
    else:
        out.append(Check("significance", FAIL, f"improvement not significant (need p < {MAX_P}): {figures}"))
    return out


def run_checks(folder: str, prior_bpb: float | None = None, artifact: str | None = None) -> list[Check]:
    if not os.path.isdir(folder):
        return [Check("files", FAIL, f"{folder} is not a folder")]
    logs = find_logs(folder)
    results = check_files(folder, logs) + check_code(folder, logs) + check_bytes(folder, logs, artifact)
    for log in logs:
        results += check_log(log)
    results += check_submission(folder, logs) + check_significance(logs, prior_bpb)
    return results


def failures(results: list[Check]) -> list[Check]:
    return [r for r in results if r.status == FAIL]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--prior-bpb", type=float, help="val_bpb of the record to beat: tests >= 0.005 nats at p < 0.01")
    ap.add_argument("--artifact", help="the compressed model file (default FOLDER/final_model.ptz if present)")
    args = ap.parse_args(argv)
    results = run_checks(args.folder, args.prior_bpb, args.artifact)
    print(f"check_record: {os.path.abspath(args.folder)}")
    for r in results:
        print(r.line())
    if args.prior_bpb is not None:
        logs = find_logs(args.folder)
        r = significance(logs, args.prior_bpb)
        for log, gain in zip(_scored(logs), r["improvements"]):
            print(f"      improvement   [{log.name}] seed {log.seed}: ({args.prior_bpb} - {log.parsed['final_bpb']:.8f})"
                  f" * {log.parsed['final_loss']:.8f} / {log.parsed['final_bpb']:.8f} = {gain:.6f} nats")
    counts = {s: sum(r.status == s for r in results) for s in (PASS, NOTE, FAIL)}
    print(f"summary: {counts[PASS]} PASS, {counts[NOTE]} NOTE, {counts[FAIL]} FAIL"
          + (" -> NOT ready" if counts[FAIL] else " -> no FAIL, but read the NOTEs" if counts[NOTE] else " -> ready"))
    return 1 if counts[FAIL] else 0


if __name__ == "__main__":
    sys.exit(main())
