#!/usr/bin/env python3
"""Benchmark / ablation runner for train_gpt.py.

For every named config it launches train_gpt.py (plain `python` for one process, torch.distributed.run for
more), streams the output to <out-dir>/<name>.stdout, parses the run's log file (<out-dir>/<name>.txt) and
appends one JSON line per run to --out-jsonl: speed (steps, ms/step, tokens/s, MFU), memory, the scores
(pre-quant, round-trip, sliding, TTT, quantization gap), artifact bytes and eval time. A markdown table of
the runs ends the output; with --baseline NAME it carries each row's final val_bpb minus the baseline's.

Data: either --corpus FILES (+ --val-corpus FILES | --val-docs N) with --shards-dir DIR, which runs
data/build_shards.py into DIR unless DIR already holds shards (--rebuild forces it), or --data-path DIR
with existing fineweb_train_*.bin / fineweb_val_*.bin shards.

Knob precedence (later wins): the caller's environment < --seconds < --knob < the config's own knobs <
the paths the bench manages (DATA_PATH, TOKENIZER_PATH, RUN_ID, LOG_DIR, ARTIFACT_PATH).

Examples:
    python bench/run_bench.py --data-path /tmp/shards --ablations --seconds 600
    python bench/run_bench.py --corpus a.jsonl.zst --val-docs 500 --shards-dir /tmp/s \\
        --config full= --config no_bigram=BIGRAM_BUCKETS=0 --baseline full
    python bench/run_bench.py --table-only --out-jsonl bench/out/results.jsonl --baseline full

Only the standard library is imported at module level (torch only to count GPUs when --nproc is not given,
sentencepiece only to read the tokenizer's vocabulary size for --ablations).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SCRIPT = os.path.join(ROOT, "train_gpt.py")
BUILD_SHARDS = os.path.join(ROOT, "data", "build_shards.py")

# Ablations of the seed stack (name -> knobs), each one change away from "full", the stack as shipped: the
# "no_*" rows switch one of its parts off, the rest switch on one technique of the records (TECHNIQUES.md) that the
# seed stack leaves off. "frontier" is the whole PRESET=frontier stack; it needs sp8192 shards (ABLATION_VOCAB).
ABLATIONS: list[tuple[str, dict[str, str]]] = [
    ("full", {}),
    ("no_smear", {"SMEAR_GATE": "0"}),
    ("no_bigram", {"BIGRAM_BUCKETS": "0"}),
    ("relu2", {"MLP_ACT": "relu2"}),
    ("no_xsa", {"XSA_LAST_N": "0"}),
    ("full_rope", {"ROPE_DIMS": "0"}),
    ("no_ln_scale", {"LN_SCALE": "0"}),
    ("no_unet", {"UNET_SKIPS": "0"}),
    ("no_ortho", {"ORTHO_INIT": "0"}),
    ("no_qat", {"QAT": "0"}),
    ("swa", {"AVERAGING": "swa"}),
    ("no_averaging", {"AVERAGING": "none"}),
    ("no_gptq", {"GPTQ": "0"}),
    ("mlp_int6", {"QUANT_MLP_BITS": "6"}),
    ("parallel_resid", {"PARALLEL_RESID_FROM": "7"}),
    ("two_lane", {"PARALLEL_RESID_FROM": "7", "PARALLEL_LANES": "2"}),
    ("loops", {"NUM_LOOPS": "1", "LOOP_START": "4", "LOOP_END": "5"}),
    ("doc_mask", {"ATTN_DOC_MASK": "1"}),
    ("attn_gate", {"ATTN_GATE": "1"}),
    ("skip_gates", {"SKIP_GATES": "1"}),
    ("muon_eq_r", {"MUON_EQ_R": "1"}),
    ("polar_ns", {"MUON_NS_COEFFS": "polar"}),
    ("gptq_embed", {"GPTQ_EMBED": "1"}),
    ("lqer", {"LQER_RANK": "4"}),
    ("quant_small_fp16", {"QUANT_SMALL_BITS": "0"}),
    ("no_ttt", {"TTT": "0"}),
    ("ttt_lora", {"TTT_MODE": "lora"}),
    ("ttt_phased", {"TTT_MODE": "phased"}),
    ("frontier", {"PRESET": "frontier"}),
]

# Ablations that only run on shards of another vocabulary (VOCAB_SIZE they set, through their preset). With
# --ablations they are skipped, with a message, unless the data's tokenizer has that many pieces or --knob sets
# VOCAB_SIZE.
ABLATION_VOCAB = {"frontier": 8192}

MANAGED_VARS = ("DATA_PATH", "TOKENIZER_PATH", "RUN_ID", "LOG_DIR", "ARTIFACT_PATH")

# Dense bf16 tensor-core peak per GPU, FLOP/s (no sparsity). Matched on the lower-cased device name, first hit wins.
PEAK_FLOPS = [
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),   # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("h200", 989e12),   # same tensor cores as H100 SXM
    ("h800", 989e12),
    ("a100", 312e12),
]


# ----------------------------------------------------------------------------------------------
# Log parsing
# ----------------------------------------------------------------------------------------------

_KV = re.compile(r"([A-Za-z_][\w]*):(\S+)")


def _num(text):
    """'12.5s' -> 12.5, '3.1ms' -> 3.1, '+0.0123' -> 0.0123, '42' -> 42; None when not a number."""
    if text is None:
        return None
    t = text.strip().rstrip(",")
    for unit in ("ms", "s"):
        if t.endswith(unit) and t[:-len(unit)].replace(".", "", 1).lstrip("+-").isdigit():
            t = t[:-len(unit)]
            break
    try:
        value = float(t)
    except ValueError:
        return None
    return int(value) if re.fullmatch(r"[+-]?\d+", t) else value


def _kv(line: str) -> dict:
    return {k: v for k, v in _KV.findall(line)}


def _seconds(text):
    """'144.5s' -> 144.5, '1500ms' -> 1.5 (a train_time value in seconds); None when not a number."""
    if text is None:
        return None
    value = _num(text)
    if value is None:
        return None
    return value / 1000.0 if text.strip().endswith("ms") else float(value)


# New-format lines (see bench/README.md, "Log lines the record tools read"):
#   provenance code_sha256:<hex> torch:<ver> cuda:<ver|none> gpu:<device name|none> gpus:<N> world:<N>
#              [packed_bytes:<N> source_bytes:<N>]   (run from a packed train_gpt.py; code_sha256 = the inner source's)
#   data train_shards:N val_shards:N val_tokens:N val_max_tokens:N
#   clock_train: training 588.9s + calibration 3.2s = 592.1s limit:600s
#   clock_eval: total 114.5s limit:600s world:1 est_8gpu:14.3s (estimate)
_GPU_NAME = re.compile(r"(?:^|\s)gpu:(.*?)(?=\s+[A-Za-z_]\w*:|\s*$)")
_CLOCK_TRAIN = re.compile(r"clock_train:\s*training\s+([\d.]+)s\s*\+\s*calibration\s+([\d.]+)s\s*=\s*([\d.]+)s")
_CLOCK_EVAL = re.compile(r"clock_eval:\s*total\s+([\d.]+)s")


def parse_log(text: str) -> dict:
    """Raw facts from a train_gpt.py log (or its stdout); keys are absent when the line is."""
    out: dict = {"evals": {}, "val_curve": [], "val_points": [], "train_points": []}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("provenance "):
            kv = _kv(line)
            m = _GPU_NAME.search(line)
            gpu = m.group(1).strip() if m else None
            out["provenance"] = {"code_sha256": kv.get("code_sha256"), "torch": kv.get("torch"),
                                 "cuda": None if kv.get("cuda") in (None, "none") else kv.get("cuda"),
                                 "gpu": None if gpu in (None, "", "none") else gpu,
                                 "gpus": _num(kv.get("gpus")), "world": _num(kv.get("world"))}
            if "packed_bytes" in kv:  # run from a packed file (bench/pack_code.py): its size, the inner source's
                out["provenance"].update(packed_bytes=_num(kv["packed_bytes"]),
                                         source_bytes=_num(kv.get("source_bytes")))
        elif line.startswith("data ") and ("val_tokens:" in line or "train_shards:" in line):
            out["data"] = {k: _num(v) for k, v in _kv(line).items()}
        elif m := _CLOCK_TRAIN.match(line):
            kv = _kv(line)
            out["clock_train"] = {"training": float(m.group(1)), "calibration": float(m.group(2)),
                                  "total": float(m.group(3)), "limit": _num(kv.get("limit"))}
        elif m := _CLOCK_EVAL.match(line):
            kv = _kv(line)
            out["clock_eval"] = {"total": float(m.group(1)), "limit": _num(kv.get("limit")),
                                 "world": _num(kv.get("world")), "est_8gpu": _num(kv.get("est_8gpu"))}
        elif line.startswith("run_id:"):
            head, _, gpu = line.partition(" gpu:")
            kv = _kv(head)
            out["run_id"] = kv.get("run_id")
            out["torch"] = kv.get("torch")
            out["device"] = kv.get("device")
            out["world"] = _num(kv.get("world"))
            out["grad_accum"] = _num(kv.get("grad_accum"))
            out["gpu"] = None if gpu.strip() in ("", "none") else gpu.strip()
        elif line.startswith("hyperparameters "):
            try:
                out["hparams"] = json.loads(line[len("hyperparameters "):])
            except json.JSONDecodeError:
                pass
        elif re.match(r"params:\d+", line):
            kv = _kv(line)
            out["params"] = _num(kv.pop("params"))
            out["param_groups"] = {k: _num(v) for k, v in kv.items()}
        elif m := re.match(r"step:(\d+) val_loss:", line):
            kv = _kv(line)
            out["val_curve"].append([int(m.group(1)), _num(kv.get("val_bpb"))])
            out["val_points"].append({"step": int(m.group(1)), "val_loss": _num(kv.get("val_loss")),
                                      "val_bpb": _num(kv.get("val_bpb")), "train_time": _seconds(kv.get("train_time"))})
        elif m := re.match(r"step:(\d+)/(\d+) train_loss:", line):
            kv = _kv(line)
            out["train_points"].append({"step": int(m.group(1)), "train_loss": _num(kv.get("train_loss")),
                                        "train_time": _seconds(kv.get("train_time"))})
            out["last_train_step"] = int(m.group(1))
            out["last_train_loss"] = _num(kv.get("train_loss"))
            out["last_step_avg_ms"] = _num(kv.get("step_avg"))
        elif line.startswith("looping:on"):
            out["looping_step"] = _num(_kv(line).get("step"))
        elif line.startswith("qat:on"):
            out["qat_step"] = _num(_kv(line).get("step"))
        elif line.startswith("training stopped"):
            kv = _kv(line)
            out["steps"] = _num(kv.get("step"))
            out["train_seconds"] = _num(kv.get("train_time"))
            out["tokens"] = _num(kv.get("tokens"))
            out["tokens_per_s"] = _num(kv.get("tokens_per_s"))
        elif line.startswith("peak_memory_allocated_mib:"):
            out["peak_memory_mib"] = _num(_kv(line).get("peak_memory_allocated_mib"))
        elif line.startswith("pre_quant "):
            kv = _kv(line)
            out["pre_quant_loss"] = _num(kv.get("val_loss"))
            out["pre_quant_bpb"] = _num(kv.get("val_bpb"))
        elif m := re.match(r"final_(\w+) val_loss:", line):
            kv = _kv(line)
            out["evals"][m.group(1)] = {"val_loss": _num(kv.get("val_loss")), "val_bpb": _num(kv.get("val_bpb")),
                                        "eval_seconds": _num(kv.get("eval_time"))}
        elif line.startswith("final val_loss:"):
            kv = _kv(line)
            out["final_loss"] = _num(kv.get("val_loss"))
            out["final_bpb"] = _num(kv.get("val_bpb"))
            out["final_source"] = kv.get("source")
        elif line.startswith("eval_total_time:"):
            out["eval_seconds"] = _num(_kv(line).get("eval_total_time"))
        elif line.startswith("quant_gap "):
            out["quant_gap"] = _num(_kv(line).get("val_bpb"))
        elif line.startswith(("bytes_model:", "bytes_code:", "bytes_total:")):
            for k, v in _kv(line).items():
                if k in ("bytes_model", "bytes_code", "bytes_total"):
                    out[k] = _num(v)
        elif line.startswith("auto_fit:"):
            out["auto_fit"] = line[len("auto_fit:"):].strip()
        elif line.startswith("val_tokens:"):
            out["val_tokens"] = _num(_kv(line).get("val_tokens"))
        elif line.startswith("train_plus_export_time:"):
            out["train_plus_export_seconds"] = _num(_kv(line).get("train_plus_export_time"))
        elif line.startswith("export:"):
            m = re.search(r"(\d+) bytes in ([\d.]+)s", line)
            if m:
                out["export_seconds"] = float(m.group(2))
    prov = out.get("provenance") or {}
    if out.get("gpu") is None and prov.get("gpu"):  # the provenance line stands in for a missing run_id line
        out["gpu"] = prov["gpu"]
    if out.get("world") is None and prov.get("world") is not None:
        out["world"] = prov["world"]
    if out.get("val_tokens") is None and (out.get("data") or {}).get("val_tokens") is not None:
        out["val_tokens"] = out["data"]["val_tokens"]
    if out.get("eval_seconds") is None and out.get("clock_eval"):  # current logs: clock_eval, no eval_total_time
        out["eval_seconds"] = out["clock_eval"]["total"]
    return out


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU
# ----------------------------------------------------------------------------------------------
#
# Model FLOPs per training token (the usual 6*N rule, forward + backward, no recomputation):
#
#   flops/token = 6 * (L_v * P_layer + P_bigram + V*d)  +  6 * L_v * T * d
#
#   d = MODEL_DIM, V = VOCAB_SIZE, T = TRAIN_SEQ_LEN, hd = d / NUM_HEADS, kv = NUM_KV_HEADS * hd,
#   m = round(MLP_MULT * d)
#   P_layer  = d*d (q) + 2*d*kv (k, v) + d*d (attn out) + 2*d*m (MLP in, out): the block's matmul weights,
#              + NUM_HEADS*GATE_DIMS with ATTN_GATE (the per-head gate reads the first GATE_DIMS input dims)
#   P_bigram = BIGRAM_DIM * d (the BigramHash projection; its table is a lookup, no FLOPs), 0 without bigram
#   V*d      = the tied LM head (the input embedding is a lookup)
#   L_v      = virtual layers run per token: NUM_LAYERS, plus NUM_LOOPS*(LOOP_END-LOOP_START+1) once looping is on
#   6*L_v*T*d: causal attention, QK^T and AV, 2*2*d FLOPs per (query, key) pair forward, x3 for fwd+bwd,
#              over T/2 keys on average = 12*L_v*d*T/2. With ATTN_DOC_MASK, flex_attention skips the blocks
#              across documents, so this over-counts: the MFU of such a run is an upper estimate of the useful work.
#
# Looping switches on mid-run ("looping:on step:S"); steps before S use the plain L_v, steps after the looped one,
# so the per-token average is (S*F_plain + (steps-S)*F_looped) / steps. Element-wise work (norms, RoPE, softmax,
# gates and lane mixing, QAT fake-quant), the optimizer (Newton-Schulz) and warmup/validation are not counted.
#
#   MFU = flops/token * tokens_per_s / (world * peak)        peak = dense bf16 FLOP/s of one GPU (PEAK_FLOPS)
#
# tokens_per_s is the log's global figure (all ranks), so dividing by world gives per-GPU utilisation.

GATE_DIMS = 12  # train_gpt.GATE_DIMS: input dims the attention gate reads (kept here: no train_gpt import)


def _flag(hp: dict, key: str, default=False) -> bool:
    value = hp.get(key, default)
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _layer_geometry(hp: dict) -> dict:
    d, heads, kv_heads = int(hp["model_dim"]), int(hp["num_heads"]), int(hp["num_kv_heads"])
    hd = d // heads
    kv = kv_heads * hd
    m = int(round(float(hp["mlp_mult"]) * d))
    loops = int(hp.get("num_loops", 0) or 0)
    looped_extra = loops * (int(hp["loop_end"]) - int(hp["loop_start"]) + 1) if loops else 0
    return {"d": d, "heads": heads, "kv": kv, "m": m, "V": int(hp["vocab_size"]), "T": int(hp["train_seq_len"]),
            "L": int(hp["num_layers"]), "L_looped": int(hp["num_layers"]) + looped_extra,
            "bigram": int(hp["bigram_dim"]) * d if int(hp.get("bigram_buckets", 0) or 0) else 0,
            "gate": heads * GATE_DIMS if _flag(hp, "attn_gate") else 0}


def matmul_params(hp: dict, looping: bool = False) -> int:
    """Matmul weights one token passes through: L_v * P_layer + P_bigram + V*d (LM head)."""
    g = _layer_geometry(hp)
    p_layer = 2 * g["d"] * g["d"] + 2 * g["d"] * g["kv"] + 2 * g["d"] * g["m"] + g["gate"]
    layers = g["L_looped"] if looping else g["L"]
    return layers * p_layer + g["bigram"] + g["V"] * g["d"]


def flops_per_token(hp: dict, looping: bool = False) -> int:
    g = _layer_geometry(hp)
    layers = g["L_looped"] if looping else g["L"]
    return 6 * matmul_params(hp, looping) + 6 * layers * g["T"] * g["d"]


def expected_param_count(hp: dict) -> int:
    """Total trainable parameters GPT(hp) should report in its `params:` line (to check the FLOP model).

    Per block: the matmul weights, q_gain (NUM_HEADS), the ATTN_GATE weights (NUM_HEADS x GATE_DIMS),
    attn_scale + mlp_scale + resid_mix (4d) and, in a two-lane block (PARALLEL_LANES=2, index >=
    PARALLEL_RESID_FROM >= 0), lane_write (2x2) + lane_keep (2). Then the tied embedding, BigramHash (table,
    projection, scale), SmearGate (d, or 13 in the record form) and, with UNET_SKIPS, one skip weight row per skip (half the virtual layers of
    the looped schedule, rounded down) plus as many SKIP_GATES rows."""
    g = _layer_geometry(hp)
    d, L = g["d"], g["L"]
    block = 2 * d * d + 2 * d * g["kv"] + 2 * d * g["m"] + g["heads"] + g["gate"] + 4 * d
    total = g["V"] * d + L * block
    parallel_from = int(hp.get("parallel_resid_from", -1))
    if int(hp.get("parallel_lanes", 1) or 1) == 2 and parallel_from >= 0:
        total += 6 * max(0, L - parallel_from)
    if int(hp.get("bigram_buckets", 0) or 0):
        total += int(hp["bigram_buckets"]) * int(hp["bigram_dim"]) + g["bigram"] + 1
    if _flag(hp, "smear_gate"):  # seed form: a gate per dim; record form: 12 weights and a scale
        total += d if hp.get("smear_form", "seed") == "seed" else 13
    if _flag(hp, "unet_skips", True):
        n_skips = g["L_looped"] // 2  # allocated for the looped schedule, the longest
        total += n_skips * d * (2 if _flag(hp, "skip_gates") else 1)
    return total


def avg_flops_per_token(hp: dict, steps, looping_step=None) -> float:
    plain = flops_per_token(hp, looping=False)
    if not looping_step or not steps or not int(hp.get("num_loops", 0) or 0):
        return float(plain)
    looped = flops_per_token(hp, looping=True)
    s = min(int(looping_step), int(steps))
    return (s * plain + (steps - s) * looped) / steps


def peak_flops_for(name: str | None) -> float | None:
    if not name:
        return None
    low = name.lower()
    for key, value in PEAK_FLOPS:
        if key in low:
            return value
    return None


def compute_mfu(hp: dict, tokens_per_s, world, peak, steps=None, looping_step=None):
    if not hp or not tokens_per_s or not world or not peak:
        return None
    return avg_flops_per_token(hp, steps, looping_step) * tokens_per_s / (world * peak)


def summarize(parsed: dict, peak_override: float | None = None) -> dict:
    """Flat result fields from parse_log() output (no run bookkeeping)."""
    hp = parsed.get("hparams") or {}
    evals = parsed.get("evals", {})
    steps, train_s = parsed.get("steps"), parsed.get("train_seconds")
    ms = parsed.get("last_step_avg_ms") if parsed.get("last_train_step") == steps and steps else None
    if ms is None and steps and train_s is not None:
        ms = 1000.0 * train_s / steps
    pre, rt = parsed.get("pre_quant_bpb"), evals.get("roundtrip", {}).get("val_bpb")
    gap = parsed.get("quant_gap")
    if gap is None and pre is not None and rt is not None:
        gap = rt - pre
    peak = peak_override or peak_flops_for(parsed.get("gpu"))
    fpt = mfu = None
    flops_check = None
    if hp:
        try:
            fpt = avg_flops_per_token(hp, steps, parsed.get("looping_step"))
            mfu = compute_mfu(hp, parsed.get("tokens_per_s"), parsed.get("world"), peak, steps,
                              parsed.get("looping_step"))
            if parsed.get("params") is not None:
                flops_check = expected_param_count(hp) == parsed["params"]
        except (KeyError, TypeError, ValueError):
            pass
    final = parsed.get("final_bpb")
    return {
        "world": parsed.get("world"), "gpu": parsed.get("gpu"), "device": parsed.get("device"),
        "steps": steps, "train_seconds": train_s, "ms_per_step": ms, "tokens": parsed.get("tokens"),
        "tokens_per_s": parsed.get("tokens_per_s"), "params": parsed.get("params"),
        "flops_per_token": fpt, "peak_flops": peak if mfu is not None else None, "mfu": mfu,
        "flops_model_matches_params": flops_check,
        "peak_memory_mib": parsed.get("peak_memory_mib"),
        "pre_quant_bpb": pre, "roundtrip_bpb": rt, "quant_gap": gap,
        "sliding_bpb": evals.get("sliding", {}).get("val_bpb"), "ttt_bpb": evals.get("ttt", {}).get("val_bpb"),
        "final_bpb": final, "final_source": parsed.get("final_source"),
        "bytes_model": parsed.get("bytes_model"), "bytes_code": parsed.get("bytes_code"),
        "bytes_total": parsed.get("bytes_total"), "eval_seconds": parsed.get("eval_seconds"),
        "eval_seconds_each": {k: v.get("eval_seconds") for k, v in evals.items()},
        "auto_fit": parsed.get("auto_fit"),
        "val_curve": parsed.get("val_curve", []),
        # new-format lines (provenance / data / clock_train / clock_eval); None when the log lacks them
        "final_loss": parsed.get("final_loss"), "seed": hp.get("seed"),
        "code_sha256": (parsed.get("provenance") or {}).get("code_sha256"),
        "val_tokens": parsed.get("val_tokens"),
        "val_max_tokens": (parsed.get("data") or {}).get("val_max_tokens", hp.get("val_max_tokens")),
        "train_clock_seconds": (parsed.get("clock_train") or {}).get("total"),
        "calibration_seconds": (parsed.get("clock_train") or {}).get("calibration"),
        "eval_clock_seconds": (parsed.get("clock_eval") or {}).get("total"),
        "est_8gpu_eval_seconds": (parsed.get("clock_eval") or {}).get("est_8gpu"),
    }


# ----------------------------------------------------------------------------------------------
# Markdown table
# ----------------------------------------------------------------------------------------------


def _f(value, fmt):
    return "" if value is None else format(value, fmt)


def markdown_table(rows: list[dict], baseline: str | None = None) -> str:
    base = next((r for r in rows if r.get("name") == baseline), None) if baseline else None
    base_bpb = base.get("final_bpb") if base else None
    head = ["name", "steps", "ms/step", "tok/s", "MFU", "pre-quant", "roundtrip", "sliding", "ttt", "bytes_total"]
    if baseline:
        head.append(f"Δ bpb vs {baseline}")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for r in rows:
        name = r.get("name", "?") + ("" if r.get("returncode") == 0 else " (TIMED OUT)" if r.get("timed_out")
                                     else f" (FAILED rc={r.get('returncode')})")
        cells = [name, _f(r.get("steps"), "d"), _f(r.get("ms_per_step"), ".1f"), _f(r.get("tokens_per_s"), ",.0f"),
                 "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                 _f(r.get("pre_quant_bpb"), ".4f"), _f(r.get("roundtrip_bpb"), ".4f"), _f(r.get("sliding_bpb"), ".4f"),
                 _f(r.get("ttt_bpb"), ".4f"), _f(r.get("bytes_total"), ",d")]
        if baseline:
            final = r.get("final_bpb")
            cells.append("" if final is None or base_bpb is None else f"{final - base_bpb:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Configs, knobs, data
# ----------------------------------------------------------------------------------------------


def known_knobs(script: str) -> set[str] | None:
    """Upper-cased Hyperparameters field names, read from the script's source (no import)."""
    try:
        with open(script, encoding="utf-8") as f:
            src = f.read()
    except OSError:
        return None
    m = re.search(r"^class Hyperparameters\b.*?:\n(.*?)^\s+@classmethod", src, re.S | re.M)
    if not m:
        return None
    return {n.upper() for n in re.findall(r"^    ([a-z_][a-z0-9_]*)\s*:", m.group(1), re.M)}


