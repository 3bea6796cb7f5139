"""Data flow of score-first test-time training, recorded from outside train_gpt.py for every TTT mode.

The validation stream is made of distinct token ids (BOS=1 aside, at chosen document boundaries), so every
(input, target) pair the model sees names exactly one target index of the stream. Two probes record:
  * `Scores.add` (patched): the targets each score covers, with their NLL, in order;
  * the model's forward (wrapped): a backward hook on the per-token NLL records the targets whose gradient is
    non-zero, i.e. the targets that really feed an update.
From that event log the tests require: every trained target was scored before (for LoRA: by the same
forward or an earlier one), every target is scored exactly once, and the scores up to any point do not depend
on the text revealed after it. Three deliberately broken variants (monkeypatched here, never shipped) prove
the recorder catches a leak.
"""
from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch

import train_gpt as tg
from test_eval import random_gpt as shared_random_gpt

BOS = tg.BOS_ID
VOCAB = 512
# Targets per document (a document = its BOS + the tokens up to the next BOS). Several lengths: one of a
# single target (BOS, BOS), ones shorter than a LoRA chunk, multiples of it, and ones longer than EVAL_SEQ_LEN.
DOC_LENGTHS = [45, 17, 11, 1, 6, 5, 2, 23, 9, 12, 33, 37]
N_TARGETS = sum(DOC_LENGTHS)  # 201 = 5 chunks of 40 + a last chunk of one target

KNOBS = {
    "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "MLP_MULT": "2",
    "VOCAB_SIZE": str(VOCAB), "BIGRAM_BUCKETS": "64", "BIGRAM_DIM": "8", "ROPE_DIMS": "8", "XSA_LAST_N": "1",
    "TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "32", "EVAL_STRIDE": "12", "VAL_BATCH_SEQS": "2",
    # chunked: 40 is no multiple of the stride 12; the scored window ranges [32,44), [116,128), [152,164)
    # straddle the chunk boundaries 40, 120, 160, while 80 and 200 fall on a range boundary.
    "TTT_CHUNK_TOKENS": "40", "TTT_EPOCHS": "2", "TTT_BATCH_SEQS": "2", "TTT_LR": "0.05",
    "TTT_LORA_RANK": "4", "TTT_LORA_LR": "0.01", "TTT_LORA_CHUNK": "5", "TTT_LORA_DOCS": "2",
    "TTT_PHASES": "3", "TTT_PHASE_DOCS": "6",  # phases after 2, 4 and 6 scored documents (of 12)
}
MODES = ("chunked", "lora", "phased")
RT = tg.Runtime(torch.device("cpu"))


def make_h(mode: str, **over) -> tg.Hyperparameters:
    return tg.Hyperparameters.from_env({**KNOBS, "TTT_MODE": mode, **{k: str(v) for k, v in over.items()}})


def make_stream(seed: int = 0) -> torch.Tensor:
    """BOS at every document start, distinct ids elsewhere; returns N_TARGETS + 1 tokens."""
    ids = (torch.randperm(VOCAB - 2, generator=torch.Generator().manual_seed(seed)) + 2).tolist()
    out = []
    for i, length in enumerate(DOC_LENGTHS):
        body = length if i == len(DOC_LENGTHS) - 1 else length - 1  # the last target of a doc is the next BOS
        out += [BOS] + [ids.pop() for _ in range(body)]
    tokens = torch.tensor(out)
    assert tokens.numel() == N_TARGETS + 1
    return tokens


