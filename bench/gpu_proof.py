#!/usr/bin/env python3
"""Summary lines for bench/gpu_proof.sh: one line per stage, built from the stage's train_gpt.py log.

    python bench/gpu_proof.py env STAGE ELAPSED                      # (a) versions, GPU, SDPA backends, memory
    python bench/gpu_proof.py run KIND STAGE LOG RC ELAPSED [--from-step N]   # KIND: smoke | speed | frontier
    python bench/gpu_proof.py ratio STAGE LOG_A LOG_B [--from-step N]         # (c) the default / naive ratios

Every line reads `stage:<name> status:<ok|fail|timeout|incomplete> elapsed_s:<s> key:value ...` and every figure
that a log lacks is `n/a`, never an exception: the logs may come from a killed run or a newer train_gpt.py.

status: timeout when the stage's `timeout` killed it (exit 124 or 137); fail for any other non-zero exit, except that
a speed stage whose timed steps are in the log is ok (it proves its figures; the exit code is still shown);
incomplete when it exited 0 without the lines the stage exists to show; else ok.

Speed: ms/step over the steps after --from-step (default 5: compile priming already ran, WARMUP_STEPS, and was
undone), from the `step:N/M ... step_avg:Xms` lines (train_time = step_avg x N, so the window's time is exact to
the printed digits): (t_last - t_from) / (last - from). tokens/s = TRAIN_BATCH_TOKENS / that. MFU = FLOPs per token
(bench/run_bench.py: 6 x matmul params + attention 6 L T d) x tokens/s / peak, peak = 989 TFLOP/s (dense bf16, H100
SXM / H200; run_bench.PEAK_FLOPS by GPU name; n/a on CPU).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_bench  # noqa: E402  (standard library only at import)

TIMEOUT_CODES = (124, 137)
_STEP = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+).*?step_avg:([\d.]+)ms", re.M)
_COMPILE = re.compile(r"^compile: (.*)$", re.M)
_GUARD = re.compile(r"^compile_guard: (\S+)", re.M)
_ERROR = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception|Interrupt)|[\w.]*(?:OutOfMemory|ArtifactTooLarge)\w*)[:\s].*$",
                    re.M)


def fmt(value, spec: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and spec:
        return format(value, spec)
    return str(value).replace(" ", "_") or "n/a"


def line(stage: str, status: str, elapsed, fields: dict, error: str | None = None) -> str:
    body = " ".join(f"{k}:{v}" for k, v in fields.items())
    out = f"stage:{stage} status:{status} elapsed_s:{fmt(elapsed, '.1f')} {body}".rstrip()
    if error:
        out += " error:" + error.strip().replace("\n", " ")[:200]
    return out


def read(path: str | None) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def last_error(*texts: str) -> str | None:
    """The last exception-looking line of the stage's output (its traceback's last line), if any."""
    for text in texts:
        found = _ERROR.findall(text)
        if found:
            return found[-1]
    return None


def steady_speed(log: str, from_step: int = 5) -> dict:
    """ms/step over the training steps after `from_step`, and the window it used."""
    points = [(int(s), float(avg) * int(s)) for s, _, avg in _STEP.findall(log)]  # (step, ms since training start)
    points = sorted(dict(points).items())
    window = [p for p in points if p[0] >= from_step]
    if len(window) < 2:
        return {"ms_per_step": None, "timed_steps": None, "from_step": None}
    (s0, t0), (s1, t1) = window[0], window[-1]
    return {"ms_per_step": (t1 - t0) / (s1 - s0), "timed_steps": s1 - s0, "from_step": s0}


def speed_fields(log: str, from_step: int) -> dict:
    parsed = run_bench.parse_log(log)
    hp = parsed.get("hparams") or {}
    sp = steady_speed(log, from_step)
    ms = sp["ms_per_step"]
    tokens_per_step = hp.get("train_batch_tokens")
    tok_s = tokens_per_step / (ms / 1000.0) if ms and tokens_per_step else None
    peak = run_bench.peak_flops_for(parsed.get("gpu"))
    fpt = mfu = None
    try:
        if hp:
            fpt = run_bench.flops_per_token(hp, looping=False)
            if tok_s and peak:
                mfu = fpt * tok_s / peak  # one GPU
    except (KeyError, TypeError, ValueError):
        pass
    return {"ms_per_step": fmt(ms, ".1f"), "timed_steps": fmt(sp["timed_steps"]),
            "from_step": fmt(sp["from_step"]), "tokens_per_step": fmt(tokens_per_step),
            "tokens_per_s": fmt(tok_s, ".0f"), "flops_per_token": fmt(fpt, ".4g"),
            "mfu": fmt(mfu, ".3f"), "peak_tflops": fmt(peak / 1e12 if peak else None, ".0f"),
            "peak_mem_mib": fmt(parsed.get("peak_memory_mib")), "params": fmt(parsed.get("params")),
            "compiled": fmt(_compiled(log)), "code": _code(parsed), "gpu": fmt(parsed.get("gpu"))}, ms, tok_s


def _compiled(log: str):
    m = re.search(r"^run_id:.*? compile:(\d)", log, re.M)
    return m.group(1) if m else None


def _code(parsed: dict) -> str:
    prov = parsed.get("provenance") or {}
    if prov.get("packed_bytes") is not None:
        return f"packed({prov['packed_bytes']}B)"
    return "readable" if prov else "n/a"


def run_fields(kind: str, log: str, from_step: int) -> tuple[dict, bool]:
    """(fields, proved) for a smoke / frontier / speed stage."""
    parsed = run_bench.parse_log(log)
    evals = parsed.get("evals", {})
    if kind == "speed":
        fields, ms, _ = speed_fields(log, from_step)
        return fields, ms is not None
    comp = _COMPILE.findall(log)
    guard = _GUARD.findall(log)
    fields = {"steps": fmt(parsed.get("steps")), "train_s": fmt(parsed.get("train_seconds")),
              "step_avg_ms": fmt(parsed.get("last_step_avg_ms")), "last_train_loss": fmt(parsed.get("last_train_loss")),
              "pre_quant_bpb": fmt(parsed.get("pre_quant_bpb")),
              "roundtrip_bpb": fmt(evals.get("roundtrip", {}).get("val_bpb")),
              "ttt_bpb": fmt(evals.get("ttt", {}).get("val_bpb")),
              "ttt_s": fmt(evals.get("ttt", {}).get("eval_seconds")),
              "bytes_total": fmt(parsed.get("bytes_total")), "export_s": fmt(parsed.get("export_seconds")),
              "peak_mem_mib": fmt(parsed.get("peak_memory_mib")), "compiled": fmt(_compiled(log)),
              "compile_guard": fmt(guard[-1] if guard else None),
              "graphs": fmt(comp[-1].replace("graphs ", "").replace(" ", ",") if comp else None)}
    if kind == "frontier":
        hp = parsed.get("hparams") or {}
        fields.update(looping_on_step=fmt(parsed.get("looping_step")), vocab=fmt(hp.get("vocab_size")),
                      lanes=fmt(hp.get("parallel_lanes")), doc_mask=fmt(hp.get("attn_doc_mask")),
                      ttt_mode=fmt(hp.get("ttt_mode")))
    proved = "ttt" in evals or ("roundtrip" in evals and not (parsed.get("hparams") or {}).get("ttt", True))
    return fields, proved and parsed.get("final_bpb") is not None


def status_of(rc: int, proved: bool, kind: str) -> str:
    if kind == "speed" and proved:
        return "ok"
    if rc in TIMEOUT_CODES:
        return "timeout"
    if rc != 0:
        return "fail"
    return "ok" if proved else "incomplete"


def env_fields() -> tuple[dict, str | None]:
    """(a) versions, the GPU, its free memory and the SDPA backends that run; (fields, error or None)."""
    fields, error = {}, None
    try:
        import numpy
        import sentencepiece
        import torch
        fields.update(torch=torch.__version__, cuda=torch.version.cuda, numpy=numpy.__version__,
                      sentencepiece=sentencepiece.__version__, python=sys.version.split()[0], cpus=os.cpu_count())
        try:
            import zstandard
            fields["zstandard"] = zstandard.__version__
        except ImportError as e:
            fields["zstandard"], error = "missing", f"zstandard: {e}"
        try:
            import triton
            fields["triton"] = triton.__version__
        except ImportError:
            fields["triton"] = None
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            cap = torch.cuda.get_device_capability()
            fields.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                          capability=f"{cap[0]}.{cap[1]}", free_gib=f"{free / 2**30:.1f}",
                          total_gib=f"{total / 2**30:.1f}", bf16=int(torch.cuda.is_bf16_supported()))
            fields["sdpa"] = sdpa_backends(torch)
        else:
            fields.update(gpu="none", gpus=0, sdpa=None)
            if os.environ.get("REHEARSE", "0") != "1":
                error = error or "no CUDA device"
    except Exception as e:  # noqa: BLE001 - the line must be written whatever broke
        error = f"{type(e).__name__}: {e}"
    return {k: fmt(v) for k, v in fields.items()}, error


def sdpa_backends(torch) -> str:
    """Which SDPA backends run a bf16 causal attention of a training shape (1 x 8 heads x 2048 x 64)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, 8, 2048, 64, device="cuda", dtype=torch.bfloat16)
    out = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            out.append(f"{name.split('_')[0].lower()}=absent")
            continue
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            torch.cuda.synchronize()
            out.append(f"{name.split('_')[0].lower()}=ok")
        except Exception:  # noqa: BLE001
            out.append(f"{name.split('_')[0].lower()}=no")
    return ",".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("stage")
    e.add_argument("elapsed", type=float, nargs="?", default=0.0)
    r = sub.add_parser("run")
    r.add_argument("kind", choices=("smoke", "speed", "frontier"))
    r.add_argument("stage")
    r.add_argument("log")
    r.add_argument("rc", type=int)
    r.add_argument("elapsed", type=float)
    r.add_argument("--out", help="the stage's stdout/stderr, searched for the error line")
    r.add_argument("--from-step", type=int, default=5)
    q = sub.add_parser("ratio")
    q.add_argument("stage")
    q.add_argument("log_a")
    q.add_argument("log_b")
    q.add_argument("--from-step", type=int, default=5)
    args = ap.parse_args(argv)
    if args.cmd == "env":
        t0 = time.perf_counter()
        fields, error = env_fields()
        print(line(args.stage, "fail" if error else "ok", args.elapsed + time.perf_counter() - t0, fields, error))
        return 1 if error else 0
    if args.cmd == "run":
        log, out = read(args.log), read(args.out)
        fields, proved = run_fields(args.kind, log, args.from_step)
        status = status_of(args.rc, proved, args.kind)
        fields["rc"] = str(args.rc)
        error = None if status == "ok" and args.rc == 0 else (last_error(out, log) or
                                                               ("no log" if not log else None))
        print(line(args.stage, status, args.elapsed, fields, error))
        return 0 if status == "ok" else 1
    a, b = read(args.log_a), read(args.log_b)
    _, ms_a, tok_a = speed_fields(a, args.from_step)
    _, ms_b, tok_b = speed_fields(b, args.from_step)
    ok = None not in (ms_a, ms_b, tok_a, tok_b)
    fields = {"ms_per_step_ratio": fmt(ms_a / ms_b if ok else None, ".3f"),
              "tokens_per_s_ratio": fmt(tok_a / tok_b if ok else None, ".3f"),
              "note": "first/second; same GPU, same call"}
    print(line(args.stage, "ok" if ok else "incomplete", 0.0, fields))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
