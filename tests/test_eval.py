"""Evaluation: sliding-window tiling, eval_sliding against a brute-force reference, the rank split, the
legality of score-first TTT, and the Scores arithmetic."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from conftest import TINY_KNOBS

N_TARGETS = 1990  # not a multiple of the stride, the window or the TTT chunk: the tail window is padded




@pytest.fixture(scope="module")
def ev_setup(sample_data):
    h = tg.Hyperparameters.from_env({**TINY_KNOBS, "DATA_PATH": str(sample_data),
                                      "TOKENIZER_PATH": str(sample_data / "tokenizer.model")})
    h = dataclasses.replace(h, ortho_init=False)
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    luts = tg.build_byte_luts(sp, h.vocab_size)
    val = tg.load_validation_tokens(str(sample_data / "fineweb_val_*.bin"), h.train_seq_len, h.vocab_size)
    assert val.numel() > N_TARGETS + 1
    return h, sp, luts, val


def random_gpt(h, seed=0) -> tg.GPT:
    """A tiny GPT whose every block does something (the zero-initialised projections are redrawn), so that
    context really changes the predictions."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tg.CastedLinear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
        model.tok_emb.weight.normal_(0.0, 0.3)
        if model.bigram is not None:
            model.bigram.table.weight.normal_(0.0, 0.5)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def model(ev_setup):
    return random_gpt(ev_setup[0])


def window_nll(model, tokens, start, lo, hi):
    """Unpadded reference: run the model on exactly the window's tokens, return the scored part."""
    span = tokens[start:min(start + model.h.eval_seq_len, tokens.numel() - 1) + 1]
    x, y = span[:-1][None], span[1:][None]
    with torch.no_grad():
        nll = model(x, y, reduction="none")[0]
    return nll[lo - start:hi - start], x[0, lo - start:hi - start], y[0, lo - start:hi - start]


# ----------------------------------------------------------------------------------------------
# 1. sliding_windows
# ----------------------------------------------------------------------------------------------