def make_luts(seed: int = 0):
    """Byte tables for the synthetic vocabulary: 1-4 bytes per piece, some with a leading space; 0 and BOS
    are control tokens (0 bytes, boundaries)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, 5, (VOCAB,), generator=g, dtype=torch.int16)
    space = torch.rand(VOCAB, generator=g) < 0.4
    boundary = torch.zeros(VOCAB, dtype=torch.bool)
    for i in (0, BOS):
        base[i], space[i], boundary[i] = 0, False, True
    return base, space, boundary


def random_gpt(h, seed: int = 0) -> tg.GPT:
    """Every block does something (zero-init projections redrawn), so context and training move the scores."""
    return shared_random_gpt(h, seed, bigram_std=0.3)


class Recorder:
    """Maps (input, target) pairs back to target indices and keeps the ordered event log:
    ("score", forward_id, targets, nll), ("train", forward_id, targets), ("sgd", "begin" | "end")."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        codes = tokens[:-1] * VOCAB + tokens[1:]
        self.codes, self.order = torch.sort(codes)
        assert torch.unique(codes).numel() == codes.numel(), "stream pairs must be unique"
        self.events, self.forwards = [], 0

    def lookup(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = x.reshape(-1).long() * VOCAB + y.reshape(-1).long()
        idx = torch.searchsorted(self.codes, q).clamp_max(self.codes.numel() - 1)
        found = self.codes[idx] == q
        assert bool(found.all()), f"pairs not in the stream: {q[~found][:5].tolist()}"
        return self.order[idx]

    def scores(self, upto: int | None = None):
        return [e for e in self.events[:upto] if e[0] == "score"]

    def scored_targets(self) -> torch.Tensor:
        return torch.cat([e[2] for e in self.scores()])

    def sgd_groups(self) -> list[tuple[int, torch.Tensor]]:
        """(index of the "begin" event, targets trained) of each sgd_train call."""
        groups, begin, parts = [], None, []
        for i, e in enumerate(self.events):
            if e[0] == "sgd":
                if e[1] == "begin":
                    begin, parts = i, []
                else:
                    groups.append((begin, torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)))
                    begin = None
            elif e[0] == "train" and begin is not None:
                parts.append(e[2])
        return groups


def install(monkeypatch, model: tg.GPT, rec: Recorder):
    orig_add, orig_forward, orig_sgd = tg.Scores.add, model.forward, tg.sgd_train

    def add(self, nll, prev, tgt, luts, mask=None, pos=None):
        m = torch.ones_like(nll, dtype=torch.bool) if mask is None else mask
        rec.events.append(("score", rec.forwards, rec.lookup(prev[m], tgt[m]), nll[m].detach().double().clone()))
        return orig_add(self, nll, prev, tgt, luts, mask, pos)

    def forward(ids, targets, reduction="mean"):
        rec.forwards += 1
        fid = rec.forwards
        nll = orig_forward(ids, targets, reduction="none")  # a mean loss is hooked through the per-token NLL too
        if nll.requires_grad:
            x, y = ids.detach().clone(), targets.detach().clone()

            def hook(grad):
                live = grad != 0
                rec.events.append(("train", fid, rec.lookup(x[live], y[live])))
            nll.register_hook(hook)
        return nll.mean() if reduction == "mean" else nll

    def sgd(*args, **kwargs):
        rec.events.append(("sgd", "begin"))
        out = orig_sgd(*args, **kwargs)
        rec.events.append(("sgd", "end"))
        return out

    monkeypatch.setattr(tg.Scores, "add", add)
    monkeypatch.setattr(tg, "sgd_train", sgd)
    model.forward = forward


def run_mode(monkeypatch, mode, base, tokens, luts, h=None):
    """One TTT evaluation of a copy of `base` with the probes installed; returns (Scores, Recorder, extra)."""
    h = h or make_h(mode)
    model, rec = copy.deepcopy(base), Recorder(tokens)
    torch.manual_seed(1234)
    with monkeypatch.context() as mp:
        install(mp, model, rec)
        if mode == "chunked":
            scores, extra = tg.eval_ttt(model, tokens, h, luts, RT)
        else:
            scores, extra = tg.eval_lora(model, tokens, h, luts, RT)
    return scores, rec, extra


def leaks(rec: Recorder) -> list[tuple[int, list[int]]]:
    """(event index, targets) of every training update that reads a target not scored before it."""
    scored = torch.zeros(rec.tokens.numel() - 1, dtype=torch.bool)
    found = []
    for i, e in enumerate(rec.events):
        if e[0] == "score":
            scored[e[2]] = True
        elif e[0] == "train":
            bad = e[2][~scored[e[2]]]
            if bad.numel():
                found.append((i, sorted(set(bad.tolist()))))
    return found


@pytest.fixture(scope="module")
def setup():
    h = make_h("chunked")
    tokens, luts = make_stream(), make_luts()
    base = random_gpt(h)
    # the stream really has the planned documents
    assert [e - s for s, e in tg.documents(tokens)] == DOC_LENGTHS
    ref = tg.eval_sliding(base, tokens, h.eval_seq_len, h.eval_stride, h.val_batch_seqs, luts, RT)
    return tokens, luts, base, ref


@pytest.fixture(scope="module")
def runs(setup):
    """One recorded run per mode, shared by the tests that only read the log."""
    tokens, luts, base, _ = setup
    mp = pytest.MonkeyPatch()
    try:
        return {mode: run_mode(mp, mode, base, tokens, luts) for mode in MODES}
    finally:
        mp.undo()


