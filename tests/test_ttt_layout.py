"""The LoRA TTT layout of the 2026-04-27 record (issue 18): one adapter set per *virtual* layer (a looped layer gets
an independent set per pass), q/k/v on the normed block input, the "o" adapter from that same input added after
the projection, the MLP adapter a dim->dim bypass from the MLP's normed input added to its output, the head's;
A drawn once and kept across batches (TTT_LORA_WARM_A) or redrawn per batch, B reset per batch, fresh adapters
after each global phase."""
from __future__ import annotations

import copy

import pytest
import torch

import train_gpt as tg
from test_ttt_dataflow import RT, make_h, make_luts, make_stream, random_gpt

LOOPED = dict(NUM_LAYERS=4, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2)


def looped_model():
    h = make_h("lora", **LOOPED)
    model = random_gpt(h)
    model.set_looping(True)
    assert model.order == [0, 1, 2, 1, 2, 3]
    return h, model


def nonzero_adapters(model, h, seed=0):
    adapters = tg.make_adapters(model, h, torch.device("cpu"))
    tg.reset_adapters(adapters, seed, redraw_a=True)
    return adapters


def test_one_adapter_set_per_virtual_layer():
    h, model = looped_model()
    adapters = tg.make_adapters(model, h, torch.device("cpu"))
    assert len(adapters) == 2 * (5 * len(model.order) + 1)
    dim, kv, docs, r = h.model_dim, h.num_kv_heads * h.model_dim // h.num_heads, h.ttt_lora_docs, h.ttt_lora_rank
    outs = [dim, kv, kv, dim, dim] * len(model.order) + [h.vocab_size]
    assert [tuple(a.shape) for a in adapters[0::2]] == [(docs, r, dim)] * len(outs)
    assert [tuple(b.shape) for b in adapters[1::2]] == [(docs, n, r) for n in outs]


def test_each_pass_of_a_looped_layer_has_its_own_adapters():
    """Only the q adapter of slot 3 (the second pass of block 1) is non-zero: block 1's first pass is unchanged,
    its second pass changes; both passes' adapters get gradients; the same values in slot 1 act on the first pass."""
    h, model = looped_model()
    tokens = make_stream()[:2 * h.eval_seq_len].view(2, h.eval_seq_len)  # TTT_LORA_DOCS = 2 rows
    adapters = nonzero_adapters(model, h)
    calls = []
    hook = model.blocks[1].register_forward_hook(lambda m, a, o: calls.append(o.detach().clone()))

    def run():
        calls.clear()
        with tg.lora_attached(model, adapters, h):
            loss = model(tokens, tokens).float()
        return loss, list(calls)

    _, plain = run()
    with torch.no_grad():
        adapters[2 * (5 * 3 + 0) + 1].normal_(0, 0.5)  # slot 3, q: B
    loss, tuned = run()
    assert torch.equal(plain[0], tuned[0]) and not torch.allclose(plain[1], tuned[1], atol=1e-4)
    loss.backward()
    grads = [a.grad is not None and bool(a.grad.abs().sum() > 0) for a in adapters[1::2]]
    assert grads[5 * 1 + 0] and grads[5 * 3 + 0]  # both passes' q adapters learn ...
    with torch.no_grad():
        adapters[2 * (5 * 3 + 0) + 1].zero_()
        adapters[2 * (5 * 1 + 0) + 1].normal_(0, 0.5)  # ... and the same values in the first pass's slot
    _, first = run()                                    # act elsewhere: the sets are independent
    hook.remove()
    assert not torch.allclose(first[0], plain[0], atol=1e-4)


@pytest.mark.parametrize("which", [3, 4])
def test_o_and_mlp_adapters_are_bypasses_from_the_normed_inputs(which):
    """With one adapter on (3: o, 4: mlp), a parallel block's output moves by exactly scale * (n A^T) B^T, n the
    normed, LN-scaled input of the attention (o) or of the MLP (mlp); o is added after the projection."""
    h = make_h("lora", NUM_LAYERS=2, PARALLEL_RESID_FROM=0)
    torch.manual_seed(0)
    blk = tg.Block(h, 1)
    for p in blk.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    x, x0 = torch.randn(1, 7, h.model_dim), torch.randn(1, 7, h.model_dim)
    lora = [(torch.zeros(1, 3, h.model_dim), torch.zeros(1, n, 3), 2.0)
            for n in (h.model_dim, h.model_dim // 2, h.model_dim // 2, h.model_dim, h.model_dim)]
    with torch.no_grad():
        base = blk(x, x0, None, lora=lora)
        a, b = torch.randn(1, 3, h.model_dim), torch.randn(1, h.model_dim, 3)
        lora[which] = (a, b, 2.0)
        moved = blk(x, x0, None, lora=lora)
        x_in = blk.resid_mix[0] * x + blk.resid_mix[1] * x0
        n = tg.rms_norm(x_in) * blk.norm_scale
        gain = blk.attn_scale if which == 3 else blk.mlp_scale
        torch.testing.assert_close(moved - base, gain * ((n @ a.mT) @ b.mT * 2.0), rtol=1e-4, atol=1e-5)


def test_warm_a_is_kept_across_batches_and_redrawn_after_a_phase(monkeypatch):
    """TTT_LORA_WARM_A=1: every batch starts with B = 0 and the A the previous batch trained; after a global phase,
    A is a fresh draw. TTT_LORA_WARM_A=0: each batch starts from its own seeded draw."""
    tokens, luts = make_stream(), make_luts()
    seen, orig = [], tg.score_lora_batch

    def spy(model, toks, docs, h, luts_, rt, adapters, scores):
        seen.append(("batch", [a.detach().clone() for a in adapters]))
        orig(model, toks, docs, h, luts_, rt, adapters, scores)
        seen.append(("trained", [a.detach().clone() for a in adapters]))

    orig_sgd = tg.global_sgd
    monkeypatch.setattr(tg, "score_lora_batch", spy)
    monkeypatch.setattr(tg, "global_sgd", lambda *a: (seen.append(("phase", None)), orig_sgd(*a)))
    for warm in (1, 0):
        seen.clear()
        h = make_h("phased", TTT_LORA_WARM_A=warm, TTT_PHASES=1, TTT_PHASE_DOCS=4)
        tg.eval_lora(random_gpt(h), tokens, h, luts, RT)
        kinds = [k for k, _ in seen]
        assert kinds[:6] == ["batch", "trained", "batch", "trained", "phase", "batch"], kinds
        start1, trained1, start2, start3 = seen[0][1], seen[1][1], seen[2][1], seen[5][1]
        for state in (start1, start2, start3):
            assert all(bool((b == 0).all()) for b in state[1::2])  # B reset per batch
        assert not torch.equal(trained1[0], start1[0])  # A was trained in batch 1
        if warm:
            assert all(torch.equal(a2, a1) for a2, a1 in zip(start2[0::2], trained1[0::2]))  # kept
        else:
            assert not torch.equal(start2[0], trained1[0]) and not torch.equal(start2[0], start1[0])
        assert not torch.equal(start3[0], seen[3][1][0])  # fresh after the phase