def combos():
    for seq_len in (1, 2, 7, 16, 64):
        for stride in sorted({1, max(1, seq_len // 2), max(1, seq_len - 1), seq_len, 3 if seq_len >= 3 else 1}):
            for n in sorted({1, 2, 5, seq_len - 1, seq_len, seq_len + 1, 2 * seq_len + 3, 100, 129, 1001} - {0}):
                yield n, seq_len, stride


def test_sliding_windows_tile_every_target_once():
    checked = 0
    for n, seq_len, stride in combos():
        windows = tg.sliding_windows(n, seq_len, stride)
        assert windows, (n, seq_len, stride)
        covered = torch.zeros(n, dtype=torch.int64)
        expect_from = 0
        for k, (start, lo, hi) in enumerate(windows):
            assert lo == expect_from, "gap or overlap between consecutive scored ranges"
            assert lo < hi <= n
            assert 0 <= start <= lo and hi <= start + seq_len
            assert start == k * stride
            if k > 0:  # the least-context target of the range is its first one
                assert lo - start + 1 >= seq_len - stride + 1
            covered[lo:hi] += 1
            expect_from = hi
        assert expect_from == n and bool((covered == 1).all()), (n, seq_len, stride)
        checked += 1
    assert checked > 150
    assert tg.sliding_windows(0, 8, 4) == []


def test_sliding_windows_examples():
    assert tg.sliding_windows(10, 4, 2) == [(0, 0, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    assert tg.sliding_windows(5, 8, 4) == [(0, 0, 5)]  # shorter than one window
    assert tg.sliding_windows(9, 4, 4) == [(0, 0, 4), (4, 4, 8), (8, 8, 9)]  # stride == seq_len: plain


# ----------------------------------------------------------------------------------------------
# 2. eval_sliding against brute force; stride == seq_len is eval_plain; padding is harmless
# ----------------------------------------------------------------------------------------------


def test_eval_sliding_matches_brute_force(ev_setup, model):
    h, _, luts, val = ev_setup
    tokens = val[:N_TARGETS + 1]
    seq_len, stride = h.eval_seq_len, h.eval_stride
    got = tg.eval_sliding(model, tokens, seq_len, stride, 16, luts)
    nll_sum, count, nbytes = 0.0, 0, 0
    for start, lo, hi in tg.sliding_windows(N_TARGETS, seq_len, stride):
        nll, x, y = window_nll(model, tokens, start, lo, hi)
        assert torch.equal(x, tokens[lo:hi]) and torch.equal(y, tokens[lo + 1:hi + 1])
        nll_sum += nll.double().sum().item()
        count += nll.numel()
        nbytes += int(tg.target_bytes(x, y, luts).sum())
    assert int(got.sums[1]) == count == N_TARGETS
    assert int(got.sums[2]) == nbytes
    ref_loss, ref_bpb = nll_sum / count, nll_sum / (math.log(2) * nbytes)
    assert got.val_loss == pytest.approx(ref_loss, rel=1e-6)
    assert got.val_bpb == pytest.approx(ref_bpb, rel=1e-6)
    # the model really uses context: scoring without the overlap (stride == seq_len) gives another number
    plain_like = tg.eval_sliding(model, tokens, seq_len, seq_len, 16, luts)
    assert abs(plain_like.val_loss - got.val_loss) > 1e-4


def test_stride_equal_seq_len_is_eval_plain(ev_setup, model):
    h, _, luts, val = ev_setup
    seq_len = h.eval_seq_len
    n = (N_TARGETS // seq_len) * seq_len
    tokens = val[:n + 1]
    plain = tg.eval_plain(model, tokens, seq_len, 8, luts)
    sliding = tg.eval_sliding(model, tokens, seq_len, seq_len, 8, luts)
    assert torch.equal(plain.sums[1:], sliding.sums[1:]) and int(plain.sums[1]) == n
    assert torch.allclose(plain.sums, sliding.sums, rtol=1e-12, atol=0)
    assert plain.val_bpb == pytest.approx(sliding.val_bpb, rel=1e-12)


@pytest.mark.parametrize("n_targets", [N_TARGETS, 40])
def test_tail_padding_does_not_change_scores(ev_setup, model, n_targets):
    h, _, luts, val = ev_setup
    tokens = val[:n_targets + 1]
    seq_len = h.eval_seq_len
    windows = tg.sliding_windows(n_targets, seq_len, h.eval_stride)
    tail = [w for w in windows if w[0] + seq_len > n_targets]
    assert tail, "expected at least one short (padded) window"
    # batch the short windows together with full ones, so they really are right-padded in a batch
    batch = windows[-3:] if len(windows) >= 3 else windows
    padded = tg.Scores(luts[0].device)
    tg.score_windows(model, tokens, batch, seq_len, 16, luts, padded)
    ref = tg.Scores(luts[0].device)
    for start, lo, hi in batch:
        nll, x, y = window_nll(model, tokens, start, lo, hi)
        ref.add(nll, x, y, luts)
    assert torch.equal(padded.sums[1:], ref.sums[1:])
    assert padded.sums[0].item() == pytest.approx(ref.sums[0].item(), rel=1e-6)
    # the padding itself: whatever fills the pad, the positions before it get the same logits (causality)
    start, lo, hi = tail[-1]
    span = tokens[start:]
    k = span.numel() - 1
    assert k < seq_len
    x = torch.randint(0, h.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    x[:, :k] = span[:-1]
    assert not torch.equal(x[0, k:], x[1, k:])
    with torch.no_grad():
        logits = model.logits(x)
    assert torch.allclose(logits[0, :k], logits[1, :k], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 3. the rank split
# ----------------------------------------------------------------------------------------------


def test_rank_slice_partitions():
    for n in range(0, 60):
        for world in range(1, 6):
            parts = [tg.rank_slice(n, r, world) for r in range(world)]
            assert list(itertools.chain.from_iterable(parts)) == list(range(n))
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1


@pytest.fixture
def no_allreduce(monkeypatch):
    calls = []

    def fake_all_reduce(tensor, *args, **kwargs):  # single process: each rank keeps its own partial sums
        calls.append(tensor.clone())

    monkeypatch.setattr(tg.dist, "all_reduce", fake_all_reduce)
    return calls


@pytest.mark.parametrize("batch_seqs", [1, 16])
def test_rank_split_sums_equal_single_process(ev_setup, model, no_allreduce, batch_seqs):
    h, _, luts, val = ev_setup
    tokens = val[:N_TARGETS + 1]
    one = tg.eval_sliding(model, tokens, h.eval_seq_len, h.eval_stride, batch_seqs, luts)
    one_plain = tg.eval_plain(model, tokens, h.train_seq_len, batch_seqs, luts)
    assert not no_allreduce
    for world in (2, 3, 5):
        parts = [tg.eval_sliding(model, tokens, h.eval_seq_len, h.eval_stride, batch_seqs, luts, r, world)
                 for r in range(world)]
        assert len(no_allreduce) == world  # reduce() is asked for when world > 1
        no_allreduce.clear()
        total = torch.stack([p.sums for p in parts]).sum(0)
        assert torch.equal(total[1:], one.sums[1:])  # tokens and bytes: exactly
        if batch_seqs == 1:  # every window computed alone: identical NLLs, only fp64 summation order differs
            assert total[0].item() == pytest.approx(one.sums[0].item(), rel=1e-13)
        else:
            assert total[0].item() == pytest.approx(one.sums[0].item(), rel=1e-6)
        plain_parts = [tg.eval_plain(model, tokens, h.train_seq_len, batch_seqs, luts, r, world).sums
                       for r in range(world)]
        no_allreduce.clear()
        total = torch.stack(plain_parts).sum(0)
        assert torch.equal(total[1:], one_plain.sums[1:])
        assert total[0].item() == pytest.approx(one_plain.sums[0].item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 4. score-first TTT
# ----------------------------------------------------------------------------------------------

TTT_N = 1200  # 5 chunks of 256 targets, the last one short


@pytest.fixture(scope="module")
def ttt_setup(ev_setup):
    h, _, luts, val = ev_setup
    h = dataclasses.replace(h, ttt_chunk_tokens=256, eval_seq_len=64, eval_stride=16, ttt_epochs=1, ttt_lr=0.05,
                            ttt_batch_seqs=2, val_batch_seqs=16, ttt_freeze_blocks=0)
    base = random_gpt(h, seed=3)
    tokens = val[:TTT_N + 1].clone()
    events = []
    m = copy.deepcopy(base)
    total, per_chunk = tg.eval_ttt(m, tokens, h, luts, events=events)
    return h, luts, base, tokens, total, per_chunk, events, m


def no_ttt_chunk_sums(h, luts, model, tokens):
    n = tokens.numel() - 1
    windows = tg.sliding_windows(n, h.eval_seq_len, h.eval_stride)
    out = []
    for c in range((n + h.ttt_chunk_tokens - 1) // h.ttt_chunk_tokens):
        s = tg.Scores(luts[0].device)
        mine = [w for w in windows if w[1] // h.ttt_chunk_tokens == c]
        tg.score_windows(model, tokens, mine, h.eval_seq_len, h.val_batch_seqs, luts, s)
        out.append(s.sums)
    return out


def test_ttt_scores_every_target_once(ttt_setup):
    h, luts, base, tokens, total, per_chunk, events, _ = ttt_setup
    chunk = h.ttt_chunk_tokens
    assert len(per_chunk) == math.ceil(TTT_N / chunk) == 5
    counts = [int(s[1]) for s in per_chunk]
    assert counts == [min(chunk, TTT_N - c * chunk) for c in range(5)]
    assert sum(counts) == TTT_N == int(total.sums[1])
    assert torch.equal(total.sums, torch.stack(per_chunk).sum(0))
    # the bytes are those of the scored targets, whatever the weights
    ref = tg.eval_sliding(base, tokens, h.eval_seq_len, h.eval_stride, 16, luts)
    assert int(total.sums[2]) == int(ref.sums[2])


def test_ttt_scores_before_training(ttt_setup):
    h, _, _, _, _, per_chunk, events, _ = ttt_setup
    n_chunks = len(per_chunk)
    last_score = {}
    trained = []
    for i, ev in enumerate(events):
        kind, c = ev[0], ev[1]
        if kind == "score":
            assert c not in last_score and c == len(last_score)  # chunks scored once, in order
            last_score[c] = ev[2]
        else:
            assert kind == "train"
            assert c in last_score, "chunk trained on before it was scored"
            assert ev[2] <= last_score[c], "training reaches targets not yet scored"
            assert ev[2] == min((c + 1) * h.ttt_chunk_tokens, TTT_N)
            assert events[i - 1] == ("score", c, last_score[c])  # trains right after its own scoring
            trained.append(c)
    assert sorted(last_score) == list(range(n_chunks))
    assert trained == list(range(n_chunks - 1))  # every chunk but the last one is trained on
    assert max(last_score.values()) == TTT_N


def test_ttt_first_chunk_is_untouched_model_and_later_chunks_adapt(ttt_setup):
    h, luts, base, tokens, total, per_chunk, _, adapted = ttt_setup
    ref = no_ttt_chunk_sums(h, luts, base, tokens)
    assert torch.equal(per_chunk[0], ref[0])  # nothing was trained before chunk 0 was scored
    for c in range(1, len(per_chunk)):
        assert torch.equal(per_chunk[c][1:], ref[c][1:])
        assert abs(per_chunk[c][0].item() - ref[c][0].item()) > 1e-3, f"chunk {c}: TTT changed nothing"
    changed = [not torch.equal(p, q) for p, q in zip(adapted.parameters(), base.parameters())]
    assert all(changed[:1]) and sum(changed) >= len(changed) // 2
    assert all(not p.requires_grad for p in adapted.parameters()) and not adapted.training


def test_ttt_future_tokens_do_not_leak(ttt_setup):
    """Replacing every token after chunk k's end leaves chunks 0..k bit-identical: nothing is scored with
    weights trained on (or windows reading) tokens after it."""
    h, luts, base, tokens, _, per_chunk, _, _ = ttt_setup
    k = 2
    end = (k + 1) * h.ttt_chunk_tokens  # last target of chunk k predicts tokens[end]
    other = tokens.clone()
    g = torch.Generator().manual_seed(11)
    other[end + 1:] = torch.randint(0, h.vocab_size, (other.numel() - end - 1,), generator=g)
    _, per_chunk2 = tg.eval_ttt(copy.deepcopy(base), other, h, luts)
    for c in range(k + 1):
        assert torch.equal(per_chunk2[c], per_chunk[c]), c
    assert not torch.equal(per_chunk2[k + 1], per_chunk[k + 1])


def test_ttt_truncated_stream_prefix(ttt_setup):
    """Truncating the stream after chunk k's end: chunks 0..k score exactly as on the full stream."""
    h, luts, base, tokens, _, per_chunk, _, _ = ttt_setup
    k = 2
    end = (k + 1) * h.ttt_chunk_tokens
    _, short = tg.eval_ttt(copy.deepcopy(base), tokens[:end + 1], h, luts)
    assert len(short) == k + 1
    for c in range(k + 1):
        assert torch.equal(short[c], per_chunk[c]), f"chunk {c} depends on the length of the stream after it"


def test_ttt_truncated_stream_prefix_with_lr_decay(ttt_setup):
    """Same with the cosine TTT lr decay on: its horizon is a fixed token count, not the stream's length."""
    h, luts, base, tokens, *_ = ttt_setup
    h = dataclasses.replace(h, ttt_lr_horizon=3 * h.ttt_chunk_tokens)
    k, end = 2, 3 * h.ttt_chunk_tokens
    _, full = tg.eval_ttt(copy.deepcopy(base), tokens, h, luts)
    _, short = tg.eval_ttt(copy.deepcopy(base), tokens[:end + 1], h, luts)
    assert len(short) == k + 1 and len(full) > k + 1
    for c in range(k + 1):
        assert torch.equal(short[c], full[c]), f"chunk {c} depends on the length of the stream after it"


def test_ttt_without_epochs_is_sliding(ev_setup, ttt_setup):
    h, luts, base, tokens, *_ = ttt_setup
    h0 = dataclasses.replace(h, ttt_epochs=0)
    m = copy.deepcopy(base)
    total, _ = tg.eval_ttt(m, tokens, h0, luts)
    ref = tg.eval_sliding(base, tokens, h.eval_seq_len, h.eval_stride, h.val_batch_seqs, luts)
    assert torch.equal(total.sums[1:], ref.sums[1:])
    assert total.val_loss == pytest.approx(ref.val_loss, rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), base.parameters()))


# ----------------------------------------------------------------------------------------------
# 5. Scores
# ----------------------------------------------------------------------------------------------


def test_scores_arithmetic(ev_setup):
    h, sp, luts, val = ev_setup
    prev, tgt = val[:300], val[1:301]
    nll = torch.rand(300, generator=torch.Generator().manual_seed(0)) * 5
    s = tg.Scores(torch.device("cpu"))
    s.add(nll[:100], prev[:100], tgt[:100], luts)
    s.add(nll[100:], prev[100:], tgt[100:], luts)
    assert s.sums.dtype == torch.float64
    nbytes = int(tg.target_bytes(prev, tgt, luts).sum())
    nll_sum = nll.double().sum().item()
    assert int(s.sums[1]) == 300 and int(s.sums[2]) == nbytes
    assert s.val_loss == pytest.approx(nll_sum / 300, rel=1e-12)
    assert s.val_bpb == pytest.approx(nll_sum / (math.log(2) * nbytes), rel=1e-12)
    assert s.reduce(1) is s and int(s.sums[1]) == 300


def test_target_bytes_match_utf8_of_a_document(ev_setup):
    """Byte counting against the tokenizer itself: the targets of one document (after its BOS) add up to the
    UTF-8 length of the decoded document."""
    _, sp, luts, val = ev_setup
    bos = (val == tg.BOS_ID).nonzero().flatten().tolist()
    docs = [(a, b) for a, b in zip(bos, bos[1:]) if b - a > 20][:5]
    assert docs
    for a, b in docs:
        ids = val[a:b]  # BOS + the document
        nbytes = int(tg.target_bytes(ids[:-1], ids[1:], luts).sum())
        text = sp.decode(ids[1:].tolist())
        assert nbytes == len(text.encode("utf-8"))