# ----------------------------------------------------------------------------------------------
# 1. every trained target was scored before
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_every_trained_target_was_scored_before(runs, mode):
    _, rec, _ = runs[mode]
    trained = [e for e in rec.events if e[0] == "train"]
    assert trained, "no training update was recorded: the probe saw nothing"
    assert leaks(rec) == []


@pytest.mark.parametrize("mode", MODES)
def test_every_target_scored_exactly_once(setup, runs, mode):
    _, _, _, ref = setup
    scores, rec, _ = runs[mode]
    assert torch.equal(torch.sort(rec.scored_targets()).values, torch.arange(N_TARGETS))
    assert torch.equal(scores.sums[1:], ref.sums[1:])  # tokens and bytes: those of eval_sliding, exactly
    total = sum(float(e[3].sum()) for e in rec.scores())
    assert scores.sums[0].item() == pytest.approx(total, rel=1e-12)  # the recorded NLLs are the ones summed
    assert abs(scores.val_loss - ref.val_loss) > 1e-4  # TTT changed the scores: the updates are real


def test_chunked_trains_each_chunk_after_all_windows_covering_it(runs):
    h = make_h("chunked")
    _, rec, per_chunk = runs["chunked"]
    chunk, n_chunks = h.ttt_chunk_tokens, math.ceil(N_TARGETS / h.ttt_chunk_tokens)
    assert n_chunks == 6 and N_TARGETS - (n_chunks - 1) * chunk == 1  # a one-target last chunk
    assert [int(s[1]) for s in per_chunk] != [chunk] * 5 + [1]  # window ranges straddle chunk boundaries ...
    assert sum(int(s[1]) for s in per_chunk) == N_TARGETS
    groups = rec.sgd_groups()
    assert len(groups) == n_chunks - 1  # the last chunk is not trained on
    for c, (begin, trained) in enumerate(groups):
        lo, hi = c * chunk, min((c + 1) * chunk, N_TARGETS)
        counts = torch.bincount(trained, minlength=N_TARGETS)
        assert torch.equal(counts[lo:hi], torch.full((hi - lo,), h.ttt_epochs)), c  # the whole chunk, per epoch
        assert int(counts.sum()) == (hi - lo) * h.ttt_epochs, c  # and nothing else
        before = torch.cat([e[2] for e in rec.scores(begin)])
        windows_covering = [w for w in tg.sliding_windows(N_TARGETS, h.eval_seq_len, h.eval_stride)
                            if w[1] < hi and w[2] > lo]
        for _, s_from, s_to in windows_covering:  # ... and each of them was scored before the chunk's update
            assert bool(torch.isin(torch.arange(s_from, s_to), before).all()), (c, s_from, s_to)
        assert any(s_to > hi for _, _, s_to in windows_covering) or hi in (80, 200)


def _doc_of(tokens):
    doc_id = torch.zeros(N_TARGETS, dtype=torch.long)
    for i, (s, e) in enumerate(tg.documents(tokens)):
        doc_id[s:e] = i
    return doc_id


