"""Fixes for the first GPU lease (issue 21) that a CPU can show: the SDPA kernels chosen explicitly and logged, a
logged dense-mask fallback when compiled flex attention fails, TTT steps without padded rows, Muon's momentum
buffer made once, the compile guard when nothing is compiled, the EMA's warm-up, and the torch floor."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from test_model import make_h, make_model, rand_ids, randomize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_backends():
    saved = {n: getattr(torch.backends.cuda, s + "_enabled")() for n, s in tg.SDPA_BACKENDS.items()}
    yield
    for n, s in tg.SDPA_BACKENDS.items():
        getattr(torch.backends.cuda, "enable_" + s)(saved[n])


@pytest.mark.parametrize("knob,enabled", [("flash,efficient,math", ("flash", "efficient", "math")),
                                          ("flash", ("flash",)), ("math,cudnn", ("math", "cudnn"))])
def test_sdpa_backends_are_set_from_the_knob(restore_backends, monkeypatch, knob, enabled):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    tg.setup_runtime(make_h(SDPA_BACKENDS=knob, DEVICE="cpu"))
    on = {n for n, s in tg.SDPA_BACKENDS.items() if getattr(torch.backends.cuda, s + "_enabled")()}
    assert on == set(enabled)


def test_default_sdpa_backends_leave_cudnn_out():
    assert tg.Hyperparameters().sdpa_backends == "flash,efficient,math"
    with pytest.raises(tg.KnobError, match="SDPA_BACKENDS"):
        make_h(SDPA_BACKENDS="flash,fa3")


def test_failed_flex_probe_falls_back_to_dense_masks(monkeypatch):
    """A flex failure is caught and logged; afterwards document masks are dense, and the model's logits equal the
    flex path's (the same function, another kernel)."""
    model = randomize(make_model(seed=0, NUM_LAYERS=2, ATTN_DOC_MASK=1), seed=2, scale=0.1)
    ids = rand_ids((2, 24), seed=3, bos_at=(0, 7, 15))
    with torch.no_grad():
        flex_logits = model.logits(ids)
        assert not isinstance(tg.document_mask(ids), torch.Tensor)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this mask\nsecond line")

    monkeypatch.setattr(tg, "flex_attention", broken)
    monkeypatch.setitem(tg.FLEX, "ok", True)
    message = tg.probe_flex(tg.Runtime(torch.device("cpu")), tg.FLEX_MIN_LEN, 16)
    assert message == "flex: FAILED (RuntimeError: no kernel for this mask) -> dense-mask SDPA fallback"
    assert tg.FLEX["ok"] is False
    with torch.no_grad():
        assert isinstance(tg.document_mask(ids), torch.Tensor)
        torch.testing.assert_close(model.logits(ids), flex_logits, rtol=1e-5, atol=1e-5)


