"""torch.compile on CPU: the whole pipeline compiled (inductor, bf16 autocast, 2 gloo ranks), EVAL_ONLY of its
artifact, compiled-vs-eager numerics, a fixed number of eval/TTT graphs, and a deliberately introduced recompile.

Cost. Inductor on CPU compiles every generated kernel with g++ (~1.5-3 s each on 2 cores, ~100 kernels for the
graphs below), so the model is as small as the features allow (2 layers x 32 dims, sequences of 32) and every phase
reuses a shape: EVAL_SEQ_LEN = TRAIN_SEQ_LEN and VAL_BATCH_SEQS = TTT_BATCH_SEQS = the training micro-batch rows, and
every Muon matrix is 32x32 (MLP_MULT=1, NUM_KV_HEADS=NUM_HEADS), so Newton-Schulz compiles one graph, not one per
shape. The in-process inductor comparison uses the same model and batch shape as the run, so with the run's cache
(the default TORCHINDUCTOR_CACHE_DIR, shared by all processes here) most of its kernels are already built. The
other tests use the aot_eager backend: graph counts and guard failures are dynamo's, not the backend's.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import train_gpt
from conftest import TINY_KNOBS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
CPU = torch.device("cpu")
ROWS = 2  # rows of a training micro-batch (TRAIN_BATCH_TOKENS / 8 / TRAIN_SEQ_LEN), of an eval batch, of a TTT step

MODEL_KNOBS = {"NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "2", "MLP_MULT": "1",
               "TRAIN_SEQ_LEN": "32", "BIGRAM_BUCKETS": "64", "BIGRAM_DIM": "8", "ROPE_DIMS": "8", "XSA_LAST_N": "1",
               "NUM_LOOPS": "1", "LOOP_START": "1", "LOOP_END": "1"}
RUN_KNOBS = {**MODEL_KNOBS,
             "COMPILE": "1", "AUTOCAST": "bf16", "COMPILE_BACKEND": "inductor",
             "TRAIN_BATCH_TOKENS": str(8 * ROWS * 32), "ITERATIONS": "4", "WARMUP_STEPS": "2",
             "MAX_WALLCLOCK_SECONDS": "0", "QAT": "1", "QAT_START_FRAC": "0.5", "LOOP_ENABLE_FRAC": "0.5",
             "AVERAGING": "ema", "EMA_DECAY": "0.9", "GPTQ": "1", "GPTQ_CALIB_TOKENS": "128",
             "PASSTHROUGH_MAX_NUMEL": "256", "VAL_MAX_TOKENS": "256", "VAL_BATCH_SEQS": str(ROWS),
             "EVAL_SEQ_LEN": "32", "EVAL_STRIDE": "16", "SLIDING_EVAL": "1", "TTT": "1", "TTT_MODE": "chunked",
             "TTT_CHUNK_TOKENS": "128", "TTT_EPOCHS": "1", "TTT_BATCH_SEQS": str(ROWS), "VAL_LOSS_EVERY": "0",
             "TRAIN_LOG_EVERY": "1", "RUN_ID": "test", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# Graphs dynamo compiles in each phase of that run: warmup primes the training step unlooped and looped (2),
# validation unlooped and looped (2), Newton-Schulz (1) and, on synthetic tokens, TTT's training forward (grad mode,
# per-token losses); nothing after warmup: the final evaluations and TTT reuse the primed graphs.
EXPECTED_GRAPHS = {"train": 6, "training": 0, "eval": 0, "ttt": 0}

FINAL_LINE = re.compile(r"^final_(\w+) val_loss:(\S+) val_bpb:(\S+) tokens:(\d+) bytes:(\d+)", re.M)
SUMMARY_LINE = re.compile(r"^compile: graphs (.*) recompiles:(\d+)$", re.M)


def assert_compile_guard_ok(log: str):
    """The run compiled nothing after warmup; the failure message carries the guard line with dynamo's reasons."""
    lines = [line for line in log.splitlines() if line.startswith("compile_guard:")]
    assert len(lines) == 1, f"expected one compile_guard line, got {lines}"
    assert lines[0].startswith("compile_guard: ok graphs compiled after warmup:0"), \
        f"graphs were compiled after warmup (a recompile in the training loop): {lines[0]}"


