"""Evaluation: sliding-window tiling, eval_sliding against a brute-force reference, the rank split (of scoring and of
TTT's SGD steps), the legality of score-first TTT, and the Scores arithmetic."""
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
RT = tg.Runtime(torch.device("cpu"))


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


def random_gpt(h, seed=0, bigram_std=0.5) -> tg.GPT:
    """A tiny GPT whose every block does something (the zero-initialised projections are redrawn), so that
    context really changes the predictions. tests/test_ttt_dataflow.py uses it too."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tg.CastedLinear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
        model.tok_emb.weight.normal_(0.0, 0.3)
        if model.bigram is not None:
            model.bigram.table.weight.normal_(0.0, bigram_std)
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


@pytest.mark.parametrize("plain", [False, True], ids=["sliding", "plain"])
def test_eval_sliding_matches_brute_force(ev_setup, model, plain):
    """eval_sliding (and eval_plain: stride = seq_len) against running the model on each window alone."""
    h, _, luts, val = ev_setup
    tokens = val[:N_TARGETS + 1]
    seq_len, stride = h.eval_seq_len, (h.eval_seq_len if plain else h.eval_stride)
    if plain:
        got = tg.eval_plain(model, tokens, seq_len, 16, luts, RT)
    else:
        got = tg.eval_sliding(model, tokens, seq_len, stride, 16, luts, RT)
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
    if not plain:  # the model really uses context: scoring without the overlap gives another number
        plain_like = tg.eval_plain(model, tokens, seq_len, 16, luts, RT)
        assert abs(plain_like.val_loss - got.val_loss) > 1e-4


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
    tg.score_windows(model, tokens, batch, seq_len, 16, luts, RT, padded)
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


def rank_rt(rank: int, world: int) -> tg.Runtime:
    return tg.Runtime(torch.device("cpu"), rank=rank, world=world)


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
    tokens = val[:(N_TARGETS if batch_seqs > 1 else 601) + 1]  # one window per forward: a shorter stream
    one = tg.eval_sliding(model, tokens, h.eval_seq_len, h.eval_stride, batch_seqs, luts, RT)
    one_plain = tg.eval_plain(model, tokens, h.train_seq_len, batch_seqs, luts, RT)
    assert not no_allreduce
    for world in (2, 3, 5):
        parts = [tg.eval_sliding(model, tokens, h.eval_seq_len, h.eval_stride, batch_seqs, luts, rank_rt(r, world))
                 for r in range(world)]
        assert len(no_allreduce) == world  # reduce() is asked for when world > 1
        no_allreduce.clear()
        total = torch.stack([p.sums for p in parts]).sum(0)
        assert torch.equal(total[1:], one.sums[1:])  # tokens and bytes: exactly
        if batch_seqs == 1:  # every window computed alone: identical NLLs, only fp64 summation order differs
            assert total[0].item() == pytest.approx(one.sums[0].item(), rel=1e-13)
        else:
            assert total[0].item() == pytest.approx(one.sums[0].item(), rel=1e-6)
        plain_parts = [tg.eval_plain(model, tokens, h.train_seq_len, batch_seqs, luts, rank_rt(r, world)).sums
                       for r in range(world)]
        no_allreduce.clear()
        total = torch.stack(plain_parts).sum(0)
        assert torch.equal(total[1:], one_plain.sums[1:])
        assert total[0].item() == pytest.approx(one_plain.sums[0].item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# 4. score-first TTT
# ----------------------------------------------------------------------------------------------

TTT_N = 1200  # 5 chunks of 256 targets, the last one short
# The legality of the data flow (score before train, each target once, finality) for every mode is in
# test_ttt_dataflow.py; here: what TTT computes.


@pytest.fixture(scope="module")
def ttt_setup(ev_setup):
    h, _, luts, val = ev_setup
    h = dataclasses.replace(h, ttt_chunk_tokens=256, eval_seq_len=64, eval_stride=16, ttt_epochs=1, ttt_lr=0.05,
                            ttt_batch_seqs=2, val_batch_seqs=16)
    base = random_gpt(h, seed=3)
    tokens = val[:TTT_N + 1].clone()
    m = copy.deepcopy(base)
    total, per_chunk = tg.eval_ttt(m, tokens, h, luts, RT)
    return h, luts, base, tokens, total, per_chunk, m


def no_ttt_chunk_sums(h, luts, model, tokens):
    n = tokens.numel() - 1
    windows = tg.sliding_windows(n, h.eval_seq_len, h.eval_stride)
    out = []
    for c in range((n + h.ttt_chunk_tokens - 1) // h.ttt_chunk_tokens):
        s = tg.Scores(luts[0].device)
        mine = [w for w in windows if w[1] // h.ttt_chunk_tokens == c]
        tg.score_windows(model, tokens, mine, h.eval_seq_len, h.val_batch_seqs, luts, RT, s)
        out.append(s.sums)
    return out


def test_ttt_first_chunk_is_untouched_model_and_later_chunks_adapt(ttt_setup):
    h, luts, base, tokens, total, per_chunk, adapted = ttt_setup
    ref = no_ttt_chunk_sums(h, luts, base, tokens)
    assert len(per_chunk) == 5 and torch.equal(total.sums, torch.stack(per_chunk).sum(0))
    assert torch.equal(per_chunk[0], ref[0])  # nothing was trained before chunk 0 was scored
    for c in range(1, len(per_chunk)):
        assert torch.equal(per_chunk[c][1:], ref[c][1:])
        assert abs(per_chunk[c][0].item() - ref[c][0].item()) > 1e-3, f"chunk {c}: TTT changed nothing"
    changed = [not torch.equal(p, q) for p, q in zip(adapted.parameters(), base.parameters())]
    assert all(changed[:1]) and sum(changed) >= len(changed) // 2


def test_ttt_truncated_stream_prefix_with_lr_decay(ttt_setup):
    """Truncating the stream after chunk k's end leaves chunks 0..k bit-identical, with the cosine TTT lr
    decay on: its horizon is a fixed token count, not the stream's length."""
    h, luts, base, tokens, *_ = ttt_setup
    h = dataclasses.replace(h, ttt_lr_horizon=3 * h.ttt_chunk_tokens)
    k, end = 2, 3 * h.ttt_chunk_tokens
    _, full = tg.eval_ttt(copy.deepcopy(base), tokens, h, luts, RT)
    _, short = tg.eval_ttt(copy.deepcopy(base), tokens[:end + 1], h, luts, RT)
    assert len(short) == k + 1 and len(full) > k + 1
    for c in range(k + 1):
        assert torch.equal(short[c], full[c]), f"chunk {c} depends on the length of the stream after it"
    _, no_decay = tg.eval_ttt(copy.deepcopy(base), tokens, dataclasses.replace(h, ttt_lr_horizon=10 ** 9), luts, RT)
    assert not torch.equal(no_decay[k], full[k])  # the decay really acts within these chunks


