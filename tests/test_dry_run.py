"""bench/dry_run.py: a configuration with its real tensor shapes through every phase of train_gpt.main() on CPU.

The default configuration (11 x 512, seq 2048) takes far too long for CI on 2 cores (see REDUCED below and the
bench README), so CI runs reduced variants that keep every matrix of a layer, the vocabulary, the bigram table
and every technique of the configuration at their real shape, with 2 layers and sequences of 512: the default stack
and the frontier stack (vocab 8192, depth recurrence, parallel lanes, phased LoRA TTT, LQER, GPTQ on the
embedding). PG_DRY_RUN_FULL=1 adds the full default configuration (tens of minutes on 2 cores).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "dry_run.py"
REDUCED = {"NUM_LAYERS": "2", "TRAIN_SEQ_LEN": "512", "EVAL_SEQ_LEN": "512"}
# frontier loops layers 3-5 and runs parallel lanes from layer 8: the same structure on 2 layers
FRONTIER_REDUCED = {**REDUCED, "PRESET": "frontier", "LOOP_START": "0", "LOOP_END": "1", "PARALLEL_RESID_FROM": "1",
                    "XSA_LAST_N": "2"}


def _dry_run(knobs: dict[str, str], tmp_path: Path) -> str:
    knob_names = {f.upper() for f in train_gpt.Hyperparameters.__dataclass_fields__}
    env = {k: v for k, v in os.environ.items() if k not in knob_names}  # the configuration is `knobs` only
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, str(SCRIPT), *(f"{k}={v}" for k, v in knobs.items()), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _check(out: str, knobs: dict[str, str]):
    h = train_gpt.Hyperparameters.from_env(knobs)
    n_params = sum(p.numel() for p in train_gpt.GPT(h).parameters())
    m = re.search(r"^params: ([0-9,]+) \(Muon ([0-9,]+), AdamW ([0-9,]+)\)$", out, re.M)
    assert m, out[-3000:]
    total, muon, adam = (int(g.replace(",", "")) for g in m.groups())
    assert total == muon + adam == n_params
    mem = re.search(r"^gpu_memory_per_rank \(estimate\) for TRAIN_BATCH_TOKENS=(\d+) \((\d+) tokens per micro-batch\): "
                    r"activations:([0-9.]+)GiB weights\+grads\+ddp_buckets:([0-9.]+)GiB .* total:([0-9.]+)GiB$", out, re.M)
    assert mem, out[-3000:]
    assert int(mem.group(1)) == h.train_batch_tokens and int(mem.group(2)) == h.train_batch_tokens // 8  # the real batch
    assert float(mem.group(4)) == pytest.approx(12 * n_params / 2**30, abs=0.006)
    assert float(mem.group(3)) > 0 and float(mem.group(5)) > float(mem.group(3)) + float(mem.group(4))
    per_token = float(re.search(r"per extra token ([0-9.]+) KiB", out).group(1))
    assert 0 < per_token < 4096

    # the run: every phase, on the work-shrinking knobs
    assert "training stopped step:2 " in out
    if h.qat:
        assert re.search(r"^qat:on step:1 ", out, re.M)
    if h.num_loops:
        assert re.search(r"^looping:on step:1 ", out, re.M)
    if h.averaging == "ema":
        assert "applied:yes" in out
    n_hessians = int(re.search(r"^calibration: (?:\d+) training tokens .*, (\d+) Hessians", out, re.M).group(1))
    assert n_hessians == 6 * h.num_layers + int(h.gptq_embed)
    assert re.search(r"^export: zstd-22 .* (\d+) bytes in", out, re.M)
    bytes_model = int(re.search(r"^bytes_model:(\d+)$", out, re.M).group(1))
    bytes_total = int(re.search(r"^bytes_total:(\d+)$", out, re.M).group(1))
    assert 0 < bytes_model < bytes_total <= train_gpt.CHALLENGE_MAX_BYTES
    assert f"bytes_model:{bytes_model} bytes_total:{bytes_total}" in out  # the summary reports the logged size
    finals = re.findall(r"^final_(\w+) val_loss:(\S+) val_bpb:(\S+) tokens:(\d+) bytes:(\d+)", out, re.M)
    assert sorted(f[0] for f in finals) == ["roundtrip", "sliding", "ttt"], finals
    for name, loss, bpb, tokens, n_bytes in finals:
        assert int(tokens) == int(n_bytes) == 2 * h.eval_seq_len  # every token counts 1 byte
        assert 0 < float(loss) < 30 and float(bpb) == pytest.approx(float(loss) / 0.6931471805599453, rel=1e-6)
    assert "val_bpb:" in out and "is meaningless" in out


def test_dry_run_default_reduced(tmp_path):
    _check(_dry_run(REDUCED, tmp_path), REDUCED)


def test_dry_run_frontier_reduced(tmp_path):
    out = _dry_run(FRONTIER_REDUCED, tmp_path)
    _check(out, FRONTIER_REDUCED)
    assert "vocab:8192" in out and "ttt:phased" in out and "doc mask measured as causal" in out


@pytest.mark.skipif(os.environ.get("PG_DRY_RUN_FULL") != "1", reason="the full default configuration takes tens of "
                    "minutes on 2 CPU cores; set PG_DRY_RUN_FULL=1 to run it")
def test_dry_run_default_full(tmp_path):
    _check(_dry_run({}, tmp_path), {})


def test_dry_run_knob_arguments_are_checked(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "num_layers=2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "expected KNOB=VALUE" in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), "NUM_LAYER=2", "--estimate-only"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "did you mean NUM_LAYERS" in proc.stderr
