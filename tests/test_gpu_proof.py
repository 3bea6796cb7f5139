"""bench/gpu_proof.sh and bench/gpu_proof.py: the staged GPU proof for a short device lease, rehearsed on CPU.

The fast rehearsal (REHEARSE=1 FAST=1: every stage, tiny model, the embedded sample's shards) must write one
summary line per stage with a status, and a logs archive, in at most the 8 files a device call brings back. The
report helper must turn any log, also a missing, cut-off or failed one, into a line with `n/a` figures, not crash.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import train_gpt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_proof as gp  # noqa: E402

SCRIPT = ROOT / "bench" / "gpu_proof.sh"
STAGE_LINE = re.compile(r"^stage:(\S+) status:(ok|fail|timeout|incomplete|skipped) elapsed_s:([\d.]+)")
STAGES = ["env", "smoke", "speed_default", "speed_naive", "speed_ratio", "frontier"]


def proof_env(tmp_path: Path, **extra) -> dict:
    """The caller's environment without any train_gpt.py knob (a stray one would change every stage)."""
    knobs = {f.name.upper() for f in dataclasses.fields(train_gpt.Hyperparameters)} | {"PRESET"}
    env = {k: v for k, v in os.environ.items() if k not in knobs}
    env.update({"OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def rehearsal(sample_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_proof")
    env = proof_env(tmp, REHEARSE=1, FAST=1, SP1024=sample_data)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    return {"proc": proc, "out": tmp / "out", "summary": (tmp / "out" / "summary.txt").read_text()
            if (tmp / "out" / "summary.txt").is_file() else ""}


def test_rehearsal_writes_every_stage_line(rehearsal):
    proc, summary = rehearsal["proc"], rehearsal["summary"]
    lines = summary.splitlines()
    assert [STAGE_LINE.match(x).group(1) for x in lines if STAGE_LINE.match(x)] == STAGES, summary + proc.stderr
    statuses = {STAGE_LINE.match(x).group(1): STAGE_LINE.match(x).group(2) for x in lines}
    assert statuses == dict.fromkeys(STAGES, "ok"), summary + proc.stdout[-3000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for x in lines:  # every stage says when it ended; a finished stage has no error text
        assert " at_s:" in x and " error:" not in x, x


def test_rehearsal_figures(rehearsal):
    lines = {STAGE_LINE.match(x).group(1): x for x in rehearsal["summary"].splitlines()}
    assert "gpu:none" in lines["env"] and "zstandard:" in lines["env"] and "torch:" in lines["env"]
    for name in ("smoke", "frontier"):
        for key in ("roundtrip_bpb", "ttt_bpb", "bytes_total", "pre_quant_bpb"):
            assert re.search(rf" {key}:[\d.]+ ", lines[name]), (key, lines[name])
    assert "ttt_mode:phased" in lines["frontier"] and "lanes:2" in lines["frontier"]
    assert re.search(r" looping_on_step:\d+ ", lines["frontier"]) and "doc_mask:True" in lines["frontier"]
    for name in ("speed_default", "speed_naive"):
        assert re.search(r" ms_per_step:[\d.]+ timed_steps:2 from_step:5 ", lines[name]), lines[name]
        assert " mfu:n/a " in lines[name]  # no GPU: no peak to divide by
    assert "code:packed(" in lines["speed_naive"] and "code:readable" in lines["speed_default"]
    assert re.search(r" tokens_per_s_ratio:[\d.]+ ", lines["speed_ratio"])


def test_rehearsal_output_fits_the_device_return(rehearsal):
    files = [p for p in rehearsal["out"].rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["logs.tar.gz", "summary.txt"]  # the tool brings back at most 8
    with tarfile.open(rehearsal["out"] / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    for stage in ("smoke", "speed_default", "speed_naive", "frontier"):
        assert f"./logs/{stage}.txt" in names and f"./{stage}.out" in names
    assert not any(n.endswith(".ptz") for n in names)


def test_budget_spent_skips_stages(tmp_path):
    """A stage that would start with under 20 s of BUDGET_S left is skipped, and says so."""
    env = proof_env(tmp_path, REHEARSE=1, BUDGET_S=5, STAGES="smoke frontier", SP1024=tmp_path / "none")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    lines = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [STAGE_LINE.match(x).group(1, 2) for x in lines] == [("smoke", "skipped"), ("frontier", "skipped")]
    assert proc.returncode == 1 and "reason:budget_spent(5s)" in lines[0]


# ----------------------------------------------------------------------------------------------
# the report helper
# ----------------------------------------------------------------------------------------------


def _steps(pairs, total=50):
    return "\n".join(f"step:{s}/{total} train_loss:3.0 lr_mul:1.0 train_time:{s * ms / 1000:.1f}s step_avg:{ms:.2f}ms"
                     for s, ms in pairs)


def test_steady_speed_uses_the_window_after_from_step():
    # steps 1-5 slow (first-step overheads), then 100 ms per step: train_time at step s = 5*300 + (s-5)*100 ms
    pairs = [(s, 300.0) for s in range(1, 6)] + [(s, (1500 + (s - 5) * 100) / s) for s in (10, 20, 30, 40, 45)]
    sp = gp.steady_speed(_steps(pairs), from_step=5)
    assert sp["from_step"] == 5 and sp["timed_steps"] == 40
    assert sp["ms_per_step"] == pytest.approx(100.0, rel=1e-3)
    assert gp.steady_speed(_steps([(1, 300.0)]))["ms_per_step"] is None  # too few points: n/a, not a crash


def test_speed_fields_mfu_on_a_known_gpu():
    hp = '{"train_batch_tokens": 524288, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 2, ' \
         '"vocab_size": 1024, "train_seq_len": 1024, "num_layers": 9, "bigram_buckets": 0, "bigram_dim": 128, ' \
         '"loop_start": 4, "loop_end": 5, "num_loops": 0}'
    log = ("run_id:x torch:2 device:cuda:0 world:1 grad_accum:8 compile:1 autocast:bf16 preset:naive_baseline "
           "gpu:NVIDIA H200\nhyperparameters " + hp + "\n"
           + _steps([(5, 400.0), (45, 400.0)]) + "\npeak_memory_allocated_mib:10300\n")
    fields, ms, tok_s = gp.speed_fields(log, 5)
    assert ms == pytest.approx(400.0) and tok_s == pytest.approx(524288 / 0.4)
    assert fields["peak_tflops"] == "989" and fields["peak_mem_mib"] == "10300" and fields["compiled"] == "1"
    flops = 6 * (9 * (2 * 512 * 512 + 2 * 512 * 256 + 2 * 512 * 1024) + 1024 * 512) + 6 * 9 * 1024 * 512
    assert fields["flops_per_token"] == f"{flops:.4g}"
    assert fields["mfu"] == f"{flops * tok_s / 989e12:.3f}"


def test_report_of_missing_or_failed_runs(tmp_path, capsys):
    missing = tmp_path / "none.txt"
    assert gp.main(["run", "smoke", "smoke", str(missing), "1", "3.0"]) == 1
    out = capsys.readouterr().out.strip()
    assert out.startswith("stage:smoke status:fail elapsed_s:3.0 ") and "roundtrip_bpb:n/a" in out
    assert out.endswith("error:no log")
    # killed by `timeout` after some training: the figures it reached, status timeout, the traceback's last line
    log = tmp_path / "cut.txt"
    log.write_text(_steps([(1, 500.0), (5, 450.0), (10, 440.0)]) + "\n")
    err = tmp_path / "cut.out"
    err.write_text("Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory.\n")
    assert gp.main(["run", "speed", "speed_default", str(log), "124", "99.0", "--out", str(err)]) == 0
    out = capsys.readouterr().out.strip()  # the timed steps are there: the speed stage proved its figure
    assert "status:ok" in out and "ms_per_step:430.0" in out and "rc:124" in out and "OutOfMemoryError" in out
    assert gp.main(["run", "frontier", "frontier", str(log), "124", "150.0", "--out", str(err)]) == 1
    assert "status:timeout" in capsys.readouterr().out
    assert gp.status_of(0, False, "smoke") == "incomplete" and gp.status_of(137, False, "smoke") == "timeout"
    assert gp.main(["ratio", "r", str(missing), str(log)]) == 1
    assert "ms_per_step_ratio:n/a" in capsys.readouterr().out