@pytest.mark.parametrize("mode", ["lora", "phased"])
def test_lora_steps_train_only_the_chunk_their_forward_just_scored(setup, runs, mode):
    tokens, *_ = setup
    h = make_h(mode)
    _, rec, _ = runs[mode]
    scored_by = {}
    for e in rec.scores():
        scored_by.setdefault(e[1], []).append(e[2])
    lora_trained = []
    in_sgd = False
    for e in rec.events:
        if e[0] == "sgd":
            in_sgd = e[1] == "begin"
        elif e[0] == "train" and not in_sgd:
            assert e[1] in scored_by, "a LoRA step from a forward that scored nothing"
            assert bool(torch.isin(e[2], torch.cat(scored_by[e[1]])).all()), "LoRA step on targets it did not score"
            lora_trained.append(e[2])
    trained = torch.cat(lora_trained)
    assert torch.unique(trained).numel() == trained.numel()  # each target feeds one step
    # every target but those of each document's last chunk feeds a step
    expect = torch.cat([torch.arange(s, s + (e - s - 1) // h.ttt_lora_chunk * h.ttt_lora_chunk)
                        for s, e in tg.documents(tokens)])
    assert torch.equal(torch.sort(trained).values, torch.sort(expect).values)


def test_phased_sgd_trains_exactly_the_first_scored_documents(setup, runs):
    """Phase p trains on the first marks[p] documents of the scoring order (longest first), all fully scored
    before it, in that order, in steps of ttt_step_rows rows, each target once per epoch but for the last step's
    (the cosine lr reaches 0 there, so the step is skipped, as in the record)."""
    tokens, *_ = setup
    h = make_h("phased")
    _, rec, phases = runs["phased"]
    assert phases == h.ttt_phases == 3
    groups = rec.sgd_groups()
    assert len(groups) == 3
    queue = sorted(tg.documents(tokens), key=lambda d: (d[0] - d[1], d[0]))
    assert [e - s for s, e in queue[:3]] == [45, 37, 33]
    step = tg.ttt_step_rows(h) * h.eval_seq_len
    for (begin, trained), m in zip(groups, (2, 4, 6)):
        before = torch.cat([e[2] for e in rec.scores(begin)])
        targets = torch.cat([torch.arange(s, e) for s, e in queue[:m]])
        assert bool(torch.isin(targets, before).all()), m  # all fully scored before the phase
        n_steps = -(-targets.numel() // step)
        expect = targets[:(n_steps - 1) * step].repeat(h.ttt_epochs)
        assert torch.equal(torch.sort(trained).values, torch.sort(expect).values), m


def test_global_sgd_has_a_fresh_optimizer_and_a_cosine_to_zero_per_phase(monkeypatch, setup):
    tokens, *_ = setup
    h = make_h("phased", TTT_EPOCHS=1, TTT_LR=0.04)
    made, stepped = [], []

    class SpySGD(torch.optim.SGD):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            made.append(self)

        def step(self, closure=None):
            stepped.append((made.index(self), self.param_groups[0]["lr"], len(self.state)))
            return super().step(closure)

    monkeypatch.setattr(tg.torch.optim, "SGD", SpySGD)
    model = random_gpt(h)
    targets = torch.arange(5 * tg.ttt_step_rows(h) * h.eval_seq_len)  # 5 steps
    for _ in range(2):
        tg.global_sgd(model, tokens, targets, h, RT)
    assert len(made) == 2 and [o for o, _, _ in stepped] == [0] * 4 + [1] * 4  # a new optimizer per phase
    lrs = [0.04 * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]  # the 5th step's lr is 0: skipped
    assert [lr for _, lr, _ in stepped] == pytest.approx(lrs * 2) and lrs[0] == 0.04
    assert [n > 0 for _, _, n in stepped] == [False, True, True, True] * 2  # each phase starts with no momentum


# ----------------------------------------------------------------------------------------------
# 2. a score is final: it does not depend on the text revealed after it
# ----------------------------------------------------------------------------------------------


def revealed_after(rec: Recorder, k: int) -> torch.Tensor:
    """Positions p (not BOS, not 0) whose token is first read as a target after score event k."""
    scored = torch.zeros(N_TARGETS, dtype=torch.bool)
    for e in rec.scores(None)[:k + 1]:
        scored[e[2]] = True
    p = torch.arange(1, N_TARGETS + 1)
    return p[~scored[p - 1] & (rec.tokens[p] != BOS)]


def changed_stream(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    unused = torch.tensor(sorted(set(range(2, VOCAB)) - set(tokens.tolist())))
    assert unused.numel() >= positions.numel()
    out = tokens.clone()
    shuffled = unused[torch.randperm(unused.numel(), generator=torch.Generator().manual_seed(5))]
    out[positions] = shuffled[:positions.numel()]
    return out


def assert_prefix_final(monkeypatch, mode, base, tokens, luts, rec, cuts, h=None):
    for k in cuts:
        positions = revealed_after(rec, k)
        assert positions.numel() > 20, (mode, k)
        other = changed_stream(tokens, positions)
        _, rec2, _ = run_mode(monkeypatch, mode, base, other, luts, h)
        a, b = rec.scores(), rec2.scores()
        assert len(a) == len(b)
        for i in range(k + 1):
            assert torch.equal(a[i][2], b[i][2]), (mode, k, i)
            assert torch.equal(a[i][3], b[i][3]), f"{mode}: score event {i} changed with text revealed after event {k}"
        assert any(not torch.equal(a[i][3], b[i][3]) for i in range(k + 1, len(a)))  # the change mattered


@pytest.mark.parametrize("mode", MODES)
def test_scores_do_not_depend_on_later_text(monkeypatch, setup, runs, mode):
    tokens, luts, base, _ = setup
    _, rec, _ = runs[mode]
    n = len(rec.scores())
    # two cuts: after a third and after two thirds of the score events
    assert_prefix_final(monkeypatch, mode, base, tokens, luts, rec, cuts=(n // 3, 2 * n // 3))


# ----------------------------------------------------------------------------------------------
# 3. the recorder flags broken variants (monkeypatched here, never shipped)
# ----------------------------------------------------------------------------------------------


def broken_next_chunk(monkeypatch, chunk: int):
    """(a) chunked TTT trains each chunk and also the next one, not yet scored."""
    orig = tg.sgd_train

    def sgd(model, tokens, targets, *args, **kwargs):
        n = tokens.numel() - 1
        targets = torch.arange(int(targets[0]), min(int(targets[-1]) + 1 + chunk, n))
        return orig(model, tokens, targets, *args, **kwargs)
    monkeypatch.setattr(tg, "sgd_train", sgd)


def broken_shift(monkeypatch):
    """(b) TTT training sequences shifted by one token: targets t+1 instead of t."""
    orig = tg.sgd_train

    def sgd(model, tokens, targets, *args, **kwargs):
        return orig(model, tokens, (targets + 1).clamp_max(tokens.numel() - 2), *args, **kwargs)
    monkeypatch.setattr(tg, "sgd_train", sgd)


def broken_lora_next_chunk(monkeypatch):
    """LoRA steps that also learn from chunk c+1's targets, before that chunk is scored: the window reads
    up to the next chunk's end and `learn` covers both chunks."""
    src = inspect.getsource(tg.score_lora_batch)
    edits = [
        ("        hi = torch.minimum(lo + chunk, end)\n",
         "        hi = torch.minimum(lo + chunk, end)\n        hi2 = torch.minimum(hi + chunk, end)\n"),
        ("start = torch.maximum(first, hi - seq_len)", "start = torch.maximum(first, hi2 - seq_len)"),
        ("lora_window(int((hi - start).max()), seq_len, floor)", "lora_window(int((hi2 - start).max()), seq_len)"),
        ("x = torch.where(pos < hi,", "x = torch.where(pos < hi2,"),
        ("y = torch.where(pos < hi,", "y = torch.where(pos < hi2,"),
        ("learn = scored & (hi < end)", "learn = (pos >= lo) & (pos < hi2) & (hi < end)"),
    ]
    for old, new in edits:
        assert src.count(old) == 1, f"score_lora_batch changed; update this broken variant: {old!r}"
        src = src.replace(old, new)
    namespace = dict(vars(tg))
    exec(compile(src, "<broken score_lora_batch>", "exec"), namespace)
    monkeypatch.setattr(tg, "score_lora_batch", namespace["score_lora_batch"])


@pytest.mark.parametrize("variant,mode", [("next_chunk", "chunked"), ("shift", "chunked"), ("shift", "phased"),
                                          ("lora_next_chunk", "lora"), ("lora_next_chunk", "phased")])
def test_recorder_flags_broken_variants(monkeypatch, setup, variant, mode):
    tokens, luts, base, ref = setup
    h = make_h(mode)
    if variant == "next_chunk":
        broken_next_chunk(monkeypatch, h.ttt_chunk_tokens)
    elif variant == "shift":
        broken_shift(monkeypatch)
    else:
        broken_lora_next_chunk(monkeypatch)
    scores, rec, _ = run_mode(monkeypatch, mode, base, tokens, luts, h)
    found = leaks(rec)
    assert found, f"{variant}/{mode}: the recorder missed a leak"
    assert torch.equal(scores.sums[1:], ref.sums[1:])  # the breakage is invisible in the totals
    if variant == "shift" and mode == "chunked":
        # chunk 1 ends on a window boundary (80): the shifted update reads target 80 before it is scored
        assert any(80 in targets for _, targets in found)


def test_future_text_check_flags_training_on_the_next_chunk(monkeypatch, setup):
    """The finality check of section 2 also catches variant (a): cut right after the first scoring batch of
    chunk 1; the broken update after chunk 0 already read chunk 1's later text."""
    tokens, luts, base, _ = setup
    h = make_h("chunked")
    _, clean, _ = run_mode(monkeypatch, "chunked", base, tokens, luts, h)
    first_of_chunk1 = next(i for i, e in enumerate(clean.scores()) if int(e[2].min()) >= h.ttt_chunk_tokens)
    assert_prefix_final(monkeypatch, "chunked", base, tokens, luts, clean, cuts=(first_of_chunk1,), h=h)
    broken_next_chunk(monkeypatch, h.ttt_chunk_tokens)
    _, rec, _ = run_mode(monkeypatch, "chunked", base, tokens, luts, h)
    with pytest.raises(AssertionError, match="changed with text revealed"):
        assert_prefix_final(monkeypatch, "chunked", base, tokens, luts, rec, cuts=(first_of_chunk1,), h=h)