def parse_kv_list(text: str, what: str) -> dict[str, str]:
    knobs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"run_bench: bad {what} {item!r}: expected KEY=VALUE")
        knobs[key.strip().upper()] = value.strip()
    return knobs


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SystemExit(f"run_bench: bad --config {text!r}: expected NAME=K1=V1,K2=V2 (NAME of [A-Za-z0-9_.-])")
    return name, parse_kv_list(rest, "--config knob")


def has_shards(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "fineweb_train_*.bin"))) and \
        bool(glob.glob(os.path.join(path, "fineweb_val_*.bin")))


def build_command(args) -> list[str]:
    ab = os.path.abspath  # build_shards runs in the repo root; the caller's relative paths must survive that
    cmd = [sys.executable, BUILD_SHARDS, *map(ab, args.corpus), "--out", ab(args.shards_dir)]
    cmd += ["--val-input", *map(ab, args.val_corpus)] if args.val_corpus else ["--val-docs", str(args.val_docs)]
    if args.tokenizer:
        cmd += ["--tokenizer", ab(args.tokenizer)]
    if args.max_train_tokens is not None:
        cmd += ["--max-train-tokens", str(args.max_train_tokens)]
    if args.shard_tokens is not None:
        cmd += ["--shard-tokens", str(args.shard_tokens)]
    if args.rebuild:
        cmd.append("--overwrite")
    return cmd


