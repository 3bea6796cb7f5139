"""Scoring on a byte sidecar (CaseOps, issue 19): when fineweb_val_bytes_*.bin sit beside the validation shards, every
score (plain, sliding, each TTT mode; one rank and, through the main() runs of test_distributed's kind, two) divides
by the sidecar's bytes, the log names the byte source, and a sidecar that does not match its shard is an error."""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import build_sample
import build_shards
import train_gpt as tg
from conftest import TINY_KNOBS

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
CPU = torch.device("cpu")
RT = tg.Runtime(CPU)


@pytest.fixture(scope="module")
def plain_with_sidecar(tmp_path_factory) -> Path:
    """The sample with the committed tokenizer and a byte sidecar, which then equals the tokenizer's tables."""
    out = tmp_path_factory.mktemp("plain_sidecar")
    build_shards.build([SAMPLE / "sample_train.jsonl.zst"], out, val_input=[SAMPLE / "sample_val.jsonl.zst"],
                       tokenizer=SAMPLE / "sample_1024_bpe.model", max_train_tokens=100_000, shard_tokens=60_000,
                       byte_sidecar=True, threads=1)
    return out


@pytest.fixture(scope="module")
def caseops(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("caseops")
    build_sample.build_caseops_sample(out)
    return out


def setup_eval(data: Path, **over):
    knobs = {**TINY_KNOBS, "DATA_PATH": str(data), "TOKENIZER_PATH": str(data / "tokenizer.model"),
             "TTT_LORA_CHUNK": "16", "TTT_LORA_DOCS": "4", "TTT_LORA_RANK": "4", "TTT_PHASES": "1",
             "TTT_PHASE_DOCS": "4", **over}
    h = tg.Hyperparameters.from_env(knobs)
    pattern = str(data / "fineweb_val_*.bin")
    tokens = tg.load_validation_tokens(pattern, h.train_seq_len, h.vocab_size)[:1025]
    luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=h.tokenizer_path), h.vocab_size)
    sidecar = tg.load_byte_sidecar(pattern, tokens.numel())
    torch.manual_seed(0)
    model = tg.GPT(h)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return h, model, tokens, luts, sidecar


def all_passes(h, model, tokens, luts):
    """{pass: Scores} for plain, sliding and the three TTT modes, each on a fresh copy of the model."""
    import copy
    out = {"plain": tg.eval_plain(model, tokens, h.train_seq_len, h.val_batch_seqs, luts, RT),
           "sliding": tg.eval_sliding(model, tokens, h.eval_seq_len, h.eval_stride, h.val_batch_seqs, luts, RT)}
    out["chunked"] = tg.eval_ttt(copy.deepcopy(model), tokens, h, luts, RT)[0]
    for mode in ("lora", "phased"):
        out[mode] = tg.eval_lora(copy.deepcopy(model), tokens, dataclasses.replace(h, ttt_mode=mode), luts, RT)[0]
    return out


def test_a_plain_sidecar_gives_the_tables_scores_in_every_pass(plain_with_sidecar):
    h, model, tokens, luts, sidecar = setup_eval(plain_with_sidecar)
    assert sidecar is not None and sidecar.numel() == tokens.numel()
    by_tables, by_sidecar = all_passes(h, model, tokens, luts), all_passes(h, model, tokens, (*luts, sidecar))
    for name in by_tables:
        assert torch.equal(by_tables[name].sums, by_sidecar[name].sums), name
        assert by_tables[name].sums[2] > 0


