"""Distributed behaviour of train_gpt.py on CPU: a real 2-process torchrun (gloo) run next to a 1-process run with
the same knobs and seed, and a 2-process EVAL_ONLY run of the 1-process run's artifact.

Gradient accumulation keeps 8-GPU semantics (grad_accum = 8 // world), and the loader hands rank r the r-th
contiguous slice of each world-sized span, so both runs train on the same global batches and take the same
optimizer steps up to float reduction order (DDP's all-reduce sums the two ranks' accumulated gradients, the
1-process run accumulates all 8 micro-batches in turn).

Tolerances. Same updates up to reduction order means the scores agree to ~1e-7 relative (measured: pre-quant and
final val_bpb identical in all printed digits, at most 5e-8 relative apart), so the final roundtrip / sliding / TTT
val_bpb must agree to 1e-6 relative, and their token and byte counts exactly (they count the same targets).
Two things would turn rounding-level differences into real ones, so the compared runs switch them off (each is
covered elsewhere, see the tests at the end):
- QAT: fake quantization in the forward pass is a step function of the weights; a 1e-7 difference that moves a
  weight across a rounding boundary changes the forward pass by a whole grid step, and the runs drift apart
  (measured: roundtrip val_bpb 3.5e-6 relative apart after 6 steps). QAT with 2 ranks runs in the wall-clock test.
- GPTQ: its column-by-column error feedback turns one flipped code into a cascade along the row, and, at present,
  the 2-rank calibration set is not the 1-rank one (see test_calibration_set_is_world_size_independent).
TTT_BATCH_SEQS=16 holds a whole TTT chunk (1024 targets = 16 rows of 64) in one step on one rank, so both runs take
one SGD step per chunk (the rows of a step are per rank: see test_ttt_steps_are_world_size_independent).
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_gpt
from conftest import TINY_KNOBS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
CPU = torch.device("cpu")
ITERATIONS = 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
# The compared runs: see the module docstring for QAT, GPTQ and TTT_BATCH_SEQS.
DIST_KNOBS = {"ITERATIONS": str(ITERATIONS), "VAL_LOSS_EVERY": "3", "QAT": "0", "GPTQ": "0", "TTT_BATCH_SEQS": "16",
              "AVERAGING": "ema", "EMA_DECAY": "0.9"}
REL_TOL = 1e-6

TRAIN_LINE = re.compile(r"^step:(\d+)/\d+ train_loss:([0-9.]+)", re.M)
VAL_LINE = re.compile(r"^step:(\d+) val_loss:([0-9.]+) val_bpb:([0-9.]+)", re.M)
FINAL_LINE = re.compile(r"^final_(\w+) val_loss:([0-9.]+) val_bpb:([0-9.]+) tokens:(\d+) bytes:(\d+)", re.M)


def _env(sample_data: Path, workdir: Path, **extra: str) -> dict:
    """conftest's `tiny_env` plus DIST_KNOBS (rebuilt here because the runs are shared by the whole module)."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in {n.upper() for n in TINY_KNOBS}}
    env.update(TINY_KNOBS)
    env.update({"DATA_PATH": str(sample_data), "TOKENIZER_PATH": str(sample_data / "tokenizer.model"),
                "LOG_DIR": str(workdir / "logs"), "ARTIFACT_PATH": str(workdir / "model.ptz"),
                "RUN_ID": "test", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **DIST_KNOBS, **extra})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _finish(proc: subprocess.Popen, work: Path, timeout: float) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    log_path = work / "logs" / "test.txt"
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr, "work": work,
            "log": log_path.read_text() if log_path.is_file() else ""}


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    """The 2-process and the 1-process training runs side by side; once the 1-process run has written its
    artifact, a 2-process EVAL_ONLY run of that artifact ("eval2") starts next to the 2-process training run."""
    procs = {}
    for name, cmd in (("2", TORCHRUN), ("1", [sys.executable, str(SCRIPT)])):
        work = tmp_path_factory.mktemp(f"world{name}")
        procs[name] = (work, subprocess.Popen(cmd, env=_env(sample_data, work), cwd=str(work), stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True))
    out = {"1": _finish(procs["1"][1], procs["1"][0], 420)}
    work = tmp_path_factory.mktemp("eval2")
    env = _env(sample_data, work, EVAL_ONLY="1", ARTIFACT_PATH=str(out["1"]["work"] / "model.ptz"))
    eval2 = subprocess.Popen(TORCHRUN, env=env, cwd=str(work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out["2"] = _finish(procs["2"][1], procs["2"][0], 420)
    out["eval2"] = _finish(eval2, work, 420)
    return out


def _ok(run) -> str:
    assert run["rc"] == 0, f"exit code {run['rc']}\n{run['stderr'][-4000:]}"
    return run["log"]


def _train_losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in TRAIN_LINE.findall(log)}


def _val_losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v, _ in VAL_LINE.findall(log)}