def prepare_data(args) -> tuple[str, str]:
    """(DATA_PATH, TOKENIZER_PATH); builds the shards first when asked to."""
    if args.corpus:
        data = os.path.abspath(args.shards_dir)
        if has_shards(data) and not args.rebuild:
            print(f"[bench] shards present in {data}; not rebuilding (--rebuild forces it)", flush=True)
            try:
                with open(os.path.join(data, "meta.json"), encoding="utf-8") as f:
                    source = json.load(f).get("tokenizer_source")
            except (OSError, ValueError):
                source = None
            if args.tokenizer and source and os.path.abspath(source) != os.path.abspath(args.tokenizer):
                print(f"[bench] WARNING: those shards were built with tokenizer {source}, not {args.tokenizer}; "
                      "pass --rebuild to rebuild them", flush=True)
        else:
            cmd = build_command(args)
            print("[bench] building shards: " + shlex.join(cmd), flush=True)
            if not args.dry_run:
                rc = subprocess.call(cmd, cwd=ROOT)
                if rc != 0:
                    raise SystemExit(f"run_bench: build_shards failed with exit code {rc}")
        tok = os.path.join(data, "tokenizer.model")  # build_shards copies (or trains) it there
    else:
        data = os.path.abspath(args.data_path)
        if not has_shards(data) and not args.dry_run:
            raise SystemExit(f"run_bench: {data} has no fineweb_train_*.bin and fineweb_val_*.bin shards")
        tok = os.path.abspath(args.tokenizer) if args.tokenizer else os.path.join(data, "tokenizer.model")
    if not os.path.isfile(tok) and not args.dry_run:
        raise SystemExit(f"run_bench: tokenizer {tok} not found (give --tokenizer)")
    return data, tok