def test_every_pass_divides_by_the_sidecars_bytes(plain_with_sidecar):
    """Sidecar counts doubled on the odd positions: each pass's byte total moves by exactly those of its targets."""
    h, model, tokens, luts, sidecar = setup_eval(plain_with_sidecar)
    odd = torch.arange(sidecar.numel()) % 2 == 1
    changed = torch.where(odd, sidecar * 2, sidecar)
    base, moved = all_passes(h, model, tokens, (*luts, sidecar)), all_passes(h, model, tokens, (*luts, changed))
    every_target = int(sidecar[1:].sum())
    extra = int(sidecar[1:][odd[1:]].sum())  # targets are tokens 1..n
    for name in base:
        assert torch.equal(base[name].sums[:2], moved[name].sums[:2]), name  # same losses and token counts
        assert int(base[name].sums[2]) == every_target, name  # each target scored once
        assert int(moved[name].sums[2]) == every_target + extra, name


def test_caseops_sidecar_sums_to_the_original_bytes(caseops):
    """On the CaseOps sample every target's bytes come from the sidecar; their total over the split is the UTF-8 size
    of the original validation documents (the split cut to whole sequences aside)."""
    h, model, tokens, luts, sidecar = setup_eval(caseops)
    full = tg.load_byte_sidecar(str(caseops / "fineweb_val_*.bin"), 10**12)
    import zstandard, json, io
    docs = [json.loads(line)["text"] for line in io.TextIOWrapper(
        zstandard.ZstdDecompressor().stream_reader(open(SAMPLE / "sample_val.jsonl.zst", "rb")), encoding="utf-8")]
    assert int(full.sum()) == sum(len(d.encode("utf-8")) for d in docs if d.strip())
    scores = tg.eval_plain(model, tokens, h.train_seq_len, h.val_batch_seqs, (*luts, sidecar), RT)
    assert int(scores.sums[2]) == int(sidecar[1:].sum())
    table = tg.eval_plain(model, tokens, h.train_seq_len, h.val_batch_seqs, luts, RT)
    assert int(table.sums[2]) != int(scores.sums[2])  # the tables would count the operators' bytes


def test_bad_sidecars_are_clear_errors(plain_with_sidecar, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(plain_with_sidecar, data)
    pattern = str(data / "fineweb_val_*.bin")
    sidecars = sorted(data.glob("fineweb_val_bytes_*.bin"))
    assert len(sidecars) >= 2 and len(tg.list_shards(pattern)) == len(sidecars)  # sidecars are not token shards
    raw = sidecars[0].read_bytes()
    sidecars[0].write_bytes(raw[:-2])  # one count short
    with pytest.raises(ValueError, match="declares"):
        tg.load_byte_sidecar(pattern, 100)
    header = np.frombuffer(raw[:1024], dtype="<i4").copy()
    header[2] -= 1
    sidecars[0].write_bytes(header.tobytes() + raw[1024:-2])  # a consistent file, but one count short of its shard
    with pytest.raises(ValueError, match="counts, its shard"):
        tg.load_byte_sidecar(pattern, 100)
    sidecars[0].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        tg.load_byte_sidecar(pattern, 100)
    with pytest.raises(ValueError, match="sidecar needs the targets' positions"):
        tg.target_bytes(torch.tensor([1]), torch.tensor([2]), (None, None, None, torch.ones(4)))


def test_main_logs_the_byte_source_and_scores_on_the_sidecar(caseops, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k not in TINY_KNOBS}
    env.update({**TINY_KNOBS, "DATA_PATH": str(caseops), "TOKENIZER_PATH": str(caseops / "tokenizer.model"),
                "LOG_DIR": str(tmp_path / "logs"), "ARTIFACT_PATH": str(tmp_path / "m.ptz"), "RUN_ID": "sc",
                "ITERATIONS": "2", "TTT": "0", "GPTQ": "0", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "logs" / "sc.txt").read_text()
    assert re.search(r"^data .* byte_source:sidecar$", log, re.M)
    m = re.search(r"^final_roundtrip .* tokens:(\d+) bytes:(\d+) ", log, re.M)
    n = int(m.group(1))
    sidecar = tg.load_byte_sidecar(str(caseops / "fineweb_val_*.bin"), n + 1)
    assert int(m.group(2)) == int(sidecar[1:].sum())
    assert math.isfinite(float(re.search(r"^final val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1)))
