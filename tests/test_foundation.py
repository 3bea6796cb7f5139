"""Foundation tests for train_gpt.py: knobs, shard format, exact BPB accounting, a short CPU training run,
the export round trip and the artifact size budget.

Everything runs on CPU with the tiny model of conftest.py; the two `python train_gpt.py` subprocesses
(one training run, one EVAL_ONLY run) are shared by several tests through module-scoped fixtures.
"""
from __future__ import annotations

import dataclasses
import json
import lzma
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import zstandard

import build_shards
import shard_io
import train_gpt
from conftest import TINY_KNOBS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
SAMPLE_VAL = ROOT / "data" / "sample" / "sample_val.jsonl.zst"
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------




def subprocess_env(sample_data: Path, workdir: Path, **overrides) -> dict:
    """The same environment as conftest's `tiny_env`, for module-scoped fixtures (tiny_env is per test)."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in {n.upper() for n in TINY_KNOBS}}
    env.update(TINY_KNOBS)
    env.update({"DATA_PATH": str(sample_data), "TOKENIZER_PATH": str(sample_data / "tokenizer.model"),
                "LOG_DIR": str(workdir / "logs"), "ARTIFACT_PATH": str(workdir / "model.ptz"),
                "RUN_ID": "test", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout)


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def val_tokens_for(h) -> torch.Tensor:
    return train_gpt.load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"), h.train_seq_len,
                                            h.vocab_size, h.val_max_tokens)


def luts_for(h):
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    return train_gpt.build_byte_luts(sp, h.vocab_size, CPU)


@torch.no_grad()
def perturbed_model(h, seed: int = 0, scale: float = 0.05) -> train_gpt.GPT:
    """A tiny GPT whose weights are all moved off their (partly zero / orthogonal) init."""
    torch.manual_seed(seed)
    model = train_gpt.GPT(h)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------
# 1. knobs
# ----------------------------------------------------------------------------------------------


def test_knobs_defaults_when_env_empty():
    h = train_gpt.Hyperparameters.from_env({})
    assert h.num_layers == 11 and type(h.num_layers) is int
    assert h.model_dim == 512
    assert h.train_seq_len == 2048
    assert h.max_wallclock_seconds == 600.0 and type(h.max_wallclock_seconds) is float
    assert h.vocab_size == 1024
    assert h.compressor == "zstd"
    assert h.max_artifact_bytes == 16_000_000


def test_knobs_parse_types():
    env = {"NUM_LAYERS": " 3 ", "MODEL_DIM": "96", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8",
           "EMA_DECAY": "0.5", "MAX_WALLCLOCK_SECONDS": "12", "MLP_MULT": "2", "QAT": "off", "BITPACK": "Yes",
           "COMPRESSOR": "lzma", "MLP_ACT": "relu2", "RUN_ID": "abc", "ZSTD_LEVEL": "-1",
           # unrelated environment variables are ignored
           "PATH": "/usr/bin", "HOME": "/root", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    h = train_gpt.Hyperparameters.from_env(env)
    assert (h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.rope_dims) == (3, 96, 4, 2, 8)
    assert type(h.num_layers) is int
    assert h.ema_decay == 0.5 and type(h.ema_decay) is float
    assert h.max_wallclock_seconds == 12.0 and type(h.max_wallclock_seconds) is float
    assert h.mlp_mult == 2.0 and type(h.mlp_mult) is float
    assert h.qat is False and h.bitpack is True
    assert (h.compressor, h.mlp_act, h.run_id, h.zstd_level) == ("lzma", "relu2", "abc", -1)


@pytest.mark.parametrize("raw,expected", [("1", True), ("true", True), ("YES", True), ("On", True),
                                          ("0", False), ("False", False), ("no", False), ("OFF", False)])
def test_knobs_bool_spellings(raw, expected):
    assert train_gpt.Hyperparameters.from_env({"QAT": raw}).qat is expected


@pytest.mark.parametrize("key,raw", [("NUM_LAYERS", "abc"), ("NUM_LAYERS", "3.5"), ("NUM_LAYERS", ""),
                                     ("EMA_DECAY", "nan"), ("EMA_DECAY", "inf"), ("EMA_DECAY", "0.9x"),
                                     ("QAT", "maybe"), ("BITPACK", "2")])
def test_knobs_malformed_value_names_the_knob(key, raw):
    with pytest.raises(train_gpt.KnobError) as exc:
        train_gpt.Hyperparameters.from_env({key: raw})
    assert key in str(exc.value)


@pytest.mark.parametrize("key,raw", [("MLP_ACT", "gelu"), ("AVERAGING", "foo"), ("COMPRESSOR", "brotli"),
                                     ("TTT_OPTIMIZER", "adam"), ("DEVICE", "tpu")])
def test_knobs_unknown_choice(key, raw):
    with pytest.raises(train_gpt.KnobError) as exc:
        train_gpt.Hyperparameters.from_env({key: raw})
    assert key in str(exc.value) and raw in str(exc.value)


@pytest.mark.parametrize("typo,right", [("NUM_LAYER", "NUM_LAYERS"), ("ITERATION", "ITERATIONS"),
                                        ("MODEL_DIMS", "MODEL_DIM")])
def test_knobs_near_miss_name_suggests_the_knob(typo, right):
    with pytest.raises(train_gpt.KnobError) as exc:
        train_gpt.Hyperparameters.from_env({typo: "3"})
    assert right in str(exc.value) and typo in str(exc.value)


@pytest.mark.parametrize("env", [{"NUM_HEADS": "3"}, {"EVAL_STRIDE": "4096"}, {"QUANT_MLP_BITS": "9"},
                                 {"BIGRAM_BUCKETS": "1"}, {"NUM_LAYERS": "0"}])
def test_knobs_inconsistent_values_rejected(env):
    with pytest.raises(train_gpt.KnobError):
        train_gpt.Hyperparameters.from_env(env)


# ----------------------------------------------------------------------------------------------
# 2. shard format
# ----------------------------------------------------------------------------------------------


def _good_shard(path: Path, n: int = 1000) -> np.ndarray:
    tokens = np.random.default_rng(0).integers(0, 65536, size=n).astype(np.uint16)
    tokens[:3] = (0, 65535, 1)
    shard_io.write_shard(path, tokens)
    return tokens


def test_shard_roundtrip(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    tokens = _good_shard(path)
    assert path.stat().st_size == 1024 + 2 * tokens.size
    loaded = train_gpt.load_shard(str(path))
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, tokens)
    empty = tmp_path / "empty.bin"
    shard_io.write_shard(empty, np.zeros(0, dtype=np.uint16))
    assert train_gpt.load_shard(str(empty)).size == 0


def _corrupt(path: Path, kind: str) -> None:
    raw = bytearray(path.read_bytes())
    header = np.frombuffer(bytes(raw[:1024]), dtype="<i4").copy()
    if kind == "truncated_header":
        raw = raw[:600]
    elif kind == "empty_file":
        raw = bytearray()
    elif kind == "wrong_magic":
        header[0] = 20240521
    elif kind == "wrong_version":
        header[1] = 2
    elif kind == "one_byte_extra":
        raw += b"\x00"
    elif kind == "one_byte_missing":
        raw = raw[:-1]
    elif kind == "one_token_missing":
        raw = raw[:-2]
    elif kind == "negative_count":
        header[2] = -5
    if kind in ("wrong_magic", "wrong_version", "negative_count"):
        raw[:1024] = header.tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind,pattern", [
    ("truncated_header", r"header"), ("empty_file", r"header"), ("wrong_magic", r"magic"),
    ("wrong_version", r"version"), ("one_byte_extra", r"bytes"), ("one_byte_missing", r"bytes"),
    ("one_token_missing", r"bytes"), ("negative_count", r"bytes")])
def test_shard_corrupt_raises_value_error(tmp_path, kind, pattern):
    path = tmp_path / "fineweb_val_000000.bin"
    _good_shard(path)
    _corrupt(path, kind)
    with pytest.raises(ValueError, match=pattern) as exc:
        train_gpt.load_shard(str(path))
    assert str(path) in str(exc.value)  # the message says which file


def test_shard_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        train_gpt.load_shard(str(tmp_path / "nope.bin"))


def test_list_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="fineweb_train_"):
        train_gpt.list_shards(str(tmp_path / "fineweb_train_*.bin"))
    for i in (2, 0, 1):
        _good_shard(tmp_path / f"fineweb_train_{i:06d}.bin", 10)
    names = [Path(p).name for p in train_gpt.list_shards(str(tmp_path / "fineweb_train_*.bin"))]
    assert names == [f"fineweb_train_{i:06d}.bin" for i in range(3)]


def test_validation_tokens(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 1024, 300), rng.integers(0, 1024, 200)
    shard_io.write_shard(tmp_path / "fineweb_val_000000.bin", a)
    shard_io.write_shard(tmp_path / "fineweb_val_000001.bin", b)
    pattern = str(tmp_path / "fineweb_val_*.bin")
    both = np.concatenate([a, b])
    got = train_gpt.load_validation_tokens(pattern, 64, 1024)
    assert got.dtype == torch.int64 and got.numel() == (499 // 64) * 64 + 1
    np.testing.assert_array_equal(got.numpy(), both[:got.numel()])
    capped = train_gpt.load_validation_tokens(pattern, 64, 1024, max_tokens=130)
    assert capped.numel() == 129
    np.testing.assert_array_equal(capped.numpy(), both[:129])
    with pytest.raises(ValueError, match="shorter than one sequence"):
        train_gpt.load_validation_tokens(pattern, 1024, 1024)


def test_validation_token_out_of_vocab(tmp_path):
    tokens = np.arange(500) % 1024
    tokens[123] = 1024
    shard_io.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    with pytest.raises(ValueError, match="VOCAB_SIZE"):
        train_gpt.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 64, 1024)
    # the same ids are fine with a larger vocabulary
    assert train_gpt.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 64, 2048).numel() == 449


# ----------------------------------------------------------------------------------------------
# 3. exact BPB byte count
# ----------------------------------------------------------------------------------------------


def _challenge_tokenizer() -> Path | None:
    for cand in (Path("/work/shared/tokenizers/fineweb_1024_bpe.model"),
                 ROOT.parent / "shared" / "tokenizers" / "fineweb_1024_bpe.model"):
        if cand.is_file():
            return cand
    return None


@pytest.fixture(params=["sample", "challenge"])
def tokenizer(request, sample_data) -> spm.SentencePieceProcessor:
    if request.param == "sample":
        path = sample_data / "tokenizer.model"
    else:
        path = _challenge_tokenizer()
        if path is None:
            pytest.skip("challenge tokenizer fineweb_1024_bpe.model not found")
    return spm.SentencePieceProcessor(model_file=str(path))


# Text the tokenizers' normaliser (nmt_nfkc) rewrites, typographic punctuation, digits, extra spaces.
SYNTH_NORMALISE = ("Prices rose 12.5% in 2023 \u2014 \u201cquoted\u201d words, it\u2019s true \u2013 "
                   "\ufb01ne \uff12\uff13 items   with    gaps\tand a tab\nand a newline. \u216b chapters.")
# Characters far outside a 1024-piece vocabulary: byte fallback (or <unk> without it).
SYNTH_RARE = ("Emoji \U0001F600\U0001F389 and CJK \u6f22\u5b57\u304b\u306a \ud55c\uad6d\uc5b4, "
              "symbols \u222e \u214b \u2135 \u00bd \u00e9\u00e8 na\u00efve caf\u00e9 \u0436\u0443\u043a 42")


def _documents() -> list[str]:
    docs = list(build_shards.iter_documents([SAMPLE_VAL]))
    chosen = docs[:12]
    chosen += [d for d in docs[12:] if any(ord(c) > 127 for c in d)][:4]  # real non-ASCII documents
    return chosen + [SYNTH_NORMALISE, SYNTH_RARE]


def test_bpb_byte_count_is_exact(tokenizer):
    sp = tokenizer
    luts = train_gpt.build_byte_luts(sp, sp.vocab_size())
    has_bytes = any(sp.is_byte(i) for i in range(sp.vocab_size()))
    docs, skipped_unk = [], 0
    for doc in _documents():
        ids = sp.encode(doc)
        if sp.unk_id() in ids:
            # Without byte fallback an <unk> has lost the original bytes, so there is no exact count to match.
            assert not has_bytes, "a byte-fallback tokenizer must never produce <unk>"
            skipped_unk += 1
            continue
        docs.append(doc)
    assert len(docs) >= 10, f"too few representable documents ({skipped_unk} had <unk>)"

    stream, direct, per_doc_direct = [], 0, []
    for doc in docs:
        ids = sp.encode(doc)
        normalized = sp.decode(ids)
        assert sp.decode(sp.encode(normalized)) == normalized  # the normalised text is a fixed point
        n = len(normalized.encode("utf-8"))
        per_doc_direct.append(n)
        direct += n
        stream += [train_gpt.BOS_ID] + ids
    # the document set exercises what it claims to
    normalized_all = "".join(sp.decode(sp.encode(d)) for d in docs)
    assert any(ord(c) > 127 for c in normalized_all)
    assert any(c.isdigit() for c in normalized_all)
    if has_bytes:
        assert any(sp.is_byte(t) for t in stream), "no byte-fallback piece was exercised"

    t = torch.tensor(stream, dtype=torch.int64)
    prev, tgt = t[:-1], t[1:]
    nbytes = train_gpt.target_bytes(prev, tgt, luts)
    assert nbytes.dtype == torch.int64
    assert int(nbytes.sum()) == direct
    # per document too (the BOS starting each later document is itself a target)
    bos_pos = [i for i, tok in enumerate(stream) if tok == train_gpt.BOS_ID] + [len(stream)]
    for k in range(len(docs)):
        lo, hi = bos_pos[k], bos_pos[k + 1]
        assert int(nbytes[lo:hi - 1].sum()) == per_doc_direct[k], f"document {k}"
    assert torch.all(nbytes[tgt == train_gpt.BOS_ID] == 0)


def test_bpb_space_after_bos(tokenizer):
    sp = tokenizer
    luts = train_gpt.build_byte_luts(sp, sp.vocab_size())
    word = sp.piece_to_id("\u2581the")
    assert word != sp.unk_id() and sp.id_to_piece(word) == "\u2581the"
    other = sp.piece_to_id("a") if sp.piece_to_id("a") != sp.unk_id() else sp.encode("a")[0]
    space = sp.piece_to_id("\u2581")
    bos = train_gpt.BOS_ID
    prev = torch.tensor([bos, other, bos, other, other, bos])
    tgt = torch.tensor([word, word, space, space, bos, bos])
    assert train_gpt.target_bytes(prev, tgt, luts).tolist() == [3, 4, 0, 1, 0, 0]
    # sentencepiece itself drops the leading space of the first piece of a document
    assert sp.decode([word]) == "the"
    assert sp.decode([other, word]).endswith(" the")


def test_build_byte_luts_rejects_wrong_vocab_size(sample_data):
    sp = spm.SentencePieceProcessor(model_file=str(sample_data / "tokenizer.model"))
    for wrong in (1000, 1025, 2048):
        with pytest.raises(ValueError, match="VOCAB_SIZE"):
            train_gpt.build_byte_luts(sp, wrong)
    base, space, boundary = train_gpt.build_byte_luts(sp, sp.vocab_size())
    assert base.shape == space.shape == boundary.shape == (sp.vocab_size(),)


# ----------------------------------------------------------------------------------------------
# 4. val_bpb = total NLL / (ln 2 * total bytes)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def test_val_bpb_formula(tiny_hparams):
    h = tiny_hparams
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    luts = train_gpt.build_byte_luts(sp, h.vocab_size, CPU)
    tokens = val_tokens_for(h)
    model = perturbed_model(h)
    scores = train_gpt.eval_plain(model, tokens, h.train_seq_len, h.val_batch_seqs, luts)

    seq = h.train_seq_len
    n_seq = (tokens.numel() - 1) // seq
    assert n_seq * seq == tokens.numel() - 1 == h.val_max_tokens
    x, y = tokens[:-1].view(n_seq, seq), tokens[1:].view(n_seq, seq)
    nll = torch.cat([model(x[i:i + h.val_batch_seqs], y[i:i + h.val_batch_seqs], reduction="none")
                     for i in range(0, n_seq, h.val_batch_seqs)])
    assert nll.shape == (n_seq, seq)
    total_nll = float(nll.double().sum())

    # bytes straight from the text: split the scored targets at BOS and decode each document piece
    targets = tokens[1:].tolist()
    assert tokens[0].item() == train_gpt.BOS_ID
    total_bytes, doc = 0, []
    for tok in targets + [train_gpt.BOS_ID]:
        if tok == train_gpt.BOS_ID:
            text = sp.decode(doc)
            assert "\ufffd" not in text  # no byte sequence cut in half
            total_bytes += len(text.encode("utf-8"))
            doc = []
        else:
            doc.append(tok)

    assert int(scores.sums[1].item()) == n_seq * seq
    assert int(scores.sums[2].item()) == total_bytes
    assert rel_diff(scores.val_loss, total_nll / (n_seq * seq)) < 1e-9
    expected_bpb = total_nll / (math.log(2.0) * total_bytes)
    assert rel_diff(scores.val_bpb, expected_bpb) < 1e-9
    assert 1.0 < scores.val_bpb < 20.0  # a random model: far from trivial but finite


# ----------------------------------------------------------------------------------------------
# 5. short CPU training run (one subprocess shared by several tests)
# ----------------------------------------------------------------------------------------------

VAL_LINE = re.compile(r"^step:(\d+) val_loss:([0-9.]+) val_bpb:([0-9.]+)", re.M)


@pytest.fixture(scope="module")
def train_run(sample_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("train_run")
    env = subprocess_env(sample_data, work, ITERATIONS=30, VAL_LOSS_EVERY=10)
    script_bytes = len(SCRIPT.read_bytes())  # the code size the run will report (read as it starts)
    proc = run_script(env, work)
    log_path = work / "logs" / "test.txt"
    log = log_path.read_text() if log_path.is_file() else ""
    return {"proc": proc, "log": log, "artifact": work / "model.ptz", "work": work, "env": env,
            "script_bytes": script_bytes}


def _ok(run):
    proc = run["proc"]
    assert proc.returncode == 0, f"train_gpt.py failed ({proc.returncode}):\n{tail(proc.stderr)}"
    return run["log"]


def test_train_run_loss_decreases(train_run):
    log = _ok(train_run)
    vals = [(int(s), float(l), float(b)) for s, l, b in VAL_LINE.findall(log)]
    assert len(vals) >= 2, log[-2000:]
    steps = [s for s, _, _ in vals]
    assert steps == sorted(steps) and steps[-1] == 30
    first, last = vals[0][1], vals[-1][1]
    assert last < first - 0.3, vals
    assert last < math.log(1024) - 0.8, vals
    # val_loss / val_bpb = ln2 * bytes / tokens, the same for every evaluation of the same tokens
    m = re.search(r"final_roundtrip val_loss:\S+ val_bpb:\S+ tokens:(\d+) bytes:(\d+)", log)
    assert m, log[-2000:]
    ratio = math.log(2.0) * int(m.group(2)) / int(m.group(1))
    for _, loss, bpb in vals:
        assert abs(loss / bpb - ratio) / ratio < 1e-5


def test_train_run_final_lines_and_sizes(train_run):
    log = _ok(train_run)
    lines = log.strip().splitlines()
    assert re.match(r"^final val_loss:[0-9.]+ val_bpb:[0-9.]+ source:\w+$", lines[-4]), lines[-4:]
    mm = re.match(r"^bytes_model:(\d+)$", lines[-3])
    mc = re.match(r"^bytes_code:(\d+)$", lines[-2])
    mt = re.match(r"^bytes_total:(\d+)$", lines[-1])
    assert mm and mc and mt, lines[-4:]
    model_b, code_b, total_b = int(mm.group(1)), int(mc.group(1)), int(mt.group(1))
    assert total_b == model_b + code_b
    assert code_b == train_run["script_bytes"] == len(open(SCRIPT, "rb").read())
    assert train_run["artifact"].is_file()
    assert train_run["artifact"].stat().st_size == model_b
    assert total_b <= 16_000_000


def test_train_run_artifact_reproduces_roundtrip_score(train_run, tiny_hparams):
    """The artifact on disk, loaded here, scores what the run reported for it."""
    log = _ok(train_run)
    m = re.search(r"final_roundtrip val_loss:([0-9.]+) val_bpb:([0-9.]+)", log)
    assert m
    h = tiny_hparams
    model = train_gpt.model_from_artifact(train_run["artifact"].read_bytes(), h, CPU)
    scores = train_gpt.eval_plain(model, val_tokens_for(h), h.train_seq_len, h.val_batch_seqs, luts_for(h))
    assert abs(scores.val_loss - float(m.group(1))) < 2e-6
    assert abs(scores.val_bpb - float(m.group(2))) < 2e-6


# ----------------------------------------------------------------------------------------------
# 6. export round trip
# ----------------------------------------------------------------------------------------------


def _calibration_batches(h, n_seqs: int = 8, per_batch: int = 4):
    loader = train_gpt.DistributedTokenLoader(os.path.join(h.data_path, "fineweb_train_*.bin"), h.vocab_size, 0, 1,
                                              CPU, n_seqs * h.train_seq_len, h.train_seq_len, prefetch=0)
    x, _ = loader.next_batch()
    return [(x[i:i + per_batch], None) for i in range(0, x.size(0), per_batch)]


def _decompressed(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(blob[1:]) if blob[:1] == b"Z" else lzma.decompress(blob[1:])


def _header(payload: bytes) -> dict:
    n = int.from_bytes(payload[6:10], "little")
    return json.loads(payload[10:10 + n])


@pytest.mark.parametrize("compressor", ["zstd", "lzma"])
@pytest.mark.parametrize("bitpack", [False, True])
def test_export_roundtrip(tiny_hparams, compressor, bitpack):
    h = dataclasses.replace(tiny_hparams, compressor=compressor, bitpack=bitpack)
    model = perturbed_model(h, seed=3)
    names = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2
             and train_gpt.tensor_bits(n, h) and p.numel() > h.passthrough_max_numel}
    hessians = train_gpt.collect_hessians(model, _calibration_batches(h), names, 1)
    assert set(hessians) == names and len(names) == 6 * h.num_layers
    for name, H in hessians.items():
        assert H.shape[0] == H.shape[1] and torch.allclose(H, H.T)
    qstate = train_gpt.quantize_state(model, h, hessians)
    quantized = {n for n, e in qstate.items() if "q" in e}
    assert names <= quantized and "tok_emb.weight" in quantized
    assert any("data" in e for e in qstate.values())  # passthrough tensors exist too

    deq = train_gpt.dequantize_state(qstate)
    orig = model.state_dict()
    for name in quantized:  # non-trivial: every quantized tensor moved, but stays close
        assert not torch.equal(deq[name], orig[name]), name
        err = (deq[name] - orig[name]).norm() / orig[name].norm()
        assert err < 0.15, (name, float(err))
        assert int(qstate[name]["q"].abs().max()) <= 2 ** (qstate[name]["bits"] - 1) - 1

    config = train_gpt.model_config(h, looping=False)
    blob = train_gpt.serialize_artifact(qstate, config, h)
    assert blob[:1] == (b"Z" if compressor == "zstd" else b"L")
    payload = _decompressed(blob)
    assert payload.startswith(train_gpt.ARTIFACT_MAGIC)
    for t in _header(payload)["tensors"]:
        if "bits" in t:
            assert t["packed"] is bitpack
            numel = math.prod(t["shape"])
            assert t["code_bytes"] == (math.ceil(numel * t["bits"] / 8) if bitpack else numel)

    config2, qstate2 = train_gpt.deserialize_artifact(blob)
    assert config2 == json.loads(json.dumps(config))
    assert sorted(qstate2) == sorted(qstate)
    deq2 = train_gpt.dequantize_state(qstate2)
    for name in deq:
        assert deq2[name].dtype == deq[name].dtype and torch.equal(deq2[name], deq[name]), name

    tokens, luts = val_tokens_for(h), luts_for(h)
    from_disk = train_gpt.model_from_artifact(blob, h, CPU)
    in_memory = train_gpt.GPT(h)
    in_memory.load_state_dict(deq, strict=True)
    in_memory.eval()
    a = train_gpt.eval_plain(from_disk, tokens, h.train_seq_len, h.val_batch_seqs, luts)
    b = train_gpt.eval_plain(in_memory, tokens, h.train_seq_len, h.val_batch_seqs, luts)
    assert rel_diff(a.val_loss, b.val_loss) < 1e-6
    assert rel_diff(a.val_bpb, b.val_bpb) < 1e-6
    full = train_gpt.eval_plain(model, tokens, h.train_seq_len, h.val_batch_seqs, luts)
    assert abs(a.val_loss - full.val_loss) < 0.05  # the quantization gap is small


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_bits_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for count in (1, 7, 37, 1000):
        values = rng.integers(0, 2 ** bits, count).astype(np.uint8)
        packed = train_gpt.pack_bits(values, bits)
        assert len(packed) == math.ceil(count * bits / 8)
        np.testing.assert_array_equal(train_gpt.unpack_bits(packed, bits, count), values)


@pytest.fixture(scope="module")
def small_artifacts(sample_data):
    env = {**TINY_KNOBS, "DATA_PATH": str(sample_data), "TOKENIZER_PATH": str(sample_data / "tokenizer.model")}
    out = {}
    for comp in ("zstd", "lzma"):
        h = train_gpt.Hyperparameters.from_env({**env, "COMPRESSOR": comp})
        qstate = train_gpt.quantize_state(perturbed_model(h, seed=5), h)
        out[comp] = (h, train_gpt.serialize_artifact(qstate, train_gpt.model_config(h, False), h))
    return out


def _recompress(payload: bytes, comp: str) -> bytes:
    if comp == "zstd":
        return b"Z" + zstandard.ZstdCompressor(level=3).compress(payload)
    return b"L" + lzma.compress(payload)


@pytest.mark.parametrize("comp", ["zstd", "lzma"])
def test_corrupt_artifact_payload(small_artifacts, comp):
    _, blob = small_artifacts[comp]
    train_gpt.deserialize_artifact(blob)  # the intact one loads
    payload = _decompressed(blob)
    assert train_gpt.deserialize_artifact(_recompress(payload, comp))[1].keys() == \
        train_gpt.deserialize_artifact(blob)[1].keys()
    with pytest.raises(ValueError, match="tag"):
        train_gpt.deserialize_artifact(b"X" + blob[1:])
    with pytest.raises(ValueError, match="tag"):
        train_gpt.deserialize_artifact(b"")
    with pytest.raises(ValueError, match="magic"):
        train_gpt.deserialize_artifact(_recompress(b"PGOLF0" + payload[6:], comp))
    with pytest.raises(ValueError, match="trailing"):
        train_gpt.deserialize_artifact(_recompress(payload + b"\x00\x01\x02", comp))


@pytest.mark.parametrize("comp", ["zstd", "lzma"])
def test_corrupt_artifact_container(small_artifacts, comp):
    """Damage to the compressed file itself must also be reported as a ValueError, not accepted or leaked as a
    compressor-specific exception."""
    _, blob = small_artifacts[comp]
    problems = []
    for what, damaged in (("4 trailing bytes after the compressed stream", blob + b"\x00\x00\x00\x00"),
                          ("truncated compressed stream", blob[:-16])):
        try:
            train_gpt.deserialize_artifact(damaged)
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{what}: raised {type(exc).__module__}.{type(exc).__name__}: {exc}")
        else:
            problems.append(f"{what}: accepted silently")
    assert not problems, "; ".join(problems)


# ----------------------------------------------------------------------------------------------
# 7. artifact size budget
# ----------------------------------------------------------------------------------------------


def test_check_budget(tiny_hparams):
    code = train_gpt.code_bytes()
    assert code == len(SCRIPT.read_bytes())
    h = dataclasses.replace(tiny_hparams, max_artifact_bytes=code + 1000)
    assert train_gpt.check_budget(999, h) == code + 999
    assert train_gpt.check_budget(1000, h) == code + 1000  # exactly at the limit is allowed
    with pytest.raises(train_gpt.ArtifactTooLarge, match="exceeds"):
        train_gpt.check_budget(1001, h)
    with pytest.raises(train_gpt.ArtifactTooLarge):
        train_gpt.check_budget(0, dataclasses.replace(h, max_artifact_bytes=code - 1))


def test_oversize_artifact_fails_the_run(train_run, tmp_path):
    """EVAL_ONLY on the artifact of the training run, with a budget it cannot meet: the run must fail."""
    _ok(train_run)
    artifact = train_run["artifact"]
    before = artifact.read_bytes()
    env = {**train_run["env"], "EVAL_ONLY": "1", "ARTIFACT_PATH": str(artifact), "MAX_ARTIFACT_BYTES": "1000",
           "LOG_DIR": str(tmp_path / "logs")}
    proc = run_script(env, tmp_path)
    assert proc.returncode != 0
    assert "exceeds" in proc.stderr and "ArtifactTooLarge" in proc.stderr, tail(proc.stderr)
    assert f"eval_only: loaded {artifact} ({len(before)} bytes)" in proc.stdout  # it failed on the budget
    assert "final val_loss" not in proc.stdout
    assert artifact.read_bytes() == before