def tokenizer_vocab(path: str) -> int | None:
    """Pieces of a SentencePiece model, or None when it cannot be read (sentencepiece only imported here)."""
    try:
        import sentencepiece as spm  # noqa: PLC0415
        return spm.SentencePieceProcessor(model_file=path).vocab_size()
    except Exception:  # noqa: BLE001
        return None


def runnable_ablations(configs, tok_path: str, common: dict, explicit: set) -> list:
    """The configs minus the built-in ablations of ABLATION_VOCAB whose vocabulary the data's tokenizer lacks
    (each skipped one is named). A --config of the same name, a VOCAB_SIZE knob or an unreadable tokenizer keeps it."""
    vocab, keep = tokenizer_vocab(tok_path), []
    for name, knobs in configs:
        need = ABLATION_VOCAB.get(name)
        if need and vocab is not None and vocab != need and name not in explicit \
                and "VOCAB_SIZE" not in common and "VOCAB_SIZE" not in knobs:
            print(f"[bench] skipping {name}: it needs sp{need} shards and tokenizer (VOCAB_SIZE={need}); "
                  f"{tok_path} has {vocab} pieces", flush=True)
            continue
        keep.append((name, knobs))
    return keep


# ----------------------------------------------------------------------------------------------
# Hardware
# ----------------------------------------------------------------------------------------------