def _finals(log: str) -> dict[str, tuple[float, float, int, int]]:
    return {n: (float(loss), float(bpb), int(tok), int(byt)) for n, loss, bpb, tok, byt in FINAL_LINE.findall(log)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def test_both_runs_succeed(runs):
    for world in ("1", "2"):
        log = _ok(runs[world])
        assert f"training stopped step:{ITERATIONS}" in log
        assert re.search(r"^final val_loss:[0-9.]+ val_bpb:[0-9.]+ source:ttt", log, re.M)
        assert (runs[world]["work"] / "model.ptz").is_file()
        assert "averaging:ema decay:0.9 applied:yes" in log
    log = _ok(runs["eval2"])
    assert "world:2" in log and "training stopped" not in log


def test_world_and_grad_accum_logged(runs):
    assert "world:2 grad_accum:4" in _ok(runs["2"])
    assert "world:1 grad_accum:8" in _ok(runs["1"])
    assert re.search(r"^provenance .* world:2$", _ok(runs["2"]), re.M)


def test_weights_in_sync(runs):
    m = re.search(r"weights_in_sync hashes:\[(\d+), (\d+)\]", _ok(runs["2"]))
    assert m, "no weights_in_sync line with two hashes"
    assert m.group(1) == m.group(2)
    assert re.search(r"weights_in_sync hashes:\[\d+\]", _ok(runs["1"]))


def test_step1_train_loss_matches_single_process(runs):
    one, two = _train_losses(_ok(runs["1"])), _train_losses(_ok(runs["2"]))
    assert sorted(one) == sorted(two) == list(range(1, ITERATIONS + 1))
    assert abs(one[1] - two[1]) < 1e-3, (one[1], two[1])


def test_validation_matches_single_process(runs):
    """Same global batches and the same updates: validation after 3 and 6 steps and the pre-quantization score
    agree to REL_TOL (plus the printing resolution of the 6-decimal step lines)."""
    one, two = _val_losses(_ok(runs["1"])), _val_losses(_ok(runs["2"]))
    assert sorted(one) == sorted(two) == [3, 6]
    for step in one:
        assert abs(one[step] - two[step]) <= REL_TOL * one[step] + 1e-6, (step, one[step], two[step])
    pre = [float(re.search(r"pre_quant val_loss:[0-9.]+ val_bpb:([0-9.]+)", _ok(r)).group(1))
           for r in (runs["1"], runs["2"])]
    assert _rel(*pre) <= REL_TOL, pre
    assert one[6] < one[3] < np.log(1024)  # it is training


def test_final_scores_match_single_process(runs):
    """Roundtrip, sliding-window and TTT scores of the 2-process run equal the 1-process run's: token and byte
    counts exactly, val_loss and val_bpb to REL_TOL (the runs differ by float reduction order only)."""
    one, two = _finals(_ok(runs["1"])), _finals(_ok(runs["2"]))
    assert sorted(one) == sorted(two) == ["roundtrip", "sliding", "ttt"], (one, two)
    for name in one:
        (loss1, bpb1, tok1, byt1), (loss2, bpb2, tok2, byt2) = one[name], two[name]
        assert (tok1, byt1) == (tok2, byt2), (name, one[name], two[name])
        assert tok1 == 4096 and byt1 > tok1, (name, one[name])  # every validation target, ~2.7 bytes each
        assert _rel(bpb1, bpb2) <= REL_TOL and _rel(loss1, loss2) <= REL_TOL, (name, one[name], two[name])
    assert one["ttt"][1] < one["roundtrip"][1]  # TTT (and sliding context) improve on the plain score


def test_distributed_evaluation_of_one_artifact_matches(runs):
    """2 processes evaluating the 1-process run's artifact (EVAL_ONLY) reproduce its scores: each rank scores a
    slice of the windows and the fp64 sums are all-reduced, and TTT's gradients are all-reduced, so only the
    order of float sums can differ (measured: identical in every printed digit)."""
    one, two = _finals(_ok(runs["1"])), _finals(_ok(runs["eval2"]))
    assert sorted(one) == sorted(two) == ["roundtrip", "sliding", "ttt"], (one, two)
    for name in one:
        assert one[name][2:] == two[name][2:], (name, one[name], two[name])
        assert _rel(one[name][1], two[name][1]) <= REL_TOL and _rel(one[name][0], two[name][0]) <= REL_TOL, \
            (name, one[name], two[name])
    size = re.search(r"^bytes_model:(\d+) ", _ok(runs["1"]), re.M).group(1)
    assert re.search(rf"^bytes_model:{size} ", _ok(runs["eval2"]), re.M)


@pytest.fixture(scope="module")
def first_step_batch_losses(sample_data) -> list[float]:
    """Mean loss of each of the 8 micro-batches of step 1, at the script's initialisation (seed, then GPT(h))."""
    h = train_gpt.Hyperparameters.from_env({**TINY_KNOBS, **DIST_KNOBS, "DATA_PATH": str(sample_data),
                                            "TOKENIZER_PATH": str(sample_data / "tokenizer.model")})
    torch.manual_seed(h.seed)
    model = train_gpt.GPT(h)
    loader = train_gpt.DistributedTokenLoader(os.path.join(h.data_path, "fineweb_train_*.bin"), h.vocab_size, 0, 1,
                                              CPU, h.train_batch_tokens // 8, h.train_seq_len, prefetch=0)
    with torch.no_grad():
        return [model(*loader.next_batch()).item() for _ in range(8)]


def test_step1_train_loss_is_the_global_batch_loss(runs, first_step_batch_losses):
    """The 1-process step-1 loss is the initial model's mean loss over the first global batch (8 micro-batches)."""
    per_micro = first_step_batch_losses
    one = _train_losses(_ok(runs["1"]))
    assert abs(one[1] - float(np.mean(per_micro))) < 1.5e-4, (one[1], per_micro)


def test_logged_train_loss_is_world_size_independent(runs, first_step_batch_losses):
    """With 8-GPU semantics the logged train_loss of every step describes the whole global batch, so a
    2-process run logs what a 1-process run logs (up to float rounding)."""
    one, two = _train_losses(_ok(runs["1"])), _train_losses(_ok(runs["2"]))
    bad = {s: (one[s], two[s]) for s in one if abs(one[s] - two[s]) > 2e-4}
    if bad:
        per_micro = first_step_batch_losses
        detail = (f"step 1: global-batch mean {np.mean(per_micro):.5f}, rank-0 micro-batches (0,2,4,6) mean "
                  f"{np.mean(per_micro[0::2]):.5f}, rank-1 (1,3,5,7) mean {np.mean(per_micro[1::2]):.5f}")
        pytest.fail(f"train_loss differs between world 1 and world 2 at steps {bad}; {detail}. "
                    "The 2-process value is rank 0's own micro-batches only (not all-reduced).")


def test_loader_ranks_partition_the_global_batch(sample_data):
    """Rank r's k-th micro-batch with world 2 is micro-batch 2k+r of the 1-process run: same global batches."""
    pattern = str(sample_data / "fineweb_train_*.bin")
    seq, global_tokens = 64, 4096

    def batches(rank, world, n):
        loader = train_gpt.DistributedTokenLoader(pattern, 1024, rank, world, CPU, global_tokens // (8 // world),
                                                  seq, prefetch=0)
        return [loader.next_batch() for _ in range(n)]

    single = batches(0, 1, 16)  # two optimizer steps
    for world in (2, 4, 8):
        per_rank = [batches(r, world, 16 // world) for r in range(world)]
        for r in range(world):
            for k, (x, y) in enumerate(per_rank[r]):
                sx, sy = single[world * k + r]
                assert torch.equal(x, sx) and torch.equal(y, sy), (world, r, k)
    x0, y0 = single[0]
    assert x0.shape == (global_tokens // 8 // seq, seq)
    assert torch.equal(x0.flatten()[1:], y0.flatten()[:-1])  # targets are the next tokens


def test_loader_with_prefetch_thread_matches(sample_data):
    pattern = str(sample_data / "fineweb_train_*.bin")
    plain = train_gpt.DistributedTokenLoader(pattern, 1024, 1, 2, CPU, 1024, 64, prefetch=0)
    threaded = train_gpt.DistributedTokenLoader(pattern, 1024, 1, 2, CPU, 1024, 64, prefetch=2)
    try:
        for _ in range(5):
            (a, b), (c, d) = plain.next_batch(), threaded.next_batch()
            assert torch.equal(a, c) and torch.equal(b, d)
    finally:
        threaded.close()


@pytest.mark.parametrize("world", ["3", "16"])
def test_world_size_must_divide_8(tiny_hparams, monkeypatch, world):
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(train_gpt.KnobError, match="divide 8"):
        train_gpt.setup_runtime(tiny_hparams)


def test_single_process_runtime(tiny_hparams, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    rt = train_gpt.setup_runtime(tiny_hparams)
    assert (rt.rank, rt.world, rt.device.type) == (0, 1, "cpu")
    assert rt.amp_dtype is None and not rt.compiled  # COMPILE=auto, AUTOCAST=auto: eager fp32 on CPU


def test_wallclock_schedule_is_smooth_and_identical_across_ranks(sample_data, tmp_path):
    """Under a wall-clock cap the LR multiplier follows the all-ranks training time every step (not only at
    validation points), QAT switches on, and both ranks still end with identical weights."""
    env = _env(sample_data, tmp_path)
    env.update({"MAX_WALLCLOCK_SECONDS": "6", "ITERATIONS": "100000", "VAL_LOSS_EVERY": "0", "GPTQ": "0",
                "QAT": "1", "QAT_START_FRAC": "0.6", "TTT": "0", "SLIDING_EVAL": "0"})
    proc = subprocess.run(TORCHRUN, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = (tmp_path / "logs" / "test.txt").read_text()
    lr = [float(v) for v in re.findall(r"^step:\d+/\d+ train_loss:[0-9.]+ lr_mul:([0-9.]+)", log, re.M)]
    assert len(lr) >= 6
    assert lr[0] == 1.0 and lr[-1] < 0.5, lr
    assert len({v for v in lr if v < 1.0}) >= 3, f"LR multiplier moves in coarse steps: {lr}"
    assert all(b <= a for a, b in zip(lr, lr[1:])), lr
    assert "qat:on step:" in log
    hashes = re.search(r"weights_in_sync hashes:\[(\d+), (\d+)\]", log)
    assert hashes and hashes.group(1) == hashes.group(2)


# ---- world-size independence of calibration and TTT, checked in one process by playing each rank in turn ----

def _no_collectives(monkeypatch):
    """Each simulated rank computes its own share; the collectives (all-reduce) become no-ops."""
    monkeypatch.setattr(train_gpt.dist, "all_reduce", lambda *a, **k: None)
    monkeypatch.setattr(train_gpt.dist, "barrier", lambda *a, **k: None)


def test_calibration_set_is_world_size_independent(sample_data, monkeypatch):
    """The GPTQ calibration sequences of all ranks together are the 1-process calibration sequences."""
    h = train_gpt.Hyperparameters.from_env({**TINY_KNOBS, "DATA_PATH": str(sample_data), "GPTQ": "1",
                                            "TOKENIZER_PATH": str(sample_data / "tokenizer.model")})
    _no_collectives(monkeypatch)
    seen = []
    monkeypatch.setattr(train_gpt, "collect_hessians",
                        lambda model, batches, names, rt: seen.append(torch.cat([x for x, _ in batches])) or {})
    model = train_gpt.GPT(h)

    def calibration_rows(world):
        seen.clear()
        for rank in range(world):
            train_gpt.calibrate(h, model, train_gpt.Runtime(CPU, rank, world), lambda msg: None, 0.0)
        return sorted(map(tuple, torch.cat(seen).tolist()))

    one, two = calibration_rows(1), calibration_rows(2)
    assert len(one) == len(two) == h.gptq_calib_tokens // h.train_seq_len
    shared = len(set(one) & set(two))
    assert one == two, f"only {shared} of {len(one)} calibration sequences are the same with 2 ranks"


class _RowRecorder(nn.Module):
    """Stands in for the model in sgd_train: records how many real (non-padding) rows each step gives it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.rows = []

    def forward(self, x, y, reduction="none"):
        self.rows.append(int((x > 0).any(dim=1).sum()))  # tokens are >= 1, padding reads 0
        return self.w + torch.zeros(x.shape)


def _ttt_rows(h, n_targets: int, world: int, monkeypatch) -> list[list[int]]:
    """Real rows per sgd_train step for each simulated rank."""
    _no_collectives(monkeypatch)
    tokens = torch.arange(1, n_targets + 2)
    out = []
    for rank in range(world):
        model = _RowRecorder()
        params = list(model.parameters())
        train_gpt.sgd_train(model, tokens, torch.arange(n_targets), params, torch.optim.SGD(params, lr=0.0), h,
                            train_gpt.Runtime(CPU, rank, world))
        out.append(model.rows)
    return out


def test_ttt_steps_are_world_size_independent(tiny_hparams, monkeypatch):
    """A chunk of 16 rows with TTT_BATCH_SEQS=8 takes the same number of SGD steps on 1 and 2 ranks
    (TTT_BATCH_SEQS is the global number of rows per step, as the training batch is)."""
    one, two = _ttt_rows(tiny_hparams, 16 * 64, 1, monkeypatch), _ttt_rows(tiny_hparams, 16 * 64, 2, monkeypatch)
    assert sum(one[0]) == sum(map(sum, two)) == 16  # every row is trained on once either way
    assert len(one[0]) == len(two[0]), f"SGD steps per chunk: {len(one[0])} on 1 rank, {len(two[0])} on 2 ranks"


def test_ttt_rows_are_spread_over_ranks(tiny_hparams, monkeypatch):
    """A chunk of 16 rows in a 32-row step on 8 ranks: every rank trains on some of them, none on padding only."""
    h = dataclasses.replace(tiny_hparams, ttt_batch_seqs=32)
    rows = _ttt_rows(h, 16 * 64, 8, monkeypatch)
    assert sum(map(sum, rows)) == 16
    assert all(sum(r) > 0 for r in rows), f"real rows per rank: {[sum(r) for r in rows]}"