def _env(sample_data: Path, work: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in TINY_KNOBS and k not in RUN_KNOBS and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update({**RUN_KNOBS, "DATA_PATH": str(sample_data), "TOKENIZER_PATH": str(sample_data / "tokenizer.model"),
                "LOG_DIR": str(work / "logs"), "ARTIFACT_PATH": str(work / "model.ptz"), **extra})
    return env


def _run(cmd, env, work: Path, timeout: int = 900) -> dict:
    proc = subprocess.run(cmd, env=env, cwd=str(work), capture_output=True, text=True, timeout=timeout)
    log = work / "logs" / "test.txt"
    return {"rc": proc.returncode, "stderr": proc.stderr, "log": log.read_text() if log.is_file() else ""}


def _ok(run) -> str:
    assert run["rc"] == 0, f"exit code {run['rc']}\n{run['stderr'][-5000:]}"
    return run["log"]


@pytest.fixture(scope="module")
def compiled_run(sample_data, tmp_path_factory):
    """The 2-rank compiled run, then a 1-process compiled EVAL_ONLY run of its artifact (roundtrip only)."""
    work = tmp_path_factory.mktemp("compiled2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    run = _run(cmd, _env(sample_data, work), work)
    run["artifact"] = work / "model.ptz"
    if run["rc"] == 0:
        work_eval = tmp_path_factory.mktemp("compiled_eval")
        env = _env(sample_data, work_eval, EVAL_ONLY="1", ARTIFACT_PATH=str(run["artifact"]), TTT="0",
                   SLIDING_EVAL="0")
        run["eval_only"] = _run([sys.executable, str(SCRIPT)], env, work_eval)
    return run


def test_compiled_run_goes_through_every_phase(compiled_run):
    log = _ok(compiled_run)
    assert re.search(r"^run_id:test .* world:2 grad_accum:4 compile:1 autocast:torch.bfloat16", log, re.M)
    assert re.search(r"^warmup: 2 priming steps run and undone, evaluation graphs primed on synthetic tokens; "
                     r"graphs compiled:\d+$", log, re.M)
    assert re.search(r"^qat:on step:2 ", log, re.M) and re.search(r"^looping:on step:2 .*layers:\[0, 1, 1\]", log, re.M)
    assert "training stopped step:4 " in log
    assert "averaging:ema decay:0.9 applied:yes" in log
    assert re.search(r"^calibration: 128 training tokens .*, [1-9]\d* Hessians", log, re.M)
    assert re.search(r"^export: zstd-22 .* \d+ bytes", log, re.M)
    finals = {name: (float(loss), int(tok)) for name, loss, _, tok, _ in FINAL_LINE.findall(log)}
    assert sorted(finals) == ["roundtrip", "sliding", "ttt"]
    assert all(tok == 256 and 0 < loss < 8 for loss, tok in finals.values()), finals
    assert compiled_run["artifact"].is_file()


def test_no_recompile_after_warmup(compiled_run):
    assert_compile_guard_ok(_ok(compiled_run))


def test_ranks_hold_the_same_weights(compiled_run):
    m = re.search(r"^weights_in_sync hashes:\[(\d+), (\d+)\]$", _ok(compiled_run), re.M)
    assert m and m.group(1) == m.group(2), m and m.group(0)


def test_graph_counts_are_fixed(compiled_run):
    m = SUMMARY_LINE.search(_ok(compiled_run))
    assert m, "no compile: summary line"
    graphs = {k: int(v) for k, v in (item.split(":") for item in m.group(1).split())}
    assert graphs == EXPECTED_GRAPHS, m.group(0)
    # "recompiles" counts dynamo's guard failures: the k-th new variant of GPT.forward (grad mode, looping,
    # reduction) fails the guards of the k variants cached before it, so 5 variants give 1+2+3+4 = 10; Newton-Schulz
    # sees one shape and never recompiles
    assert int(m.group(2)) == 1 + 2 + 3 + 4, m.group(0)


def test_eval_only_reproduces_the_roundtrip_score(compiled_run):
    """A fresh process (1 rank, compiled) loading the artifact prints the in-run roundtrip score digit for digit."""
    _ok(compiled_run)
    log = _ok(compiled_run["eval_only"])
    in_run = {m[0]: m[1:] for m in FINAL_LINE.findall(compiled_run["log"])}
    again = {m[0]: m[1:] for m in FINAL_LINE.findall(log)}
    assert sorted(again) == ["roundtrip"], again
    assert again["roundtrip"][:4] == in_run["roundtrip"][:4], (in_run["roundtrip"], again["roundtrip"])
    assert re.search(r"^eval_only: evaluation graphs primed on synthetic tokens; graphs compiled:1$", log, re.M)
    assert re.search(r"^compile: graphs train:1 eval:0 recompiles:0$", log, re.M), SUMMARY_LINE.search(log)


# ---- in process ---------------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches are per process: start and end each in-process compiled test without compiled code."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny_model(seed=0, **knobs) -> train_gpt.GPT:
    h = train_gpt.Hyperparameters.from_env({**MODEL_KNOBS, **knobs})
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    with torch.no_grad():  # non-zero output projections, so every block changes the loss
        for m in model.modules():
            if isinstance(m, train_gpt.CastedLinear) and m.zero_init:
                m.weight.normal_(0.0, 0.05)
    model.set_looping(True)
    model.set_qat(True)
    return model


# Compiled vs eager on one batch. bf16 autocast, the training graph (loss and gradients): inductor keeps fused
# intermediates in fp32 where eager rounds every op's output to bf16, so the two differ by bf16 rounding (2^-8
# relative per op) accumulated over the graph. Measured: loss 1e-6 relative (the logits and the loss are fp32),
# gradients 2-3e-2 relative norm for the worst tensor (q_gain), under 1e-2 for the matrices; tolerances 2e-3 and
# 0.1. fp32, the evaluation graph (per-token losses under no_grad, ~30 kernels where the training graph needs ~50):
# the same math in another order, measured <= 1.5e-8 relative; tolerance 1e-5.
def _batch():
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randint(0, 1024, (ROWS, 32), generator=g) for _ in range(2))


def _rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def test_compiled_matches_eager_bf16(fresh_dynamo):
    rt = train_gpt.Runtime(CPU, amp_dtype=torch.bfloat16, compiled=True, backend="inductor")
    model = _tiny_model()
    x, y = _batch()

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        with rt.autocast():
            loss = fn(x, y)
        loss.backward()
        return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = loss_and_grads(model)
    compiled_loss, compiled_grads = loss_and_grads(rt.compile(model))
    assert abs(compiled_loss - eager_loss) <= 2e-3 * eager_loss, (float(compiled_loss), float(eager_loss))
    assert sorted(compiled_grads) == sorted(eager_grads) and len(eager_grads) > 20
    errors = {n: _rel_norm(compiled_grads[n], eager_grads[n]) for n in eager_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 0.1, f"gradient of {worst} differs by {errors[worst]:.2e} (relative norm)"


def test_compiled_matches_eager_fp32(fresh_dynamo):
    rt = train_gpt.Runtime(CPU, compiled=True, backend="inductor")
    model = _tiny_model()
    x, y = _batch()
    with torch.no_grad():
        eager, compiled = model(x, y, reduction="none"), rt.compile(model)(x, y, reduction="none")
    assert compiled.shape == eager.shape == (ROWS, 32)
    assert _rel_norm(compiled, eager) <= 1e-5, (compiled - eager).abs().max()


@pytest.fixture(scope="module")
def eval_setup(sample_data):
    h = train_gpt.Hyperparameters.from_env({**RUN_KNOBS, "DATA_PATH": str(sample_data),
                                            "TOKENIZER_PATH": str(sample_data / "tokenizer.model")})
    luts = train_gpt.build_byte_luts(spm.SentencePieceProcessor(model_file=h.tokenizer_path), h.vocab_size)
    val = train_gpt.load_validation_tokens(str(sample_data / "fineweb_val_*.bin"), h.train_seq_len, h.vocab_size)
    return h, luts, val


def test_eval_and_ttt_graph_counts_do_not_depend_on_the_length(fresh_dynamo, eval_setup):
    """Plain, sliding and chunked-TTT evaluation compile the same graphs for 12 windows / 2 chunks as for 30
    windows / 4 chunks (partial last batches and chunks included): one scoring graph, one TTT training graph."""
    h, luts, val = eval_setup
    rt = train_gpt.Runtime(CPU, compiled=True, backend="aot_eager")
    counts = []
    for n_targets in (12 * 16 + 5, 30 * 16 + 9):  # sliding windows at stride 16; TTT chunks of 128 targets
        torch._dynamo.reset()
        model = _tiny_model()
        model.set_qat(False)
        evaluator = rt.compile(model)
        tokens = val[:n_targets + 1]
        guard = train_gpt.CompileGuard()
        plain = train_gpt.eval_plain(evaluator, tokens, h.train_seq_len, h.val_batch_seqs, luts, rt)
        sliding = train_gpt.eval_sliding(evaluator, tokens, h.eval_seq_len, h.eval_stride, h.val_batch_seqs, luts, rt)
        eval_graphs, _ = guard.mark("eval")
        ttt, _ = train_gpt.eval_ttt(evaluator, tokens, h, luts, rt)
        ttt_graphs, reasons = guard.mark("ttt")
        assert int(plain.sums[1]) == int(sliding.sums[1]) == int(ttt.sums[1]) == n_targets
        counts.append((eval_graphs, ttt_graphs))
    assert counts[0] == counts[1] == (1, 1), f"(eval, ttt) graphs for 197 and 489 targets: {counts}"


DRIFT_KNOBS = {**RUN_KNOBS, "NUM_LAYERS": "1", "LOOP_START": "0", "LOOP_END": "0", "COMPILE_BACKEND": "aot_eager",
               "AUTOCAST": "fp32", "ITERATIONS": "3", "WARMUP_STEPS": "1", "NUM_LOOPS": "0", "QAT": "0", "GPTQ": "0"}


def test_a_recompile_in_the_training_loop_is_caught(fresh_dynamo, eval_setup, sample_data, monkeypatch):
    """Deliberately feed a Python float that changes every step into the graph (dynamo specializes it, so every
    step recompiles): the run logs compile_guard: FAIL with dynamo's reason naming the value, and the check that
    guards the compiled run fails with a message that names it."""
    h = train_gpt.Hyperparameters.from_env({**DRIFT_KNOBS, "DATA_PATH": str(sample_data),
                                            "TOKENIZER_PATH": str(sample_data / "tokenizer.model")})
    _, luts, val = eval_setup
    rt = train_gpt.setup_runtime(h)
    assert rt.compiled and rt.backend == "aot_eager" and rt.world == 1
    original_forward, original_update = train_gpt.GPT.forward, train_gpt.WeightAverager.update

    def drifting_forward(self, ids, targets, reduction="mean"):
        return original_forward(self, ids, targets, reduction) * (1.0 + self.drift_scale)

    model = train_gpt.GPT(h)
    model.drift_scale = 0.0

    def update(self, step, lr_mul):  # once per optimizer step
        model.drift_scale = 1e-6 * step
        return original_update(self, step, lr_mul)

    monkeypatch.setattr(train_gpt.GPT, "forward", drifting_forward)
    monkeypatch.setattr(train_gpt.WeightAverager, "update", update)
    lines = []
    train_gpt.train_model(h, model, rt, lines.append, val[:4 * 32 + 1], luts, train_gpt.CompileGuard())
    log = "\n".join(lines)
    guard_line = next(line for line in lines if line.startswith("compile_guard:"))
    assert guard_line.startswith("compile_guard: FAIL graphs compiled after warmup:"), guard_line
    assert int(re.search(r"after warmup:(\d+)", guard_line).group(1)) >= 2, guard_line  # steps 2 and 3
    assert "drift_scale ==" in guard_line, guard_line
    with pytest.raises(AssertionError, match=r"compile_guard: FAIL .*reasons: .*drift_scale") as failure:
        assert_compile_guard_ok(log)
    assert "drift_scale" in str(failure.value)


@pytest.mark.parametrize("mode", ["chunked", "lora", "phased"])
def test_primed_graphs_cover_every_evaluation_pass(fresh_dynamo, eval_setup, mode):
    """prime_eval_graphs on synthetic tokens compiles every graph the evaluation of real documents then uses: plain,
    sliding, and the TTT mode's (LoRA windows of every length, forward and backward; the SGD steps)."""
    h, luts, val = eval_setup
    h = train_gpt.Hyperparameters.from_env({**RUN_KNOBS, "TTT_MODE": mode, "TTT_LORA_CHUNK": "8", "TTT_LORA_DOCS": "4",
                                            "TTT_LORA_RANK": "4", "TTT_PHASES": "2", "TTT_PHASE_DOCS": "8",
                                            "DATA_PATH": h.data_path, "TOKENIZER_PATH": h.tokenizer_path})
    rt = train_gpt.Runtime(CPU, compiled=True, backend="aot_eager")
    model = _tiny_model()
    model.set_qat(False)
    evaluator, guard = rt.compile(model), train_gpt.CompileGuard()
    before = [p.detach().clone() for p in model.parameters()]
    train_gpt.prime_eval_graphs(evaluator, h, luts, rt)
    primed, _ = guard.mark("prime")
    assert primed >= 2 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # weights unchanged
    lengths = [1, 2, 3, 6, 11, 20, 35, 50] * 3  # documents of every size: LoRA windows of every length
    tokens = val[:sum(lengths) + 1].clone()
    tokens[torch.tensor([0] + lengths[:-1]).cumsum(0)] = train_gpt.BOS_ID
    assert [e - s for s, e in train_gpt.documents(tokens)] == lengths
    train_gpt.eval_plain(evaluator, tokens, h.train_seq_len, h.val_batch_seqs, luts, rt)
    train_gpt.eval_sliding(evaluator, tokens, h.eval_seq_len, h.eval_stride, h.val_batch_seqs, luts, rt)
    if mode == "chunked":
        train_gpt.eval_ttt(evaluator, tokens, h, luts, rt)
    else:
        assert train_gpt.eval_lora(evaluator, tokens, h, luts, rt)[1] == (2 if mode == "phased" else 0)
    new, reasons = guard.mark("eval")
    assert new == 0, f"{new} graphs compiled during evaluation after priming: {reasons}"