def cuda_device_count() -> int:
    try:
        import torch  # noqa: PLC0415 (only when --nproc is not given)
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def nvidia_smi_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    names = [s.strip() for s in out.stdout.splitlines() if s.strip()] if out.returncode == 0 else []
    return names[0] if names else None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform  # noqa: PLC0415
    return platform.processor() or platform.machine() or None


def git_state() -> dict:
    def git(*a):
        try:
            r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=20)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def launch_command(script: str, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]


def run_one(cmd, env, stdout_path, tee: bool, timeout: float | None) -> tuple[int, float, bool]:
    """Run cmd with stdout+stderr streamed to stdout_path; (returncode, wall seconds, timed_out)."""
    t0 = time.time()
    with open(stdout_path, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, start_new_session=True)

        def pump():
            for line in proc.stdout:
                sink.write(line)
                sink.flush()
                if tee:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
        reader.join(timeout=30)
    return proc.returncode, time.time() - t0, timed_out


def _kill_group(proc: subprocess.Popen):
    import signal  # noqa: PLC0415
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # the child leads its own session: this reaches torchrun's workers too
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


_EXC_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit))(?::.*)?$")


def first_exception(text: str) -> str | None:
    """The first 'SomeError: message' line that is not torchrun's own wrapper (usually the root cause)."""
    for line in text.splitlines():
        m = _EXC_LINE.match(line.strip())
        if m and not m.group(1).startswith("torch.distributed.elastic"):
            return line.strip()
    return None