def test_dense_mask_attention_expands_kv_heads():
    """The dense-mask path repeats k/v heads itself (the memory-efficient kernel takes masks but not GQA): the
    result equals attention with the heads expanded by hand."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9)
    out = tg.attend(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_ttt_steps_hold_one_chunk_without_padded_rows():
    """32,768-token chunks at EVAL_SEQ_LEN 2048 are 16 rows: a step takes 16, not TTT_BATCH_SEQS=32 (half padding)."""
    h = tg.Hyperparameters()
    assert (h.ttt_chunk_tokens, h.eval_seq_len, h.ttt_batch_seqs) == (32_768, 2048, 32)
    assert tg.ttt_step_rows(h) == 16
    assert tg.ttt_step_rows(make_h(TTT_CHUNK_TOKENS=1024, EVAL_SEQ_LEN=64, TTT_BATCH_SEQS=8)) == 8  # capped
    assert tg.ttt_step_rows(make_h(TTT_CHUNK_TOKENS=32, EVAL_SEQ_LEN=64, EVAL_STRIDE=16)) == 1


def test_sgd_train_steps_carry_no_padding_on_8_ranks(monkeypatch):
    """On 8 ranks a 16-row step is 2 rows per rank, every one of them real text."""
    h = make_h(TTT_CHUNK_TOKENS=16 * 32, EVAL_SEQ_LEN=32, EVAL_STRIDE=16, TTT_BATCH_SEQS=32, TTT_EPOCHS=1)
    model = make_model(seed=0, TTT_CHUNK_TOKENS=16 * 32, EVAL_SEQ_LEN=32, EVAL_STRIDE=16)
    rows_seen = []
    monkeypatch.setattr(tg.dist, "all_reduce", lambda t, *a, **k: t)
    orig = model.forward
    monkeypatch.setattr(model, "forward", lambda x, y, reduction="mean": (rows_seen.append(x.clone()),
                                                                         orig(x, y, reduction))[1])
    tokens = torch.randint(2, 64, (16 * 32 + 1,))
    params = list(model.parameters())
    for rank in range(8):
        tg.sgd_train(model, tokens, torch.arange(16 * 32), params, torch.optim.SGD(params, lr=0.0), h,
                     tg.Runtime(torch.device("cpu"), rank, 8))
    assert len(rows_seen) == 8 and all(x.shape == (2, 32) for x in rows_seen)
    assert sorted(torch.cat(rows_seen)[:, 0].tolist()) == sorted(tokens[:-1].view(16, 32)[:, 0].tolist())


def test_muon_momentum_buffer_is_made_once():
    model = make_model(seed=0, NUM_LAYERS=1)
    muon = tg.build_optimizers(model, model.h, tg.Runtime(torch.device("cpu")))[1]
    p = muon.param_groups[0]["params"][0]
    ids = []
    for _ in range(3):
        model(rand_ids((2, 16)), rand_ids((2, 16), seed=1)).backward()
        muon.step()
        model.zero_grad(set_to_none=True)
        ids.append(muon.state[p]["momentum_buffer"].data_ptr())
    assert len(set(ids)) == 1


def test_ema_warm_up_fades_early_weights_in_short_runs_only():
    """decay_t = min(EMA_DECAY, (1+t)/(10+t)): at step 300 with 0.99 the first 100 steps weigh < 1e-4 (a constant
    0.99 leaves them 4.9 %); at the records' ~5,000 steps with 0.9965 the average is that of a constant decay."""
    def weights(decay, steps):
        w = torch.zeros(steps, dtype=torch.float64)
        w0 = 1.0  # the initial weights
        for t in range(1, steps + 1):
            d = min(decay, (1.0 + t) / (10.0 + t))
            w *= d
            w0 *= d
            w[t - 1] = 1.0 - d
        return w0, w

    w0, w = weights(0.99, 300)
    assert w0 + w[:100].sum() < 1e-4
    assert 0.99 ** 200 * (1 - 0.99 ** 100) > 0.04  # what a constant decay would leave of steps 1..100
    w0, w = weights(0.9965, 5000)
    const = torch.tensor([(1 - 0.9965) * 0.9965 ** (5000 - t) for t in range(1, 5001)], dtype=torch.float64)
    assert float((w - const).abs().sum()) < 1e-3
    # the class applies that decay
    model = make_model(seed=0, NUM_LAYERS=1)
    averager = tg.WeightAverager(model, make_h(NUM_LAYERS=1, AVERAGING="ema", EMA_DECAY=0.99))
    first = model.tok_emb.weight.detach().clone()
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    averager.update(1, 1.0)  # decay (1+1)/(10+1)
    expect = first + (1 - 2 / 11) * 1.0
    index = next(i for i, p in enumerate(model.parameters()) if p is model.tok_emb.weight)
    torch.testing.assert_close(averager.avg[index], expect, rtol=0, atol=1e-6)


def test_torch_floor_is_what_the_code_needs():
    """recompile_limit (set for compiled runs) exists from torch 2.7 on: requirements.txt must not allow less."""
    floor = re.search(r"^torch>=(\d+)\.(\d+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert floor and (int(floor.group(1)), int(floor.group(2))) >= (2, 7)
    assert hasattr(torch._dynamo.config, "recompile_limit")


def test_compile_guard_line_in_an_eager_run(tiny_hparams, sample_data):
    """Eager, a flex document mask compiles inside torch itself: the guard says it is off, not FAIL."""
    import dataclasses
    import sentencepiece as spm
    h = dataclasses.replace(tiny_hparams, attn_doc_mask=True, iterations=2, warmup_steps=0, val_loss_every=0)
    luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=h.tokenizer_path), h.vocab_size)
    val = tg.load_validation_tokens(str(sample_data / "fineweb_val_*.bin"), h.train_seq_len, h.vocab_size)[:257]
    lines = []
    torch.manual_seed(0)
    tg.train_model(h, tg.GPT(h), tg.Runtime(torch.device("cpu")), lines.append, val, luts, tg.CompileGuard())
    assert [line for line in lines if line.startswith("compile_guard:")] == ["compile_guard: off (eager)"]