def test_ttt_without_epochs_is_sliding(ttt_setup):
    h, luts, base, tokens, *_ = ttt_setup
    h0 = dataclasses.replace(h, ttt_epochs=0)
    m = copy.deepcopy(base)
    total, _ = tg.eval_ttt(m, tokens, h0, luts, RT)
    ref = tg.eval_sliding(base, tokens, h.eval_seq_len, h.eval_stride, h.val_batch_seqs, luts, RT)
    assert torch.equal(total.sums[1:], ref.sums[1:])
    assert total.val_loss == pytest.approx(ref.val_loss, rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), base.parameters()))


class RowBigram(torch.nn.Module):
    """Stands in for the model in sgd_train: next-token logits from the current token alone (so every row's
    gradient is its own); records the input rows of each step."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))
        self.rows = []

    def forward(self, x, y, reduction="none"):
        self.rows.append(x.clone())
        logits = self.table[x].reshape(-1, self.table.size(1))
        return torch.nn.functional.cross_entropy(logits, y.reshape(-1), reduction="none").view_as(y)


@pytest.mark.parametrize("world", [2, 3])
def test_sgd_train_splits_each_global_step_over_the_ranks(ev_setup, no_allreduce, monkeypatch, world):
    """TTT_BATCH_SEQS is the global number of rows per SGD step on any world size: the targets are cut into rows of
    EVAL_SEQ_LEN in order, rank r takes rows r, r+world, ... of each step, padded to ceil(TTT_BATCH_SEQS / world)
    rows (padding reads token 0), and each rank's loss is over the step's global token count, so the ranks'
    gradients sum to the 1-process gradient of every step."""
    h = dataclasses.replace(ev_setup[0], eval_seq_len=8, ttt_batch_seqs=5, ttt_epochs=1)
    n = 8 * 8 + 3  # 8 full rows and a partial one: a step of 5 rows, then one of 4 (the last one partial)
    tokens = torch.arange(1, n + 2)  # distinct ids >= 1: target t's input token is t + 1
    grads = []
    monkeypatch.setattr(tg.torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: grads.append(params[0].grad.clone()))

    def run(rank, w):
        model, grads[:] = RowBigram(n + 2), []
        params = list(model.parameters())
        tg.sgd_train(model, tokens, torch.arange(n), params, torch.optim.SGD(params, lr=0.0), h,
                     tg.Runtime(torch.device("cpu"), rank=rank, world=w))
        return model.rows, list(grads)

    rows1, grads1 = run(0, 1)
    assert len(rows1) == len(grads1) == 2 and all(r.shape == (5, 8) for r in rows1)
    assert torch.equal(rows1[0], torch.arange(1, 41).view(5, 8))  # rows in order
    last = rows1[1].flatten()
    assert torch.equal(last[:n - 40], torch.arange(41, n + 1)) and (last[n - 40:] == 0).all()
    parts = [run(r, world) for r in range(world)]
    assert len(no_allreduce) == 2 * world  # one gradient all-reduce per step and rank
    for step in range(2):
        for r, (rows, _) in enumerate(parts):
            mine = rows1[step][r::world]
            assert rows[step].shape == (-(-5 // world), 8), (step, r)
            assert torch.equal(rows[step][:len(mine)], mine) and (rows[step][len(mine):] == 0).all(), (step, r)
        total = sum(g[step] for _, g in parts)
        assert torch.allclose(total, grads1[step], rtol=1e-5, atol=1e-7), step
        assert all(g[step].abs().sum() > 0 for _, g in parts)  # every rank has real rows in both steps


# ----------------------------------------------------------------------------------------------
# 4b. document-wise LoRA TTT
# ----------------------------------------------------------------------------------------------

LORA_DOCS = [100, 7, 41, 150, 12, 24, 36]  # targets per document; two longer than EVAL_SEQ_LEN=32


def test_documents_partition_the_targets():
    t = torch.tensor([5, 6, tg.BOS_ID, 7, tg.BOS_ID, tg.BOS_ID, 8, 9, tg.BOS_ID])
    assert tg.documents(t) == [(0, 2), (2, 4), (4, 5), (5, 8)]  # a trailing BOS is the last doc's last target
    t2 = torch.tensor([tg.BOS_ID, 3, 4, tg.BOS_ID, 5])
    assert tg.documents(t2) == [(0, 3), (3, 4)]


def test_lora_window_is_the_shortest_power_of_two_fraction():
    assert [tg.lora_window(n, 64) for n in (1, 4, 5, 8, 9, 16, 17, 32, 33, 64)] == [4, 4, 8, 8, 16, 16, 32, 32, 64, 64]
    assert tg.lora_window(3, 48) == 3 and tg.lora_window(7, 48) == 12 and tg.lora_window(48, 48) == 48


@pytest.fixture(scope="module")
def lora_setup(ev_setup):
    """Documents of distinct token ids (BOS aside), so each scored (input, target) pair names its target."""
    h, _, luts, _ = ev_setup
    h = dataclasses.replace(h, ttt_mode="lora", eval_seq_len=32, ttt_lora_chunk=12, ttt_lora_docs=3,
                            ttt_lora_rank=4, ttt_lora_lr=0.01)
    ids = (torch.randperm(h.vocab_size - 2, generator=torch.Generator().manual_seed(2)) + 2).tolist()
    stream = []
    for i, n in enumerate(LORA_DOCS):
        stream += [tg.BOS_ID] + [ids.pop() for _ in range(n if i == len(LORA_DOCS) - 1 else n - 1)]
    tokens = torch.tensor(stream)
    docs = tg.documents(tokens)
    assert [e - s for s, e in docs] == LORA_DOCS
    return h, luts, random_gpt(h, seed=5), tokens, docs


def lora_reference(model, tokens, docs, h):
    """Per target: the base model's NLL with the context the LoRA evaluator gives it (its own document, at
    most EVAL_SEQ_LEN tokens, up to the end of its chunk), each window run alone."""
    nll = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
    for s, e in docs:
        for lo in range(s, e, h.ttt_lora_chunk):
            hi = min(lo + h.ttt_lora_chunk, e)
            start = max(s, hi - h.eval_seq_len)
            with torch.no_grad():
                out = model(tokens[start:hi][None], tokens[start + 1:hi + 1][None], reduction="none")[0]
            nll[lo:hi] = out[lo - start:].double()
    return nll


def record_scores(monkeypatch, tokens):
    """Patch Scores.add to scatter each scored NLL to its target index (found from the unique pair)."""
    out = torch.full((tokens.numel() - 1,), float("nan"), dtype=torch.float64)
    index = {(int(a), int(b)): t for t, (a, b) in enumerate(zip(tokens[:-1], tokens[1:]))}
    assert len(index) == tokens.numel() - 1
    orig = tg.Scores.add

    def add(self, nll, prev, tgt, luts, mask=None, pos=None):
        for (b, j) in mask.nonzero().tolist():
            t = index[(int(prev[b, j]), int(tgt[b, j]))]
            assert torch.isnan(out[t]), f"target {t} scored twice"
            out[t] = float(nll[b, j])
        return orig(self, nll, prev, tgt, luts, mask, pos)
    monkeypatch.setattr(tg.Scores, "add", add)
    return out


def test_eval_lora_without_updates_is_the_document_windowed_base_model(monkeypatch, lora_setup):
    h, luts, model, tokens, docs = lora_setup
    h0 = dataclasses.replace(h, ttt_lora_lr=0.0)  # AdamW with lr 0: the adapters stay at B = 0
    ref = tg.eval_sliding(model, tokens, h.eval_seq_len, h.eval_stride, h.val_batch_seqs, luts, RT)
    nll = record_scores(monkeypatch, tokens)
    torch.manual_seed(0)
    scores, phases = tg.eval_lora(copy.deepcopy(model), tokens, h0, luts, RT)
    assert phases == 0
    assert torch.equal(scores.sums[1:], ref.sums[1:])  # every target once, same bytes
    expect = lora_reference(model, tokens, docs, h)
    torch.testing.assert_close(nll, expect, rtol=1e-5, atol=1e-5)
    assert scores.sums[0].item() == pytest.approx(float(expect.sum()), rel=1e-6)


def test_eval_lora_updates_change_only_later_chunks(monkeypatch, lora_setup):
    """With updates on: each document's first chunk scores as without updates (its adapters start at 0);
    its later chunks differ; the base weights are untouched (lora mode trains only the adapters)."""
    h, luts, model, tokens, docs = lora_setup
    runs = {}
    for lr in (0.0, h.ttt_lora_lr):
        with monkeypatch.context() as mp:
            runs[lr] = record_scores(mp, tokens)
            m = copy.deepcopy(model)
            torch.manual_seed(0)
            tg.eval_lora(m, tokens, dataclasses.replace(h, ttt_lora_lr=lr), luts, RT)
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), model.parameters()))
        assert all(p.requires_grad for p in m.parameters())  # unfrozen again afterwards
    frozen, adapted = runs[0.0], runs[h.ttt_lora_lr]
    first = torch.zeros_like(frozen, dtype=torch.bool)
    for s, e in docs:
        first[s:min(s + h.ttt_lora_chunk, e)] = True
    torch.testing.assert_close(adapted[first], frozen[first], rtol=1e-6, atol=1e-6)
    assert float((adapted[~first] - frozen[~first]).abs().max()) > 1e-3


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