def tail(path: str, lines: int = 40, chars: int = 4000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = "".join(f.readlines()[-lines:])
    except OSError:
        return ""
    return text[-chars:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = ap.add_argument_group("data")
    data.add_argument("--corpus", nargs="+", metavar="FILE", help="training documents for data/build_shards.py")
    data.add_argument("--val-corpus", nargs="+", metavar="FILE", help="validation documents (build_shards --val-input)")
    data.add_argument("--val-docs", type=int, metavar="N", help="hold out the first N corpus documents as validation")
    data.add_argument("--tokenizer", metavar="PATH.model", help="SentencePiece model (with --corpus: else one is "
                      "trained; with --data-path: default DIR/tokenizer.model)")
    data.add_argument("--shards-dir", metavar="DIR", help="where --corpus shards are built (or found)")
    data.add_argument("--rebuild", action="store_true", help="rebuild shards even if --shards-dir has some")
    data.add_argument("--max-train-tokens", type=int, help="build_shards --max-train-tokens")
    data.add_argument("--shard-tokens", type=int, help="build_shards --shard-tokens")
    data.add_argument("--data-path", metavar="DIR", help="existing shards (fineweb_train_*.bin, fineweb_val_*.bin)")
    runs = ap.add_argument_group("runs")
    runs.add_argument("--config", action="append", default=[], metavar="NAME=K1=V1,K2=V2",
                      help="a named run with extra knobs (repeatable; 'full=' = no extra knobs)")
    runs.add_argument("--ablations", action="store_true",
                      help="add the built-in one-change ablations of the seed stack (frontier: sp8192 data only): "
                      + ", ".join(n for n, _ in ABLATIONS))
    runs.add_argument("--only", metavar="N1,N2", help="keep only these config names")
    runs.add_argument("--knob", action="append", default=[], metavar="K=V", help="knob for every run (repeatable)")
    runs.add_argument("--seconds", type=float, help="MAX_WALLCLOCK_SECONDS for every run")
    runs.add_argument("--nproc", type=int, help="processes (GPUs) per run; default: CUDA GPU count, or 1")
    runs.add_argument("--script", default=DEFAULT_SCRIPT, help="training script (default: train_gpt.py)")
    runs.add_argument("--timeout", type=float, help="kill a run after this many wall seconds")
    runs.add_argument("--allow-unknown-knobs", action="store_true", help="do not reject knobs train_gpt.py lacks")
    out = ap.add_argument_group("output")
    out.add_argument("--out-dir", help="logs, stdout and artifacts (default bench/out/runs/<timestamp>)")
    out.add_argument("--out-jsonl", default=os.path.join(ROOT, "bench", "out", "results.jsonl"),
                     help="JSON lines appended here (default bench/out/results.jsonl)")
    out.add_argument("--baseline", help="config name whose final val_bpb the table's delta column subtracts")
    out.add_argument("--peak-tflops", type=float, help="override the per-GPU dense bf16 peak used for MFU")
    out.add_argument("--tee", action="store_true", help="echo the training output live")
    out.add_argument("--dry-run", action="store_true", help="print the commands and environments, run nothing")
    out.add_argument("--table-only", action="store_true", help="print the table of the runs already in --out-jsonl")
    args = ap.parse_args(argv)
    peak_override = args.peak_tflops * 1e12 if args.peak_tflops else None

    if args.table_only:
        with open(args.out_jsonl, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        latest = {}
        for r in rows:  # the most recent line per name
            latest[r.get("name")] = r
        print(markdown_table(list(latest.values()), args.baseline))
        return 0

    # --- validate the arguments
    if bool(args.corpus) == bool(args.data_path):
        ap.error("give exactly one of --corpus or --data-path")
    if args.corpus:
        if not args.shards_dir:
            ap.error("--corpus needs --shards-dir")
        if bool(args.val_corpus) == (args.val_docs is not None):
            ap.error("--corpus needs exactly one of --val-corpus or --val-docs")
    elif args.val_corpus or args.val_docs is not None or args.shards_dir or args.rebuild:
        ap.error("--val-corpus/--val-docs/--shards-dir/--rebuild only go with --corpus")
    configs: list[tuple[str, dict]] = [(n, dict(k)) for n, k in ABLATIONS] if args.ablations else []
    configs += [parse_config(c) for c in args.config]
    if not configs:
        configs = [("full", {})]
    if args.only:
        keep = {s.strip() for s in args.only.split(",") if s.strip()}
        missing = keep - {n for n, _ in configs}
        if missing:
            ap.error(f"--only names not among the configs: {sorted(missing)}")
        configs = [c for c in configs if c[0] in keep]
    names = [n for n, _ in configs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        ap.error(f"duplicate config names: {dupes}")
    if args.baseline is None and args.ablations and "full" in names:
        args.baseline = "full"
    if args.baseline and args.baseline not in names:
        ap.error(f"--baseline {args.baseline!r} is not one of the configs {names}")
    common: dict[str, str] = {}
    if args.seconds is not None:
        common["MAX_WALLCLOCK_SECONDS"] = f"{args.seconds:g}"
    for k in args.knob:
        common.update(parse_kv_list(k, "--knob"))
    valid = known_knobs(args.script)
    for label, knobs in [("--knob", common)] + [(f"--config {n}", k) for n, k in configs]:
        managed = sorted(set(knobs) & set(MANAGED_VARS))
        if managed:
            ap.error(f"{label}: {managed} are set by the bench (use --data-path/--tokenizer/--out-dir)")
        unknown = sorted(set(knobs) - valid) if valid else []
        if unknown and not args.allow_unknown_knobs:
            ap.error(f"{label}: unknown knob(s) {unknown} (not Hyperparameters fields of {args.script})")
    nproc = args.nproc or max(cuda_device_count(), 1)
    if nproc < 1 or 8 % nproc:
        ap.error(f"--nproc {nproc} must divide 8 (train_gpt.py keeps 8-GPU gradient accumulation)")

    data_path, tok_path = prepare_data(args)
    if args.ablations:
        configs = runnable_ablations(configs, tok_path, common, {parse_config(c)[0] for c in args.config})
        if not configs:
            ap.error("no config left to run: the ones asked for need another vocabulary (see the messages above)")
    stamp = time.strftime("%Y%m%d_%H%M%S")
    out_dir = os.path.abspath(args.out_dir or os.path.join(ROOT, "bench", "out", "runs", stamp))
    cmd = launch_command(os.path.abspath(args.script), nproc)

    if args.dry_run:
        for name, knobs in configs:
            extra = {**common, **knobs, "DATA_PATH": data_path, "TOKENIZER_PATH": tok_path, "RUN_ID": name,
                     "LOG_DIR": out_dir, "ARTIFACT_PATH": os.path.join(out_dir, f"{name}.ptz"),
                     "PYTHONUNBUFFERED": "1"}
            print(f"# {name}")
            print(f"cd {shlex.quote(ROOT)} && env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in extra.items())
                  + " " + shlex.join(cmd) + f" > {shlex.quote(os.path.join(out_dir, name + '.stdout'))} 2>&1")
        return 0

    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out_jsonl)) or ".", exist_ok=True)
    gpu_name = nvidia_smi_name()
    cpu = cpu_model()
    git = git_state()
    code_sha = file_sha256(args.script)
    results = []
    print(f"[bench] {len(configs)} run(s), nproc={nproc}, out-dir {out_dir}, results -> {args.out_jsonl}", flush=True)
    for i, (name, knobs) in enumerate(configs, 1):
        log_path = os.path.join(out_dir, f"{name}.txt")
        stdout_path = os.path.join(out_dir, f"{name}.stdout")
        artifact = os.path.join(out_dir, f"{name}.ptz")
        for stale in (log_path, artifact):  # train_gpt.py's Logger appends: never mix two runs in one log
            if os.path.exists(stale):
                os.remove(stale)
        env = dict(os.environ)
        env.update(common)
        env.update(knobs)
        env.update({"DATA_PATH": data_path, "TOKENIZER_PATH": tok_path, "RUN_ID": name, "LOG_DIR": out_dir,
                    "ARTIFACT_PATH": artifact, "PYTHONUNBUFFERED": "1"})
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        print(f"[bench] ({i}/{len(configs)}) {name} {knobs or ''} ...", flush=True)
        rc, wall, timed_out = run_one(cmd, env, stdout_path, args.tee, args.timeout)
        source = log_path if os.path.isfile(log_path) else stdout_path
        with open(source, encoding="utf-8", errors="replace") as f:
            parsed = parse_log(f.read())
        summary = summarize(parsed, peak_override)
        hardware = {"device": parsed.get("device") or ("cuda" if gpu_name else "cpu"),
                    "gpu": parsed.get("gpu") or gpu_name, "cpu": cpu, "nproc": nproc, "cpu_count": os.cpu_count()}
        error = None
        if timed_out and rc == 0:
            rc = 124
        if rc != 0 or timed_out:
            try:
                with open(stdout_path, encoding="utf-8", errors="replace") as f:
                    root_cause = first_exception(f.read())
            except OSError:
                root_cause = None
            error = "\n".join(filter(None, [f"timed out after {args.timeout:g}s" if timed_out else None,
                                             root_cause, "--- output tail ---", tail(stdout_path)]))
        record = {"name": name, "knobs": knobs, "common_knobs": common, "timestamp": started, "hardware": hardware,
                  **summary, "returncode": rc, "timed_out": timed_out, "error": error, "wall_seconds": round(wall, 1),
                  "log": log_path if os.path.isfile(log_path) else None, "stdout": stdout_path,
                  "artifact": artifact if os.path.isfile(artifact) else None, "command": cmd,
                  "script": os.path.abspath(args.script), "script_sha256": code_sha, "git": git,
                  "data_path": data_path, "tokenizer_path": tok_path, "hparams": parsed.get("hparams")}
        with open(args.out_jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
        results.append(record)
        status = "ok" if rc == 0 and not timed_out else \
            f"TIMED OUT after {args.timeout:g}s" if timed_out else f"FAILED rc={rc}"
        print(f"[bench] {name}: {status} steps={summary['steps']} ms/step={_f(summary['ms_per_step'], '.1f')} "
              f"final_bpb={_f(summary['final_bpb'], '.4f')} bytes_total={summary['bytes_total']} "
              f"wall={wall:.0f}s", flush=True)
        if error:
            lines = error.splitlines()
            head = lines[:lines.index("--- output tail ---")] if "--- output tail ---" in lines else []
            print("[bench] " + "\n[bench] ".join(head + ["output tail:"]) + "\n" + "\n".join(lines[-12:]), flush=True)
    print()
    print(markdown_table(results, args.baseline))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
