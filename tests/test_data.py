"""Training data paths: document-packed rows (TRAIN_DOC_ROWS=1) and what main() feeds calibration.

The row checks run on synthetic shards whose tokens spell their own stream position (a BOS opens each document),
so every piece of every row can be traced back to the exact tokens, targets and document it came from.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import TINY_KNOBS

CPU = torch.device("cpu")
BOS = tg.BOS_ID
T = 32  # row length of the synthetic checks
POS0 = 2  # token id of stream position p (not a document start): POS0 + p


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def doc_lengths(rng, total: int) -> list[int]:
    """Short documents (fill row tails), mid-sized ones and documents several rows long."""
    out = []
    while sum(out) < total:
        kind = rng.random()
        out.append(int(rng.integers(2, 12) if kind < 0.45 else rng.integers(12, T) if kind < 0.8
                       else rng.integers(T, 5 * T)))
    return out


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """Three shards of position-coded tokens; documents run across the shard boundaries (as in real shards)."""
    rng = np.random.default_rng(0)
    lengths = doc_lengths(rng, 3 * 20_000)
    stream = np.concatenate([np.r_[BOS, POS0 + np.arange(s + 1, s + n)] for s, n in
                             zip(np.cumsum([0] + lengths[:-1]), lengths)]).astype(np.int64)
    out = tmp_path_factory.mktemp("coded")
    cuts = [0, 19_999, 40_013, len(stream)]  # not at document starts
    for i in range(3):
        write_shard(out / f"fineweb_train_{i:06d}.bin", stream[cuts[i]:cuts[i + 1]])
    return {"pattern": str(out / "fineweb_train_*.bin"), "stream": stream, "cuts": cuts}


def expected_pieces(stream, cuts) -> list[tuple[int, int, bool]]:
    """(start, length, starts a document) of every piece the docs loader should place in one epoch, in stream order:
    each shard's documents from its first BOS to its last, cut every T tokens from the document's BOS."""
    pieces = []
    for lo, hi in zip(cuts, cuts[1:]):
        bos = [lo + i for i in np.flatnonzero(stream[lo:hi] == BOS)]
        for a, b in zip(bos, bos[1:]):
            pieces += [(s, min(T, b - s), s == a) for s in range(a, b, T)]
    return pieces


def loader(coded, rank=0, world=1, rows_per_rank=4, lookahead=None, docs=True, prefetch=False):
    ld = tg.DistributedTokenLoader(coded["pattern"], 65536, rank, world, CPU, rows_per_rank * world * T, T,
                                   prefetch=prefetch, docs=docs)
    if lookahead is not None:
        ld._row = functools.partial(tg.DistributedTokenLoader._row, ld, lookahead=lookahead)
    return ld


def decode_rows(x: torch.Tensor, y: torch.Tensor, coded) -> tuple[list[int], list[tuple[int, int]]]:
    """Check every row against the stream; return the starts of the whole pieces placed and the (start, length)
    of the tail fillers (document starts cut short at a row's end, to be placed whole elsewhere).

    A row is split at its BOS tokens. Each part must be the exact stream tokens and targets of one piece: starting
    at a document's BOS, or, only at the row's start, exactly k*T tokens after it (a long document's continuation);
    a part never runs past its piece's end (no document boundary crossed), and is shorter than its piece only as the
    row's last part, starting at a BOS."""
    stream, cuts = coded["stream"], coded["cuts"]
    bos_all = np.r_[np.flatnonzero(stream == BOS), len(stream)]
    placed, fillers = [], []
    assert x.shape == y.shape and x.shape[1] == T
    for xr, yr in zip(x.numpy(), y.numpy()):
        bounds = sorted({0, *np.flatnonzero(xr == BOS).tolist(), T})
        for j, (u, v) in enumerate(zip(bounds, bounds[1:])):
            p = int(yr[u]) - POS0 - 1 if xr[u] == BOS else int(xr[u]) - POS0  # targets are real next tokens
            n = v - u
            assert np.array_equal(xr[u:v], stream[p:p + n]) and np.array_equal(yr[u:v], stream[p + 1:p + n + 1]), \
                f"row part {u}:{v} is not the stream's tokens and targets at {p}"
            doc_start, doc_end = (int(b) for b in bos_all[np.searchsorted(bos_all, p, side="right") - 1:][:2])
            assert (p - doc_start) % T == 0, f"part at {p} starts {p - doc_start} tokens into its document"
            assert xr[u] == BOS or u == 0, f"a continuation piece (at {p}) inside a row, after position 0"
            shard_end = min(c for c in cuts if c > doc_start)
            assert doc_end <= shard_end, f"the document at {doc_start} runs across a shard end: it is not used"
            piece_len = min(T, doc_end - p)
            assert n <= piece_len, f"part at {p} runs {n - piece_len} tokens past its document piece"
            if n < piece_len:
                assert v == T and xr[u] == BOS, f"a piece at {p} cut short ({n} of {piece_len}) inside a row"
                fillers.append((p, n))
            else:
                placed.append(p)
    return placed, fillers


def test_doc_rows_respect_documents_and_cover_the_stream(coded):
    """Rows start at a BOS or at a long document's k*T piece boundary, never cross a document boundary except
    inside a document longer than a row, keep true targets; the pieces placed plus those still waiting are exactly
    the epoch's pieces so far, each once (nothing dropped or repeated); fillers are prefixes of waiting or placed
    document starts."""
    expected = expected_pieces(coded["stream"], coded["cuts"])
    for lookahead in (8, 1024):
        ld = loader(coded, lookahead=lookahead)
        placed, fillers = [], []
        calls = 0
        while len(placed) + len(ld.waiting) + 4 * T < len(expected):  # a call places at most 4 * T pieces: one epoch
            p, f = decode_rows(*ld.next_batch(), coded)
            placed, fillers, calls = placed + p, fillers + f, calls + 1
        assert calls >= 3
        waiting = [int(w[1]) - POS0 - 1 if w[0] == BOS else int(w[0]) - POS0 for w in ld.waiting.values()]
        seen = placed + waiting
        assert len(seen) == len(set(seen)), "a piece was placed twice"
        assert sorted(seen) == [s for s, _, _ in expected[:len(seen)]], "pieces dropped or out of the stream"
        heads = {s: n for s, n, head in expected if head}
        assert all(p in heads and n < heads[p] for p, n in fillers)
        dup = sum(n for _, n in fillers) / (calls * 4 * T)
        assert dup < (0.10 if lookahead == 8 else 0.02), dup  # the tails a prefix fills: few with a long lookahead
        assert len(set(seen) & {s for s, _, h in expected if not h}) > 10  # long documents were exercised


def test_doc_rows_check_fails_on_the_stream_loader(coded):
    """The stream loader cuts documents at row boundaries: the check above rejects its rows."""
    with pytest.raises(AssertionError, match="starts .* tokens into its document|runs .* past"):
        for _ in range(4):
            decode_rows(*loader(coded, docs=False).next_batch(), coded)


def test_doc_rows_world_size_independent_and_disjoint(coded):
    """Rank r's k-th micro-batch with W ranks is micro-batch W*k + r of one process: every rank reads its own
    rows of one global plan, so whole pieces never repeat across ranks."""
    ld1 = loader(coded, 0, 1, lookahead=64)
    single = [ld1.next_batch() for _ in range(8)]
    for world in (2, 4):
        rank_pieces = []
        for r in range(world):
            ld = loader(coded, r, world, lookahead=64)
            mine = [ld.next_batch() for _ in range(8 // world)]
            for k, (x, y) in enumerate(mine):
                sx, sy = single[world * k + r]
                assert torch.equal(x, sx) and torch.equal(y, sy), (world, r, k)
            rank_pieces.append({p for x, y in mine for p in decode_rows(x, y, coded)[0]})
        assert all(not (a & b) for i, a in enumerate(rank_pieces) for b in rank_pieces[i + 1:])


def test_doc_rows_deterministic_with_the_prefetch_thread(coded):
    plain, threaded = loader(coded, 1, 2), loader(coded, 1, 2, prefetch=True)
    try:
        for _ in range(6):
            (a, b), (c, d) = plain.next_batch(), threaded.next_batch()
            assert torch.equal(a, c) and torch.equal(b, d)
    finally:
        threaded.close()


def test_doc_rows_wrap_around_the_data(coded):
    """Past the last shard the stream starts again at the first shard's first BOS; rows stay valid."""
    ld = loader(coded, rows_per_rank=32, lookahead=16)
    total = 0
    for _ in range(len(coded["stream"]) // (32 * T) + 3):
        placed, _ = decode_rows(*ld.next_batch(), coded)
        total += len(placed)
    assert total > len(expected_pieces(coded["stream"], coded["cuts"]))


@pytest.mark.parametrize("kind", ["truncated", "no_bos"])
def test_doc_rows_bad_shard_raises_through_the_prefetch_thread(tmp_path, kind):
    tokens = np.r_[BOS, np.arange(2, 300), BOS, np.arange(2, 100)] if kind == "truncated" else np.arange(2, 500)
    write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    if kind == "truncated":
        with open(tmp_path / "fineweb_train_000000.bin", "r+b") as f:
            f.truncate(os.path.getsize(tmp_path / "fineweb_train_000000.bin") - 10)
    ld = tg.DistributedTokenLoader(str(tmp_path / "fineweb_train_*.bin"), 1024, 0, 1, CPU, 4 * T, T, docs=True)
    try:
        with pytest.raises(ValueError, match="declares|no documents"):
            ld.next_batch()
    finally:
        ld.close()


def test_doc_rows_on_the_sample_shards(sample_data):
    """Real tokenized documents: every row starts with a BOS or continues a document longer than a row."""
    ld = tg.DistributedTokenLoader(str(sample_data / "fineweb_train_*.bin"), 1024, 0, 1, CPU, 16 * 64, 64, docs=True)
    first = []
    try:
        for _ in range(4):
            x, y = ld.next_batch()
            first += x[:, 0].tolist()
            assert x.shape == y.shape == (16, 64)
            for xr, yr in zip(x, y):  # inside each piece the target is the next input token
                starts = sorted({0, *torch.nonzero(xr == BOS).flatten().tolist(), 64})
                for u, v in zip(starts, starts[1:]):
                    assert torch.equal(yr[u:v - 1], xr[u + 1:v])
        assert BOS in first  # (the others continue documents longer than a row)
    finally:
        ld.close()



# ---- GPTQ calibration: GPTQ_CALIB_TOKENS in seeded windows over all training shards, TF32 off ----

@pytest.fixture(scope="module")
def three_shards(sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("three_shards")
    tokens = tg.load_shard(str(sample_data / "fineweb_train_000000.bin"))
    for i, part in enumerate(np.array_split(tokens, 3)):
        write_shard(out / f"fineweb_train_{i:06d}.bin", part)
    return out


def calibration_windows(h, monkeypatch, rank=0, world=1, tf32=None):
    """(shard name, start, count) of every read calibrate() makes, and the batches collect_hessians gets."""
    reads, batches, real_load = [], [], tg.load_shard

    def spy(path, *window):
        reads.append((os.path.basename(path), *window))
        return real_load(path, *window)

    def hessians(model, b, names, rt):
        batches.extend(b)
        if tf32 is not None:
            tf32.append(torch.backends.cuda.matmul.allow_tf32)
        return {}

    with monkeypatch.context() as m:
        m.setattr(tg, "load_shard", spy)
        m.setattr(tg, "collect_hessians", hessians)
        m.setattr(tg.dist, "all_reduce", lambda *a, **k: None)
        lines = []
        tg.calibrate(h, tg.GPT(h), tg.Runtime(CPU, rank, world), lines.append, 0.0)
    return reads, batches, lines


def test_calibration_windows_spread_over_all_training_shards(three_shards, monkeypatch):
    """ceil(GPTQ_CALIB_TOKENS / TRAIN_SEQ_LEN) whole windows, none twice, from every shard, the same for a seed and
    different for another; 2 ranks read disjoint halves of the same set; what the Hessians see is what was read."""
    env = {**TINY_KNOBS, "DATA_PATH": str(three_shards), "GPTQ": "1", "GPTQ_CALIB_TOKENS": str(40 * 64 - 10)}
    h = tg.Hyperparameters.from_env(env)
    reads, batches, lines = calibration_windows(h, monkeypatch)
    sizes = {p.name: (os.path.getsize(p) - 4 * tg.SHARD_HEADER_INTS) // 2 for p in three_shards.iterdir()}
    assert len(reads) == len(set(reads)) == 40
    assert {name for name, _, _ in reads} == set(sizes)
    assert all(count == 65 and start % 64 == 0 and start + 65 <= sizes[name] for name, start, count in reads)
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (40, 64) and torch.equal(torch.cat([b[1] for b in batches])[:, :-1], x[:, 1:])
    assert lines[0].startswith("calibration: 2560 training tokens (2560 per rank, 3 shards), 0 Hessians in ")
    assert "tokens/s per rank, reserve:12s" in lines[0]
    assert calibration_windows(h, monkeypatch)[0] == reads
    assert set(calibration_windows(tg.Hyperparameters.from_env({**env, "SEED": "7"}), monkeypatch)[0]) != set(reads)
    halves = [calibration_windows(h, monkeypatch, rank, 2)[0] for rank in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(reads)


def test_calibration_runs_with_tf32_off_and_restores_it(three_shards, monkeypatch):
    h = tg.Hyperparameters.from_env({**TINY_KNOBS, "DATA_PATH": str(three_shards), "GPTQ": "1"})
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        inside = []
        calibration_windows(h, monkeypatch, tf32=inside)
        assert inside == [False] and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_old_calibration_knob_names_its_replacement():
    with pytest.raises(tg.KnobError, match="GPTQ_CALIB_SEQS was removed: GPTQ_CALIB_TOKENS"):
        tg.Hyperparameters.from_env({"GPTQ_CALIB_SEQS": "16"})
    assert tg.Hyperparameters.from_env({"PRESET": "frontier"}).gptq_calib_tokens == 16 * 48 * 2048
    assert tg.Hyperparameters.from_env({"PRESET": "frontier"}).train_doc_rows

# ---- rule audit: main() feeds GPTQ calibration only training tokens ----

SPLIT_ID = 512  # training shards hold token ids < SPLIT_ID (and BOS), validation shards ids >= SPLIT_ID (and BOS)


@pytest.fixture(scope="module")
def split_vocab_data(sample_data, tmp_path_factory):
    """The sample shards with their ids moved apart: no id but BOS occurs in both splits, so any token a
    function receives says which split it came from."""
    out = tmp_path_factory.mktemp("split_vocab")
    for path in sorted(sample_data.glob("fineweb_*.bin")):
        t = tg.load_shard(str(path)).astype(np.int64)
        low = np.where(t >= SPLIT_ID, 2 + t % (SPLIT_ID - 2), t)
        t = np.where(t == BOS, BOS, SPLIT_ID + t % (1024 - SPLIT_ID)) if "_val_" in path.name else low
        write_shard(out / path.name, t)
    (out / "tokenizer.model").write_bytes((sample_data / "tokenizer.model").read_bytes())
    return out


def test_main_calibrates_on_training_tokens_only(split_vocab_data, tmp_path, monkeypatch):
    """Runs main() in process (the tiny model, 2 steps, document-packed rows) with GPTQ on the embedding,
    recording every token id that collect_hessians and the training loader receive: all must be training ids. A
    main() that hands either of them validation tokens fails here."""
    for key in [k for k in os.environ if k in {f.name.upper() for f in tg.fields(tg.Hyperparameters)}
                or k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")]:
        monkeypatch.delenv(key)
    knobs = {**TINY_KNOBS, "DATA_PATH": str(split_vocab_data), "TOKENIZER_PATH": str(split_vocab_data / "tokenizer.model"),
             "LOG_DIR": str(tmp_path / "logs"), "ARTIFACT_PATH": str(tmp_path / "model.ptz"), "RUN_ID": "audit",
             "ITERATIONS": "2", "GPTQ": "1", "GPTQ_EMBED": "1", "TTT": "0", "SLIDING_EVAL": "0",
             "TRAIN_DOC_ROWS": "1", "GPTQ_CALIB_TOKENS": "1024"}
    for key, value in knobs.items():
        monkeypatch.setenv(key, value)
    seen = {"hessians": [], "training": []}

    def recording(name, fn):
        def wrapper(model, batches, *args):
            seen[name] += [t for x, y in batches for t in (x, y)]
            return fn(model, batches, *args)
        return wrapper

    monkeypatch.setattr(tg, "collect_hessians", recording("hessians", tg.collect_hessians))
    next_batch = tg.DistributedTokenLoader.next_batch
    monkeypatch.setattr(tg.DistributedTokenLoader, "next_batch",
                        lambda self: seen["training"].extend(b := next_batch(self)) or b)
    tg.main()
    log = (tmp_path / "logs" / "audit.txt").read_text()
    assert "calibration: 1024 training tokens" in log and "final_roundtrip" in log
    val = tg.load_validation_tokens(str(split_vocab_data / "fineweb_val_*.bin"), 64, 1024)
    assert int(val.max()) >= SPLIT_ID  # the check below can see a validation token
    for name, tensors in seen.items():
        ids = torch.cat([t.flatten() for t in tensors])
        assert ids.numel() > 0, name
        assert int(ids.max()) < SPLIT_ID, f"{name} received validation token ids (>= {SPLIT_ID})"
