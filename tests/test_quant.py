"""Quantization and export: per-row rounding (SDClip, and the row-max rule), the AUTO_FIT grid, GPTQ (block
matrices and the tied embedding), LQER, int8 small tensors, tensor routing, the artifact format, the logit
the byte budget and its search, calibration (training shards only, inside the clock), and EMA/SWA."""
from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zstandard

import train_gpt as tg
from conftest import TINY_KNOBS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
FP16_TINIEST = 2.0 ** -24  # smallest positive (subnormal) float16
FP16_REL = 2.0 ** -11  # relative rounding of a normal float16
CPU_RT = tg.Runtime(torch.device("cpu"))


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def make_matrix(seed: int = 0) -> torch.Tensor:
    """Gaussian rows plus the awkward ones: heavy tails, a lone outlier, all zeros, tiny magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 192, generator=g)
    t = torch.distributions.StudentT(torch.tensor(1.5))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        w[1] = t.sample((192,))  # heavy tailed
        w[2] = t.sample((192,)) * 10.0
    w[3] = 0.0  # zero row
    w[4] = torch.randn(192, generator=g) * 1e-3  # tiny, but still normal fp16 scales for low bits
    w[5] = torch.randn(192, generator=g) * 1e-5  # tiny: fp16 subnormal scales
    w[6, 17] = 40.0  # one outlier in a Gaussian row
    w[7] = torch.rand(192, generator=g) * 2 - 1  # uniform
    w[8] = torch.randn(192, generator=g) * 1e3  # large
    return w


def row_error(w, w_hat):
    return (w.double() - w_hat.double()).square().sum(dim=1)


def deq_rows(q, s):
    return q.double() * s.double()[:, None]


def assert_rounding_bounds(w, q, s, code_max):
    """Per element: inside the clip range [-code_max*s, code_max*s] the error is at most half a step; outside it,
    the distance to the range's edge plus half a step (clamping)."""
    w64, s = w.double(), s.double()[:, None]
    err = (w64 - q.double() * s).abs()
    limit = code_max * s
    slack = 1e-6 * s + 1e-12
    inside = w64.abs() <= limit
    half = (s / 2 + slack).expand_as(w64)
    assert (err[inside] <= half[inside]).all()
    outside = (w64.abs() - limit + s / 2 + slack).expand_as(w64)
    assert (err[~inside] <= outside[~inside]).all()


# ----------------------------------------------------------------------------------------------
# 1. quantize_rows (SDClip and the row-max rule) and fake_quantize_rows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("clip_k", [None, 3.0, 13.0])
def test_quantize_rows_round_trip_bounds(bits, clip_k):
    """Codes are round-and-clamp onto row_scales' steps: int8 codes within +-qmax, fp16 scales, each value within
    half a step inside the clip range (and the clamping distance outside it), the zero row exactly zero. The
    row-max rule (clip_k None) uses the grid to its edge on every row and matches fake_quantize_rows' error."""
    w = make_matrix(bits)
    q, scale = tg.quantize_rows(w, bits, clip_k=clip_k)
    qmax = qmax_of(bits)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float16 and scale.shape == (w.size(0),)
    assert int(q.abs().max()) <= qmax
    assert torch.isfinite(scale.float()).all() and (scale.float() > 0).all()
    assert_rounding_bounds(w, q, scale, qmax)
    assert (q[3] == 0).all()  # the zero row stays exactly zero
    s = tg.row_scales(w, bits, clip_k)
    assert torch.equal(scale.float(), s)
    assert torch.equal(q.float(), torch.clamp(torch.round(w / s[:, None]), -qmax, qmax))
    normal = scale.float() >= 2.0 ** -14  # rows whose scale is a normal fp16 number
    if clip_k is None:
        assert (q.abs().amax(1)[normal] == qmax).all()  # row max / qmax: every row reaches the top code
        e_rows = row_error(w, deq_rows(q, scale))
        e_plain = row_error(w, tg.fake_quantize_rows(w, bits))  # the same rule with an fp32 scale
        tol = 1 + 2 * qmax * FP16_REL
        assert (e_rows[normal] <= e_plain[normal] * tol + 1e-12).all()
        assert (e_plain[normal] <= e_rows[normal] * tol + 1e-12).all()
    elif clip_k == 3.0:  # SDClip: the heavy-tailed rows and the outlier row are clipped (max far past 3 std)
        assert (q[[1, 2, 6]].abs().amax(1) == qmax).all()
        assert q[6, 17] == qmax


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_no_clip_when_clipping_cannot_help(bits):
    """The row-max rule (clip_k None) on rows exactly on its grid (scale a power of two): quantize_rows is exact
    and agrees with fake_quantize_rows."""
    qmax = qmax_of(bits)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-qmax, qmax + 1, (16, 64), generator=g)
    codes[:, 0] = qmax  # the row max sits on the top code
    codes[1::2, 0] = -qmax
    steps = 2.0 ** torch.randint(-10, 3, (16, 1), generator=g).float()
    w = codes.float() * steps
    q, scale = tg.quantize_rows(w, bits)
    assert torch.equal(scale.float(), steps.squeeze(1))  # rowmax / qmax exactly
    assert torch.equal(q.long(), codes)
    assert torch.equal(q.float() * scale.float()[:, None], w)
    assert torch.equal(tg.fake_quantize_rows(w, bits), w)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_tiny_rows_get_usable_scale(bits):
    """A non-zero row must never be stored as (non-zero codes, scale 0): its scale is at least the smallest
    positive fp16 number, so that the row decodes better than all zeros."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(4, 64, generator=g) * torch.tensor([[1e-7], [3e-7], [1e-6], [1e-4]])
    for clip_k in (None, 3.0):
        q, scale = tg.quantize_rows(w, bits, clip_k=clip_k)
        assert (scale.float() >= FP16_TINIEST).all()
        representable = w.abs().amax(1) >= 2 * FP16_TINIEST
        err = row_error(w, deq_rows(q, scale))
        assert (err[representable] < w.double().square().sum(1)[representable]).all()


def test_fake_quantize_rows_grid():
    w = make_matrix(1)
    for bits in (4, 6, 8):
        qmax = qmax_of(bits)
        fq = tg.fake_quantize_rows(w, bits)
        step = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / qmax
        k = fq / step
        assert (k - k.round()).abs().max() < 1e-3 and k.abs().max() <= qmax + 1e-3
        assert ((fq - w).abs() <= step / 2 * 1.0001 + 1e-12).all()  # no clipping: bound holds everywhere


# ----------------------------------------------------------------------------------------------
# 2. SDClip and the AUTO_FIT grid (fit_grid, step multiplier)
# ----------------------------------------------------------------------------------------------


def assert_fp16_scales(s, ref):
    """s: row_scales' output for the float64 reference steps `ref` (before fp16 rounding and the 2**-24 floor)."""
    assert s.dtype == torch.float32 and s.shape == ref.shape
    assert torch.equal(s, s.half().float())  # an fp16 number
    normal = ref >= 2.0 ** -14
    assert torch.allclose(s.double()[normal], ref[normal], rtol=FP16_REL * 1.01, atol=0)  # round to nearest
    sub = ~normal  # subnormal fp16: absolute spacing 2**-24, and never below 2**-24
    assert ((s.double() - ref.clamp_min(FP16_TINIEST)).abs()[sub] <= FP16_TINIEST / 2 * 1.01).all()
    assert (s >= FP16_TINIEST).all()
    return normal


@pytest.mark.parametrize("bits", [5, 6, 8])
@pytest.mark.parametrize("k", [2.5, 5.75, 13.0, 20.0])
@pytest.mark.parametrize("mult", [0.5, 1.0, 1.3])
def test_sdclip_row_scale(bits, k, mult):
    """SDClip: row step = k * row std (torch's, unbiased) / qmax, times the multiplier, rounded to fp16 and floored
    at 2**-24; it does not shrink to the row max. The row-max rule (clip_k None): row max / qmax times mult."""
    w = make_matrix(bits)
    qmax = qmax_of(bits)
    w64 = w.double()
    s = tg.row_scales(w, bits, clip_k=k, mult=mult)
    normal = assert_fp16_scales(s, k * w64.std(dim=1) / qmax * mult)
    assert normal.sum() >= 40 and s[3] == FP16_TINIEST  # the zero row: the floor
    assert_fp16_scales(tg.row_scales(w, bits, mult=mult), w64.abs().amax(dim=1) / qmax * mult)
    clip = s.double() * qmax / mult  # the clip range: k std
    if k == 2.5:  # heavy-tailed and outlier rows are clipped well inside their max at a small k
        for row in (1, 2, 6):
            assert clip[row] < 0.5 * w64[row].abs().max(), row
    assert clip[7] > 1.3 * w64[7].abs().max()  # uniform row: k std >= 1.44 max here, and the step is not capped
    # quantize_rows with clip_k rounds onto exactly these steps, in the code range of fit_grid
    code_max, m = tg.fit_grid(bits, mult)  # (int8 cannot widen: its multiplier stays >= 1)
    q, qs = tg.quantize_rows(w, bits, clip_k=k, mult=mult)
    s = tg.row_scales(w, bits, clip_k=k, mult=m)
    assert torch.equal(qs.float(), s)
    assert torch.equal(q.float(), torch.clamp(torch.round(w / s[:, None]), -code_max, code_max))
    assert_rounding_bounds(w, q, qs, code_max)


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("k", [2.5, 3.0])
def test_sdclip_clips_values_past_k_std(bits, k):
    """Values past k row std (by more than half a step) get the edge code +-qmax with their own sign; values
    inside round to the nearest step, unclamped. The row-max rule clips nothing."""
    w = make_matrix(30 + bits)
    qmax = qmax_of(bits)
    q, s = tg.quantize_rows(w, bits, clip_k=k)
    s64, w64 = s.double()[:, None], w.double()
    normal = (s.double() >= 2.0 ** -14)[:, None].expand_as(w64)
    edge = qmax * s64  # = k * row std, to fp16 precision
    assert torch.allclose(edge[normal[:, 0], 0], (k * w64.std(dim=1))[normal[:, 0]], rtol=FP16_REL * 1.01)
    beyond = w64.abs() > edge + s64 * (0.5 + 1e-4)
    assert beyond[1].any() and beyond[2].any() and beyond[6, 17]  # the heavy tails and the outlier
    tail = math.erfc(k * (1 + 0.5 / qmax) / math.sqrt(2))  # Gaussian rows: P(|z| > k std + half a step)
    assert tail / 3 < beyond[9:].float().mean().item() < 3 * tail
    assert torch.equal(q[beyond].long(), torch.sign(w[beyond]).long() * qmax)
    inside = (w64.abs() < edge - s64 * (0.5 + 1e-4)) & normal
    assert inside.float().mean() > 0.9
    assert torch.equal(q[inside].float(), torch.round(w / s.float()[:, None])[inside])
    assert (q[inside].abs() < qmax).all()
    q0, s0 = tg.quantize_rows(w, bits)  # row max / qmax: nothing needs clamping (normal-scale rows)
    rows = s0.float() >= 2.0 ** -14
    assert torch.equal(q0.float()[rows], torch.round(w / s0.float()[:, None])[rows])


def heavy_tailed_matrix(rows: int = 128, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Trained-like weights: Student-t rows (4 degrees of freedom; max ~6 std per row), row scales spread
    log-normally."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        w = torch.distributions.StudentT(torch.tensor(4.0)).sample((rows, cols))
    return w * torch.exp(0.3 * torch.randn(rows, 1, generator=g)) * 0.02


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_larger_sdclip_k_gives_fewer_bytes(bits):
    """On a trained-like heavy-tailed matrix: a larger k (coarser steps) gives strictly fewer compressed bytes of
    codes and clips fewer values; the error is least at an inner k (small k clips the tails, large k rounds
    coarsely), which is why k is a knob per family."""
    w = heavy_tailed_matrix()
    qmax = qmax_of(bits)
    ks = (2.0, 3.0, 4.0, 6.0, 8.0, 11.5, 16.0, 24.0)
    sizes, clipped, errors = [], [], []
    zstd = zstandard.ZstdCompressor(level=19)
    for k in ks:
        q, s = tg.quantize_rows(w, bits, clip_k=k)
        sizes.append(len(zstd.compress(q.numpy().tobytes())))
        clipped.append((q.abs() == qmax).float().mean().item())
        errors.append(row_error(w, deq_rows(q, s)).sum().item())
    assert all(b < a for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] < 0.7 * sizes[0], sizes
    assert all(b <= a for a, b in zip(clipped, clipped[1:])), clipped
    assert clipped[0] > 0.02 and clipped[-1] < 1e-4, clipped
    best = errors.index(min(errors))
    assert 0 < best < len(ks) - 1, errors
    assert errors[0] > 3 * errors[best] and errors[-1] > 1.5 * errors[best], errors


def baseline_int8(t: torch.Tensor):
    """The challenge baseline script's per-row int8 rule (its quantize_float_tensor, for a matrix), restated."""
    clip = torch.quantile(t.float().abs(), 0.9999984, dim=1)
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    clipped = torch.maximum(torch.minimum(t.float(), clip[:, None]), -clip[:, None])
    return torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8), scale.half()


@pytest.mark.parametrize("spread", [0.02, 1.0, 30.0])
def test_sdclip_k0_is_the_challenge_baselines_int8_clip(spread):
    """clip_k 0 (SDCLIP_*_K=0, the naive_baseline preset's export): the baseline script's rule, a clip at its
    quantile of |w| per row (about the row max) and a step floor of 1/127. Same fp16 scales; codes equal but for
    rounding on the fp16 scale where the baseline rounds on the fp32 one, off by at most one step."""
    w = make_matrix(7)[:, :160] * spread
    w[3] = 0.0
    q, s = tg.quantize_rows(w, 8, clip_k=0.0)
    q_ref, s_ref = baseline_int8(w)
    assert torch.equal(s, s_ref)
    assert (q.int() - q_ref.int()).abs().max() <= 1 and (q != q_ref).float().mean() < 0.01
    assert torch.equal(tg.row_scales(w, 8, clip_k=0.0), s.float())
    small = w.abs().amax(1) < 0.99  # rows of small weights: the floor, 1/127 steps, part of the code range used
    assert small.sum() >= (40 if spread == 0.02 else 1)
    assert (s.float()[small] == torch.tensor(1 / 127).half().float()).all() and (q[small].abs().amax(1) < 127).all()
    h = tg.Hyperparameters.from_env({"PRESET": "naive_baseline"})
    assert {tg.sdclip_k(n, h) for n in ("tok_emb.weight", "blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight")} == {0}
    for knob in ("SDCLIP_ATTN_K", "SDCLIP_MLP_K", "SDCLIP_EMBED_K"):
        with pytest.raises(tg.KnobError, match="SDCLIP"):
            tg.Hyperparameters.from_env({knob: "-1"})


def test_sdclip_k_per_family(tiny_hparams):
    """sdclip_k: attention matrices SDCLIP_ATTN_K, MLP matrices SDCLIP_MLP_K, the tied embedding SDCLIP_EMBED_K,
    the bigram table (int6 like attention) SDCLIP_ATTN_K; always a float. quantize_state steps every per-row
    matrix with its family's k, with GPTQ or without."""
    h = dataclasses.replace(tiny_hparams, sdclip_attn_k=3.0, sdclip_mlp_k=4.0, sdclip_embed_k=5.0)
    family_k = {"attn": 3.0, "mlp": 4.0, "embed": 5.0, "bigram": 3.0}
    for name in ("blocks.0.attn.c_q.weight", "blocks.1.attn.c_k.weight", "blocks.1.attn.c_v.weight",
                 "blocks.2.attn.proj.weight", "blocks.1.mlp.fc.weight", "blocks.3.mlp.proj.weight", "tok_emb.weight",
                 "bigram.table.weight"):
        k = tg.sdclip_k(name, h)
        assert type(k) is float and k == family_k[tg.tensor_family(name)], name
    assert tg.sdclip_k("bigram.table.weight", dataclasses.replace(h, sdclip_attn_k=7.5)) == 7.5
    model = randomized_model(h, seed=3)
    state = model.state_dict()
    g = torch.Generator().manual_seed(0)
    hessians = {}
    for name in ("blocks.0.attn.c_q.weight", "blocks.1.mlp.fc.weight", "blocks.2.mlp.proj.weight"):
        x = torch.randn(4 * state[name].size(1), state[name].size(1), generator=g)
        hessians[name] = x.T @ x / x.size(0)
    plain, gptq = tg.quantize_state(model, h), tg.quantize_state(model, h, hessians)
    rows = {n for n, e in plain.items() if "q" in e and tg.tensor_bits(n, h)}
    assert {"tok_emb.weight", "bigram.table.weight", "blocks.3.attn.c_v.weight", "blocks.3.mlp.proj.weight"} <= rows
    for name in rows:
        ref = tg.row_scales(state[name].float(), tg.tensor_bits(name, h), clip_k=family_k[tg.tensor_family(name)])
        for qs in (plain, gptq):
            assert torch.equal(qs[name]["scale"].float(), ref), name
        assert torch.equal(gptq[name]["q"], plain[name]["q"]) == (name not in hessians), name  # GPTQ really ran


def test_fit_grid():
    """Finer steps (mult < 1) widen the code range so that code_max * mult stays within one step of qmax (the
    clip range is kept), never past int8's 127; coarser steps keep qmax."""
    assert tg.fit_grid(6, 1.0) == (31, 1.0) and tg.fit_grid(6, 2.0) == (31, 2.0)
    assert tg.fit_grid(6, 0.5) == (62, 0.5) and tg.fit_grid(5, 0.25) == (60, 0.25)
    assert tg.fit_grid(6, 0.1) == (127, 31 / 127)  # capped: steps no finer than qmax/127
    assert tg.fit_grid(8, 0.5) == (127, 1.0)  # int8 cannot widen
    for bits in range(2, 9):
        qmax = qmax_of(bits)
        for mult in (0.05, 0.25, 0.3, 0.5, 0.77, 0.99, 1.0, 1.01, 3.0, 8.0):
            code_max, m = tg.fit_grid(bits, mult)
            assert qmax <= code_max <= 127
            if mult >= 1:
                assert (code_max, m) == (qmax, mult)
                continue
            assert m == max(mult, qmax / 127)
            assert code_max * m <= qmax + 1e-9  # the clip range never grows...
            assert code_max == 127 or (code_max + 1) * m > qmax  # ...and shrinks by less than one step


@pytest.mark.parametrize("bits", [5, 6])
@pytest.mark.parametrize("clip_k", [None, 3.0])
def test_quantize_rows_with_step_multiplier(bits, clip_k):
    """mult scales every row step (exactly, for powers of two), widens the codes for mult < 1 keeping the clip
    range, and the round-trip error bound holds on the wider grid; the error falls as the steps get finer."""
    w = make_matrix(20 + bits)
    qmax = qmax_of(bits)
    q1, s1 = tg.quantize_rows(w, bits, clip_k=clip_k)
    errors = {}
    for mult in (0.25, 0.5, 1.0, 2.0):
        q, s = tg.quantize_rows(w, bits, clip_k=clip_k, mult=mult)
        code_max, m = tg.fit_grid(bits, mult)
        assert int(q.abs().max()) <= code_max
        big = s1.float() >= 2.0 ** -12  # away from fp16 subnormals, a power-of-two multiple is exact
        assert torch.equal(s.float()[big], s1.float()[big] * m)
        if mult < 1:
            assert int(q.abs().max()) > qmax  # the wider codes are used
            clip = (code_max * s.double())[big]
            assert ((clip <= qmax * s1.double()[big]) & (clip > (qmax * s1.double() - s.double())[big])).all()
        assert_rounding_bounds(w, q, s, code_max)
        errors[mult] = row_error(w, deq_rows(q, s))[9:].sum().item()
    assert errors[0.25] < errors[0.5] < errors[1.0] < errors[2.0]
    assert errors[0.5] < 0.5 * errors[1.0]  # about 4x less with half the step, at least 2x


# ----------------------------------------------------------------------------------------------
# 3. GPTQ
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 2048, 256, 128
    z = torch.randn(n, d_in, generator=g)
    a = torch.randn(d_in, d_in, generator=g) / d_in ** 0.5
    x = z @ a + 0.05 * torch.randn(n, d_in, generator=g)  # strongly correlated input features
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    return x, w


def out_err(x, w, w_hat):
    return (x.double() @ (w.double() - w_hat.double()).T).square().sum().item()


@pytest.mark.parametrize("bits", [4, 6])
def test_gptq_beats_rounding(calib, bits):
    x, w = calib
    h = x.T @ x / x.size(0)
    q, s = tg.gptq_quantize(w, h, bits, block=64, damp=0.01)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert int(q.abs().max()) <= qmax_of(bits)
    e_gptq = out_err(x, w, deq_rows(q, s))
    q_r, s_r = tg.quantize_rows(w, bits)
    assert e_gptq < 0.9 * out_err(x, w, deq_rows(q_r, s_r))
    assert e_gptq < 0.9 * out_err(x, w, tg.fake_quantize_rows(w, bits))
    for k in (3.0, 13.0):  # with SDClip's steps (as the export uses it), against rounding onto the same steps
        q_k, s_k = tg.gptq_quantize(w, h, bits, clip_k=k)
        q_kr, s_kr = tg.quantize_rows(w, bits, clip_k=k)
        assert torch.equal(s_k, s_kr)
        assert out_err(x, w, deq_rows(q_k, s_k)) < 0.9 * out_err(x, w, deq_rows(q_kr, s_kr)), k


def test_gptq_block_size_factor_reuse_and_mult(calib):
    """Lazy block updates are an implementation detail (block 16 and one block of 256 agree); a precomputed
    gptq_factor gives the same codes; finer steps (mult 0.5) use the wider codes and cut the error; SDClip steps."""
    x, w = calib
    h = x.T @ x / x.size(0)
    q1, s1 = tg.gptq_quantize(w, h, 5, block=16)
    q2, s2 = tg.gptq_quantize(w, h, 5, block=256)
    assert torch.equal(s1, s2)
    assert (q1 != q2).float().mean() < 0.01  # only float-association ties may flip
    q3, s3 = tg.gptq_quantize(w, h, 5, factor=tg.gptq_factor(h))
    assert torch.equal(q3, tg.gptq_quantize(w, h, 5)[0]) and torch.equal(s3, s1)
    qf, sf = tg.gptq_quantize(w, h, 5, mult=0.5)
    assert 15 < int(qf.abs().max()) <= tg.fit_grid(5, 0.5)[0]
    assert out_err(x, w, deq_rows(qf, sf)) < 0.5 * out_err(x, w, deq_rows(q1, s1))
    _, sk = tg.gptq_quantize(w, h, 5, clip_k=3.0)
    assert torch.equal(sk.float(), tg.row_scales(w, 5, clip_k=3.0))


def test_gptq_dead_columns(calib):
    x, w = calib
    x = x.clone()
    dead = [0, 7, 100, 255]
    x[:, dead] = 0.0
    h = x.T @ x / x.size(0)
    q, s = tg.gptq_quantize(w, h, 4)
    w_hat = deq_rows(q, s)
    assert torch.isfinite(w_hat).all() and (s.float() > 0).all()
    assert (q[:, dead] == 0).all()  # dead inputs carry nothing; their weights need no codes
    # gptq_factor: (column order, upper Cholesky factor of the damped inverse Hessian in that order, dead mask)
    factor = tg.gptq_factor(h)
    assert isinstance(factor, tuple) and len(factor) == 3
    perm, U, dead_mask = factor
    assert dead_mask.dtype == torch.bool and dead_mask.nonzero().flatten().tolist() == dead
    diag = torch.diag(h).clone()
    diag[dead] = 1.0  # dead columns get a unit diagonal
    assert sorted(perm.tolist()) == list(range(h.size(0))) and (diag[perm][1:] <= diag[perm][:-1]).all()
    assert torch.equal(U, U.triu()) and (torch.diag(U) > 0).all()
    hp = h.double().clone()
    hp[dead, dead] = 1.0
    hp = hp[perm][:, perm] + 0.01 * diag.double().mean() * torch.eye(h.size(0), dtype=torch.float64)
    assert torch.allclose(U.double().T @ U.double(), torch.linalg.inv(hp), rtol=1e-3, atol=1e-3 * float(
        torch.linalg.inv(hp).abs().max()))
    assert torch.equal(tg.gptq_quantize(w, h, 4, factor=factor)[0], q)
    # the scale of a GPTQ row ignores its dead columns: row_scales of the weights with those columns zeroed
    w_live = w.clone()
    w_live[:, dead] = 0.0
    _, s_k = tg.gptq_quantize(w, h, 4, clip_k=3.0)
    assert torch.equal(s_k.float(), tg.row_scales(w_live, 4, clip_k=3.0))
    q_r, s_r = tg.quantize_rows(w, 4)
    assert out_err(x, w, w_hat) < 0.9 * out_err(x, w, deq_rows(q_r, s_r))


def test_gptq_all_dead_hessian_is_finite():
    w = torch.randn(8, 32)
    q, s = tg.gptq_quantize(w, torch.zeros(32, 32), 6)
    assert torch.isfinite(s.float()).all() and (q == 0).all()


# ----------------------------------------------------------------------------------------------
# 4. Hessians from the model; GPTQ on the tied embedding
# ----------------------------------------------------------------------------------------------


def randomized_model(h, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(dataclasses.replace(h, ortho_init=False))  # weights are redrawn below; skip the QR
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
            else:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    return model


@torch.no_grad()
def perturbed_model(h, seed=0):
    """GPT(h) at its init, every weight moved a little: the hidden states are those of a real init."""
    torch.manual_seed(seed)
    model = tg.GPT(h)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    return model


def train_batches(h, n_seqs=16, per_batch=8, split="train"):
    loader = tg.DistributedTokenLoader(os.path.join(h.data_path, f"fineweb_{split}_*.bin"), h.vocab_size, 0, 1,
                                       torch.device("cpu"), n_seqs * h.train_seq_len, h.train_seq_len,
                                       prefetch=False)
    x, y = loader.next_batch()
    return [(x[i:i + per_batch], y[i:i + per_batch]) for i in range(0, n_seqs, per_batch)]


@pytest.fixture(scope="module")
def embed_setup(sample_data):
    h = tg.Hyperparameters.from_env({**TINY_KNOBS, "DATA_PATH": str(sample_data)})
    model = perturbed_model(h, seed=7)
    batches = train_batches(h)
    names = {"tok_emb.weight", "blocks.1.mlp.proj.weight", "blocks.0.attn.c_q.weight"}
    return h, model, batches, tg.collect_hessians(model, batches, names, CPU_RT)


def test_collect_hessians_match_direct_computation(embed_setup):
    """tok_emb.weight: the Hessian of the final hidden state (the head's input), straight from model.hidden;
    a block linear: the Hessian of its own input, caught here with a hook of the test's own."""
    h, model, batches, hessians = embed_setup
    assert set(hessians) == {"tok_emb.weight", "blocks.1.mlp.proj.weight", "blocks.0.attn.c_q.weight"}
    with torch.no_grad():
        hid = torch.cat([model.hidden(x).reshape(-1, h.model_dim) for x, _ in batches]).double()
    direct = hid.T @ hid / hid.size(0)
    assert hessians["tok_emb.weight"].shape == (h.model_dim, h.model_dim)
    assert torch.allclose(hessians["tok_emb.weight"].double(), direct, rtol=1e-4, atol=1e-6)
    seen = {}
    hooks = [model.get_submodule(n[:-len(".weight")]).register_forward_hook(
        lambda m, inp, out, n=n: seen.setdefault(n, []).append(inp[0].detach().reshape(-1, inp[0].size(-1))))
        for n in ("blocks.1.mlp.proj.weight", "blocks.0.attn.c_q.weight")]
    with torch.no_grad():
        for x, _ in batches:
            model.hidden(x)
    for hk in hooks:
        hk.remove()
    for name, xs in seen.items():
        a = torch.cat(xs).double()
        assert torch.allclose(hessians[name].double(), a.T @ a / a.size(0), rtol=1e-4, atol=1e-6), name
    # not the same matrix as any other input's: the embedding entry is really the head's input
    assert not torch.allclose(hessians["tok_emb.weight"], hessians["blocks.0.attn.c_q.weight"], atol=1e-3)


@pytest.mark.parametrize("bits", [5, 8])
def test_gptq_on_tied_embedding_beats_rounding(embed_setup, sample_data, bits):
    """GPTQ of the tied embedding with the head-input Hessian: less error in the head's output (logits) than
    plain rounding, on the calibration tokens and on held-out validation tokens."""
    h, model, batches, hessians = embed_setup
    W = model.tok_emb.weight.detach()
    q, s = tg.gptq_quantize(W, hessians["tok_emb.weight"], bits)
    q_r, s_r = tg.quantize_rows(W, bits)
    with torch.no_grad():
        calib_hid = torch.cat([model.hidden(x).reshape(-1, h.model_dim) for x, _ in batches])
        val_hid = torch.cat([model.hidden(x).reshape(-1, h.model_dim) for x, _ in train_batches(h, split="val")])
    for hid, bound in ((calib_hid, 0.85), (val_hid, 0.95)):
        assert out_err(hid, W, deq_rows(q, s)) < bound * out_err(hid, W, deq_rows(q_r, s_r))


def test_quantize_state_gptq_embed(embed_setup):
    """With the tok_emb Hessian, quantize_state runs GPTQ on the embedding (its head error drops); calibrate
    collects that Hessian only with GPTQ_EMBED=1."""
    h, model, batches, hessians = embed_setup
    W = model.tok_emb.weight.detach()
    with torch.no_grad():
        hid = torch.cat([model.hidden(x).reshape(-1, h.model_dim) for x, _ in batches])
    with_h = tg.dequantize_entry(tg.quantize_state(model, h, hessians)["tok_emb.weight"])
    without = tg.dequantize_entry(tg.quantize_state(model, h, {})["tok_emb.weight"])
    assert out_err(hid, W, with_h) < 0.9 * out_err(hid, W, without)
    h2 = dataclasses.replace(h, gptq_calib_tokens=256)
    on = tg.calibrate(dataclasses.replace(h2, gptq_embed=True), model, CPU_RT, lambda m: None, 0.0)
    off = tg.calibrate(h2, model, CPU_RT, lambda m: None, 0.0)
    assert "tok_emb.weight" in on and "tok_emb.weight" not in off
    assert set(on) - {"tok_emb.weight"} == set(off) and len(off) == 6 * h.num_layers


# ----------------------------------------------------------------------------------------------
# 5. quantize_state routing, int8 small tensors
# ----------------------------------------------------------------------------------------------


def always_int8(name: str) -> bool:
    """The attention gates and the U-Net skip gates: int8 whatever QUANT_SMALL_BITS says (as the records store
    them); every other small tensor is fp16 unless QUANT_SMALL_BITS=8."""
    return name.endswith(".attn.gate_w") or name == "skip_gates"


def test_quantize_state_routes_tensors(tiny_hparams):
    h = dataclasses.replace(tiny_hparams, quant_embed_bits=7, quant_bigram_bits=4, quant_attn_bits=6,
                            quant_mlp_bits=5, passthrough_max_numel=2048, quant_small_bits=0)
    model = randomized_model(h)
    state = model.state_dict()
    qs = tg.quantize_state(model, h)
    assert set(qs) == set(state)
    expected = {"tok_emb.weight": 7, "bigram.table.weight": 4}
    for i in range(h.num_layers):
        expected[f"blocks.{i}.attn.c_q.weight"] = 6
        expected[f"blocks.{i}.attn.proj.weight"] = 6
        expected[f"blocks.{i}.mlp.fc.weight"] = 5
        expected[f"blocks.{i}.mlp.proj.weight"] = 5
    for name, t in state.items():
        e = qs[name]
        if name in expected:
            assert "q" in e and e["bits"] == expected[name] and e["group"] == t.shape[1], name
            assert e["q"].dtype == torch.int8 and e["q"].shape == t.shape
            assert e["scale"].dtype == torch.float16 and e["scale"].shape == (t.shape[0],)
            q, scale = tg.quantize_rows(t, e["bits"], tg.sdclip_k(name, h))  # SDClip steps, no Hessians
            assert torch.equal(e["q"], q) and torch.equal(e["scale"], scale), name
            assert 0 < int(e["q"].abs().max()) <= qmax_of(e["bits"])
        elif always_int8(name):  # attention and skip gates are int8 (one scale per row) even with QUANT_SMALL_BITS=0
            assert e["bits"] == 8 and e["group"] == t.shape[-1] and e["q"].shape == t.shape, name
        else:  # c_k / c_v hold exactly PASSTHROUGH_MAX_NUMEL (2048) elements; gains, mixes, bigram.proj: fp16
            assert set(e) == {"data"}, name
            assert e["data"].dtype == torch.float16 and torch.equal(e["data"], t.half())
    assert qs["blocks.0.attn.c_k.weight"]["data"].numel() == 2048
    assert tg.tensor_bits("blocks.3.attn.c_v.weight", h) == 6 and tg.tensor_bits("blocks.3.mlp.proj.weight", h) == 5
    assert tg.tensor_bits("bigram.proj.weight", h) == 0 and tg.tensor_bits("skip_weights", h) == 0
    assert tg.tensor_family("blocks.0.attn.gate_w") == "small" and tg.tensor_family("blocks.0.lane_write") == "small"


def test_quant_small_bits_int8(tiny_hparams):
    """QUANT_SMALL_BITS=8: every small tensor (no bits, or at most PASSTHROUGH_MAX_NUMEL values) except 0-d
    scalars becomes int8 codes with one fp16 scale per row (max|row| / 127.5), each value within half a step;
    the artifact shrinks by about the bytes the fp16 copies took. (Gates are int8 either way.)"""
    h0 = dataclasses.replace(tiny_hparams, passthrough_max_numel=2048, zstd_level=3, attn_gate=True,
                             skip_gates=True, quant_small_bits=0)
    h8 = dataclasses.replace(h0, quant_small_bits=8)
    model = randomized_model(h0, seed=11)
    state = model.state_dict()
    q0, q8 = tg.quantize_state(model, h0), tg.quantize_state(model, h8)
    small = {n for n, t in state.items() if tg.tensor_bits(n, h0) == 0 or t.numel() <= h0.passthrough_max_numel}
    assert {"blocks.0.attn.c_k.weight", "blocks.0.attn.gate_w", "skip_gates", "blocks.0.resid_mix",
            "smear.gate", "bigram.scale"} <= small
    assert {n for n in small if "q" in q0[n]} == {n for n in small if always_int8(n)} == {
        *(f"blocks.{i}.attn.gate_w" for i in range(h0.num_layers)), "skip_gates"}
    for name in small:
        if always_int8(name):
            assert all(torch.equal(q8[name][k], v) if torch.is_tensor(v) else q8[name][k] == v
                       for k, v in q0[name].items()), name
    for name in small:
        t, e = state[name].float(), q8[name]
        if t.ndim == 0:
            assert set(e) == {"data"}, name
            continue
        assert e["bits"] == 8 and e["group"] == t.shape[-1] and e["q"].dtype == torch.int8, name
        assert e["q"].shape == t.shape and e["scale"].dtype == torch.float16
        rows = t.reshape(-1, t.shape[-1])
        assert e["scale"].shape == (rows.size(0),)
        ref = (rows.abs().amax(1) / 127.5).half().float().clamp_min(FP16_TINIEST)
        assert torch.equal(e["scale"].float(), ref), name
        err = (tg.dequantize_entry(e) - t).abs().reshape(rows.shape)
        assert (err <= e["scale"].float()[:, None] * (0.5 + 128 * FP16_REL) + 1e-12).all(), name
        assert int(e["q"].min()) >= -128 and int(e["q"].max()) <= 127
    for name in set(q0) - small:  # the per-row matrices are unchanged
        assert torch.equal(q8[name]["q"], q0[name]["q"])
    size = {b: len(tg.serialize_artifact(q, tg.model_config(h, False), h)) for b, q, h in ((0, q0, h0), (8, q8, h8))}
    fp16_bytes = sum(2 * state[n].numel() for n in small if "data" in q0[n] and state[n].ndim)
    assert size[0] - size[8] > 0.2 * fp16_bytes  # (about 0.27 measured: fp16 copies compress somewhat too)


# ----------------------------------------------------------------------------------------------
# 6. LQER
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lqer_setup(sample_data):
    h = tg.Hyperparameters.from_env({**TINY_KNOBS, "DATA_PATH": str(sample_data), "LQER_RANK": "4",
                                      "LQER_TENSORS": "3", "QUANT_MLP_BITS": "4", "ZSTD_LEVEL": "3"})
    model = randomized_model(h, seed=5)
    with torch.no_grad():  # a low-rank part in every matrix: what LQER is for
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if p.ndim == 2 and tg.tensor_bits(name, h):
                p.add_(torch.randn(p.size(0), 2, generator=g) @ torch.randn(2, p.size(1), generator=g) * 0.3)
    return h, model, tg.quantize_state(model, h), tg.quantize_state(model, dataclasses.replace(h, lqer_rank=0))


def test_lqer_picks_worst_tensors_and_stores_int2_int4(lqer_setup):
    h, model, qs, plain = lqer_setup
    state = model.state_dict()
    errors = {n: (state[n].float() - tg.dequantize_entry(e)).norm().item() for n, e in plain.items()
              if "q" in e and e["q"].ndim == 2 and tg.tensor_family(n) != "small"}
    assert len(errors) > 10
    worst = set(sorted(errors, key=errors.get, reverse=True)[:3])
    corrected = {n[:-len(".lqer_a")] for n in qs if n.endswith(".lqer_a")}
    assert corrected == worst
    assert set(qs) == set(plain) | {n + s for n in worst for s in (".lqer_a", ".lqer_b")}
    for name in plain:  # the base codes are untouched
        assert all(torch.equal(qs[name][k], v) if torch.is_tensor(v) else qs[name][k] == v
                   for k, v in plain[name].items()), name
    for name in worst:
        out_f, in_f = state[name].shape
        a, b = qs[name + ".lqer_a"], qs[name + ".lqer_b"]
        assert a["bits"] == 2 and a["q"].shape == (out_f, 4) and a["q"].dtype == torch.int8
        assert int(a["q"].min()) >= -2 and int(a["q"].max()) <= 1 and a["scale"].numel() == 1
        assert a["group"] == a["q"].numel()
        assert b["bits"] == 4 and b["q"].shape == (4, in_f) and b["group"] == 64
        assert int(b["q"].min()) >= -8 and int(b["q"].max()) <= 7 and b["scale"].numel() == 4 * in_f // 64
        assert len(set(a["q"].flatten().tolist())) >= 3 and len(set(b["q"].flatten().tolist())) >= 8  # in use
    one = tg.quantize_state(model, dataclasses.replace(h, lqer_tensors=1))
    assert [n for n in one if n.endswith(".lqer_a")] == [max(errors, key=errors.get) + ".lqer_a"]


def test_lqer_dequantize_adds_the_correction(lqer_setup):
    h, model, qs, plain = lqer_setup
    state = model.state_dict()
    deq, deq_plain = tg.dequantize_state(qs), tg.dequantize_state(plain)
    assert set(deq) == set(state)  # the factors are not weights of their own
    corrected = [n[:-len(".lqer_a")] for n in qs if n.endswith(".lqer_a")]
    for name in state:
        if name not in corrected:
            assert torch.equal(deq[name], deq_plain[name]), name
            continue
        ab = tg.dequantize_entry(qs[name + ".lqer_a"]) @ tg.dequantize_entry(qs[name + ".lqer_b"])
        assert torch.allclose(deq[name], deq_plain[name] + ab, atol=1e-6)
        e_plain = (state[name] - deq_plain[name]).norm().item()
        e_lqer = (state[name] - deq[name]).norm().item()
        assert e_lqer < 0.97 * e_plain, (name, e_plain, e_lqer)


def test_lqer_artifact_round_trip_is_self_describing(lqer_setup):
    """The artifact with LQER entries loads into a fresh model under knobs that know nothing of LQER (nor of the
    model's shape, as EVAL_ONLY does): the weights are exactly dequantize_state's, LQER included."""
    h, model, qs, _ = lqer_setup
    blob = tg.serialize_artifact(qs, tg.model_config(h, False), h)
    config, back = tg.deserialize_artifact(blob)
    assert set(back) == set(qs)
    for name, e in qs.items():
        for k, v in e.items():
            assert (back[name][k] == v) if not torch.is_tensor(v) else torch.equal(back[name][k], v), (name, k)
    other = tg.Hyperparameters()  # the default (512-dim) shape, LQER_RANK=0
    loaded = tg.load_artifact_into(None, blob, other, torch.device("cpu"))
    assert loaded.h.model_dim == h.model_dim and loaded.h.num_layers == h.num_layers
    deq = tg.dequantize_state(qs)
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, deq[name]), name


# ----------------------------------------------------------------------------------------------
# 7. artifact format
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_artifact(sample_data):
    h = tg.Hyperparameters.from_env({**TINY_KNOBS, "DATA_PATH": str(sample_data), "ZSTD_LEVEL": "3",
                                     "QUANT_SMALL_BITS": "8"})  # int8 gains and mixes: a group of small codes
    qs = tg.quantize_state(randomized_model(h, seed=1), h)
    return h, qs, tg.serialize_artifact(qs, tg.model_config(h, looping=True), h)


def test_artifact_round_trip(small_artifact):
    h, qs, blob = small_artifact
    assert blob[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame first (the head)
    config, back = tg.deserialize_artifact(blob)
    assert config == tg.model_config(h, looping=True)
    assert set(back) == set(qs)
    for name, e in qs.items():
        assert set(back[name]) == set(e), name
        for k, v in e.items():
            assert (back[name][k] == v) if not torch.is_tensor(v) else torch.equal(back[name][k], v), (name, k)
    deq = tg.dequantize_state(back)
    for name, e in qs.items():
        if "q" in e and e["q"].ndim == 2 and e["group"] == e["q"].shape[1]:  # per-row matrices
            assert torch.equal(deq[name], e["q"].float() * e["scale"].float()[:, None])
        elif "q" in e:  # groups of `group` consecutive values
            flat = e["q"].float().reshape(-1, e["group"]) * e["scale"].float()[:, None]
            assert torch.equal(deq[name], flat.reshape(e["q"].shape))
        else:
            assert torch.equal(deq[name], e["data"].float())
        assert deq[name].dtype == torch.float32
    # the head's zstd level changes the bytes, not the content; the codes' frames do not depend on it
    level19 = tg.serialize_artifact(qs, config, dataclasses.replace(h, zstd_level=19))
    assert level19 != blob and tg.deserialize_artifact(level19)[0] == config
    assert split_frames(level19)[1] == split_frames(blob)[1]


def test_corrupt_artifacts_raise_value_error(small_artifact):
    """Structural damage is a ValueError naming the problem, never accepted or leaked as another exception."""
    h, qs, blob = small_artifact
    head, frames = split_frames(blob)
    j = next(j for j, f in enumerate(frames) if len(zstandard.ZstdDecompressor().decompress(f)) !=
             len(zstandard.ZstdDecompressor().decompress(frames[0])))
    cases = {"truncated": blob[:-16], "trailing bytes": blob + b"\x00\x00\x00\x00", "not zstd": b"X" + blob[1:],
             "empty": b"", "not a torch file": zstandard.ZstdCompressor().compress(b"hello" * 50),
             "head only": head, "a frame missing": head + b"".join(frames[1:]),
             "frames swapped": head + b"".join([frames[j], *frames[1:j], frames[0], *frames[j + 1:]])}
    for what, data in cases.items():
        with pytest.raises(ValueError, match="corrupt artifact"):
            tg.deserialize_artifact(data)
    for old in ("parameter-golf-artifact-2", "parameter-golf-artifact-3"):  # earlier formats are refused
        buf = io.BytesIO()
        torch.save({"magic": old, "config": {}}, buf)
        with pytest.raises(ValueError, match="bad magic"):
            tg.deserialize_artifact(zstandard.ZstdCompressor().compress(buf.getvalue()))
    payload = head_payload(blob)  # format 4 without its group table: refused as well
    with pytest.raises(ValueError, match="corrupt artifact"):
        tg.deserialize_artifact(repack({k: v for k, v in payload.items() if k != "groups"}, frames))
    tg.deserialize_artifact(blob)


def split_frames(blob: bytes) -> tuple[bytes, list[bytes]]:
    """The artifact cut into its frames: the head, then one frame per group of codes (the sizes the head gives)."""
    decoder = zstandard.ZstdDecompressor().decompressobj()
    payload = torch.load(io.BytesIO(decoder.decompress(blob)), weights_only=True)
    rest = decoder.unused_data
    frames, at = [], 0
    for _, size in payload["groups"]:
        frames.append(rest[at:at + size])
        at += size
    assert at == len(rest)
    return blob[:len(blob) - len(rest)], frames


def head_payload(blob: bytes) -> dict:
    """The torch.save payload of an artifact's head frame."""
    return torch.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(split_frames(blob)[0])), weights_only=True)


def repack(payload: dict, frames: list[bytes]) -> bytes:
    """A head payload saved and compressed again (with a checksum, as serialize_artifact does), then the frames."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(buf.getvalue()) + b"".join(frames)


def test_artifact_layout(small_artifact):
    """Format 4: a head frame (config, grids, scales, fp16 tensors, the group table), then one zstd frame per role
    (tensor_role) holding the int8 codes of its tensors one after the other, in the table's order."""
    h, qs, blob = small_artifact
    payload = head_payload(blob)
    _, frames = split_frames(blob)
    assert tg.ARTIFACT_MAGIC == "parameter-golf-artifact-4" and payload["magic"] == tg.ARTIFACT_MAGIC
    assert set(payload) == {"magic", "config", "groups", "grids", "scales", "fp16"}
    coded = {n for n, e in qs.items() if "q" in e}
    assert len(coded) > 10 and set(payload["grids"]) == set(payload["scales"]) == coded
    assert set(payload["fp16"]) == set(qs) - coded
    listed = [n for names, _ in payload["groups"] for n in names]
    assert sorted(listed) == sorted(coded)  # every code tensor in exactly one group
    roles = [{tg.tensor_role(n) for n in names} for names, _ in payload["groups"]]
    assert all(len(r) == 1 for r in roles) and len({r.pop() for r in roles}) == len(roles)  # one group per role
    assert {tg.tensor_role(n) for n in coded} == {"attn_qo", "attn_kv", "mlp_up", "mlp_down", "embed", "bigram",
                                                   "small"}
    for (names, size), frame in zip(payload["groups"], frames):
        assert len(frame) == size and frame[:4] == b"\x28\xb5\x2f\xfd"
        assert zstandard.ZstdDecompressor().decompress(frame) == b"".join(qs[n]["q"].numpy().tobytes() for n in names)
        for n in names:
            assert payload["grids"][n] == (qs[n]["bits"], qs[n]["group"], tuple(qs[n]["q"].shape)), n
            assert torch.equal(payload["scales"][n], qs[n]["scale"]), n
    big = [f for (names, _), f in zip(payload["groups"], frames) if sum(qs[n]["q"].numel() for n in names) >= 8192]
    assert big and all(len(f) < sum(qs[n]["q"].numel() for n in names)
                       for (names, _), f in zip(payload["groups"], frames) if f in big)  # compressed
    for name in set(qs) - coded:
        assert torch.equal(payload["fp16"][name], qs[name]["data"])


def test_tensor_role():
    roles = {"blocks.3.attn.c_q.weight": "attn_qo", "blocks.3.attn.proj.weight": "attn_qo",
             "blocks.0.attn.c_k.weight": "attn_kv", "blocks.0.attn.c_v.weight": "attn_kv",
             "blocks.1.mlp.fc.weight": "mlp_up", "blocks.1.mlp.proj.weight": "mlp_down",
             "tok_emb.weight": "embed", "bigram.table.weight": "bigram", "blocks.1.mlp.fc.weight.lqer_a": "lqer",
             "tok_emb.weight.lqer_b": "lqer", "blocks.2.attn.gate_w": "small", "skip_gates": "small"}
    for name, role in roles.items():
        assert tg.tensor_role(name) == role, name


def test_every_frame_carries_a_checksum(small_artifact, budget_setup):
    """Rule audit: every zstd frame of the artifact (the head and each group of codes) declares a content checksum
    in its frame header, so a flipped bit anywhere fails the load; the budget search's artifacts as well. A frame
    written without one fails this test."""
    blobs = [small_artifact[2]]
    h, model, config, natural = budget_setup
    blobs.append(tg.quantize_within_budget(model, with_limit(h, int(0.9 * natural)), None, config, log=lambda m: None))
    for blob in blobs:
        head, frames = split_frames(blob)
        assert len(frames) >= 5
        for frame in [head, *frames]:
            assert zstandard.get_frame_parameters(frame).has_checksum, frame[:8]
            descriptor = frame[4]  # Frame_Header_Descriptor: bit 2 is Content_Checksum_flag
            assert descriptor & 0b100
    unchecked = zstandard.ZstdCompressor(level=3).compress(b"codes" * 100)  # the check sees a missing checksum
    assert not zstandard.get_frame_parameters(unchecked).has_checksum and not unchecked[4] & 0b100


def test_corrupt_code_frame_raises_value_error(small_artifact):
    """Damage inside one group's frame, the head intact: a ValueError "corrupt artifact", for a flipped frame magic,
    header or content byte (the frame's checksum catches the last), a truncated, scrambled or empty frame, another
    group's frame (of another length), and a grid whose shape does not match the codes."""
    h, qs, blob = small_artifact
    payload = head_payload(blob)
    _, frames = split_frames(blob)
    config, back = tg.deserialize_artifact(repack(payload, frames))  # the repacking alone is harmless
    assert config == payload["config"] and all(torch.equal(back[n]["q"], qs[n]["q"]) for n in payload["grids"])

    def damaged(i, data=None, grid=None):
        p = {**payload, "groups": list(payload["groups"]), "grids": dict(payload["grids"])}
        fs = list(frames)
        if data is not None:
            fs[i] = data
            p["groups"][i] = (p["groups"][i][0], len(data))
        if grid is not None:
            p["grids"][p["groups"][i][0][0]] = grid
        return repack(p, fs)

    def flipped(data, positions):
        out = bytearray(data)
        for i in positions:
            out[i] ^= 0xFF
        return bytes(out)

    for i, (names, _) in enumerate(payload["groups"]):
        data = frames[i]
        bits, group, shape = payload["grids"][names[0]]
        numel = [sum(math.prod(payload["grids"][n][2]) for n in g) for g, _ in payload["groups"]]
        other = frames[next(j for j in range(len(frames)) if numel[j] != numel[i])]  # codes of another length
        cases = {"frame magic": damaged(i, flipped(data, [0, 1])), "frame header": damaged(i, flipped(data, [4])),
                 "content byte": damaged(i, flipped(data, [len(data) // 2])),
                 "scrambled": damaged(i, data[:6] + flipped(data[6:], range(len(data) - 6))),
                 "truncated": damaged(i, data[:-8]), "half": damaged(i, data[:len(data) // 2]),
                 "empty": damaged(i, b""), "another group's": damaged(i, other),
                 "grid shape": damaged(i, grid=(bits, group, (max(1, shape[0] // 2), *shape[1:])))}
        for what, bad in cases.items():
            with pytest.raises(ValueError, match="corrupt artifact"):
                tg.deserialize_artifact(bad)
            assert bad != blob, what


def test_artifact_size_is_monotone_in_the_step_multiplier(tiny_hparams):
    """Per-tensor code streams: at the export's zstd level (22) the size of the serialized quantize_state never
    grows as the step multiplier grows, on a fine grid of 12 multipliers from 1.0 to 1.3, which AUTO_FIT's
    bisection and secant steps rely on. (With these k and this model, one zstd stream over all the codes, the
    earlier format, grew by ~600 bytes at one step of the grid.) The k are fixed here, not the tuned defaults."""
    h = dataclasses.replace(tiny_hparams, zstd_level=22, sdclip_attn_k=13.0, sdclip_mlp_k=5.75, sdclip_embed_k=20.0)
    model = randomized_model(h, seed=2)
    config = tg.model_config(h, False)
    mults = [1.0 + 0.3 * i / 11 for i in range(12)]
    sizes = [len(tg.serialize_artifact(tg.quantize_state(model, h, None, m), config, h)) for m in mults]
    assert all(b <= a for a, b in zip(sizes, sizes[1:])), list(zip(mults, sizes))
    assert sizes[-1] < 0.97 * sizes[0], sizes  # and the steps really change the bytes


def test_artifact_shrinks_with_fewer_bits(tiny_hparams):
    h = dataclasses.replace(tiny_hparams, passthrough_max_numel=1024, zstd_level=3, quant_attn_bits=6,
                            quant_mlp_bits=6, quant_embed_bits=8, quant_bigram_bits=6)
    model = randomized_model(h, seed=2)

    def size(**overrides):
        hh = dataclasses.replace(h, **overrides)
        return len(tg.serialize_artifact(tg.quantize_state(model, hh), tg.model_config(hh, False), hh))

    int6, int5, int4 = size(), size(quant_mlp_bits=5), size(quant_mlp_bits=4)
    assert int4 < int5 < int6
    # 4 layers x 2 MLP matrices x 12288 codes lose one bit each: at least a third of it shows after compression
    assert int6 - int5 > (4 * 2 * 12288 / 8) / 3


# ----------------------------------------------------------------------------------------------
# 8. the byte budget: hard cap, check_budget, quantize_within_budget
# ----------------------------------------------------------------------------------------------


def test_max_artifact_bytes_may_only_lower_the_cap(tiny_hparams):
    assert tg.CHALLENGE_MAX_BYTES == 16_000_000
    assert tg.Hyperparameters.from_env({"MAX_ARTIFACT_BYTES": "16000000"}).max_artifact_bytes == 16_000_000
    for bad in ("16000001", "20000000", "0", "-5"):
        with pytest.raises(tg.KnobError, match="MAX_ARTIFACT_BYTES"):
            tg.Hyperparameters.from_env({"MAX_ARTIFACT_BYTES": bad})
    code = tg.code_bytes()
    assert code == SCRIPT.stat().st_size
    # validate() keeps the knob at or under the cap, so check_budget reads the knob itself
    at_cap = dataclasses.replace(tiny_hparams, max_artifact_bytes=16_000_000)
    assert tg.check_budget(16_000_000 - code, at_cap) == 16_000_000  # exactly at the cap is allowed
    with pytest.raises(tg.ArtifactTooLarge, match="exceeds the budget of 16000000"):
        tg.check_budget(16_000_000 - code + 1, at_cap)
    lowered = dataclasses.replace(tiny_hparams, max_artifact_bytes=code + 1000)
    assert tg.check_budget(1000, lowered) == code + 1000
    with pytest.raises(tg.ArtifactTooLarge, match="exceeds"):
        tg.check_budget(1001, lowered)


@pytest.fixture(scope="module")
def budget_setup(sample_data):
    h = tg.Hyperparameters.from_env({**TINY_KNOBS, "DATA_PATH": str(sample_data), "ZSTD_LEVEL": "19"})
    model = randomized_model(h, seed=4)
    config = tg.model_config(h, False)
    natural = len(tg.serialize_artifact(tg.quantize_state(model, h, None, 1.0), config, h))
    return h, model, config, natural


def with_limit(h, limit):
    return dataclasses.replace(h, max_artifact_bytes=tg.code_bytes() + limit)


def test_budget_fill_bisects_to_just_under_the_limit(budget_setup):
    """A limit below the natural size (steps x1) and far below the finest steps' size: the search bisects and
    lands within FIT_TOLERANCE (0.3%) under the limit, with coarser steps than x1."""
    h, model, config, natural = budget_setup
    limit = int(0.85 * natural)
    finest = len(tg.serialize_artifact(tg.quantize_state(model, h, None, tg.FIT_MULT_RANGE[0]), config, h))
    assert finest > natural > limit  # so the finest steps cannot be the answer
    lines = []
    t0 = time.perf_counter()
    blob = tg.quantize_within_budget(model, with_limit(h, limit), None, config, log=lines.append)
    seconds = time.perf_counter() - t0
    assert tg.FIT_TOLERANCE == 0.003
    assert 0.997 * limit <= len(blob) <= limit, (len(blob), limit)
    m = re.fullmatch(r"auto_fit: searched: step multiplier (\S+) -> (\d+) bytes, .* the (\d+)-byte budget; "
                     r"(\d+) estimates in \S+s, (\d+) real artifacts \(GPTQ\) in \S+s", lines[-1])
    assert m, lines
    assert int(m.group(5)) <= 2  # without Hessians the estimate is the real artifact: one build, or two
    assert float(m.group(1)) > 1.0 and int(m.group(2)) == len(blob) and int(m.group(3)) == limit
    _, qs = tg.deserialize_artifact(blob)  # coarser steps than x1: codes within qmax, scales larger
    ref = tg.quantize_state(model, h, None, 1.0)
    name = "blocks.1.mlp.fc.weight"
    assert int(qs[name]["q"].abs().max()) <= qmax_of(h.quant_mlp_bits)
    assert (qs[name]["scale"].float() > ref[name]["scale"].float()).float().mean() > 0.9
    assert seconds < 20, f"the budget search took {seconds:.1f}s"


@pytest.fixture(scope="module")
def gptq_budget_setup(sample_data):
    """The tiny model with GPTQ Hessians and LQER: real artifacts differ from the round-to-nearest estimate."""
    h = tg.Hyperparameters.from_env({**TINY_KNOBS, "DATA_PATH": str(sample_data), "LQER_RANK": "4"})
    model = perturbed_model(h, seed=5)
    hessians = tg.calibrate(h, model, CPU_RT, lambda line: None, 0.0)
    config = tg.model_config(h, False)
    return h, model, hessians, config, len(tg.serialize_artifact(tg.quantize_state(model, h, hessians), config, h))


@pytest.mark.parametrize("fraction", [0.8, 0.95, 1.2])
def test_budget_fill_with_gptq_builds_few_real_artifacts(gptq_budget_setup, monkeypatch, fraction):
    """With GPTQ and LQER (real bytes != estimate): within FIT_TOLERANCE under the limit, with GPTQ run for at most
    three settings (the ratio real/estimate carries over from the first), and the log gives each part's time."""
    h, model, hessians, config, natural = gptq_budget_setup
    limit, builds, real_quantize = int(fraction * natural), [], tg.quantize_state
    monkeypatch.setattr(tg, "quantize_state", lambda m, hh, hs=None, *a, **k: (
        builds.append(hs is not None), real_quantize(m, hh, hs, *a, **k))[1])
    lines = []
    blob = tg.quantize_within_budget(model, with_limit(h, limit), hessians, config, log=lines.append)
    assert 0.997 * limit <= len(blob) <= limit, (len(blob), limit)
    m = re.search(r"(\d+) estimates in (\S+)s, (\d+) real artifacts \(GPTQ\) in (\S+)s$", lines[-1])
    assert m and int(m.group(3)) == sum(builds) <= 3 and int(m.group(1)) == len(builds) - sum(builds), lines
    _, qs = tg.deserialize_artifact(blob)
    assert any(".lqer_a" in n for n in qs)  # the real artifact: GPTQ and LQER


def test_budget_fill_converges_when_the_estimate_misleads(gptq_budget_setup, monkeypatch):
    """An estimate whose bytes fall with the multiplier at another rate than the real artifact's (the ratio changes
    from setting to setting): the secant steps between real artifacts still land within FIT_TOLERANCE."""
    h, model, hessians, config, natural = gptq_budget_setup
    real_quantize = tg.quantize_state
    monkeypatch.setattr(tg, "quantize_state", lambda m, hh, hs=None, mult=1.0, *a: real_quantize(
        m, hh, hs, mult if hs is not None else mult ** 2.5, *a))
    lines = []
    limit = int(0.85 * natural)
    blob = tg.quantize_within_budget(model, with_limit(h, limit), hessians, config, log=lines.append)
    assert 0.997 * limit <= len(blob) <= limit, (len(blob), limit, lines)


def test_budget_fill_fails_loudly_when_unreachable(budget_setup):
    h, model, config, _ = budget_setup
    with pytest.raises(tg.ArtifactTooLarge) as exc:
        tg.quantize_within_budget(model, with_limit(h, 1000), None, config, log=lambda m: None)
    message = str(exc.value)  # the limit, the coarsest steps tried, and what would help
    assert "1000" in message and "x8.0" in message and "fewer parameters" in message, message


def test_budget_fill_uses_the_finest_steps_when_they_fit(budget_setup):
    h, model, config, natural = budget_setup
    lines = []
    blob = tg.quantize_within_budget(model, h, None, config, log=lines.append)  # the 16 MB default
    assert len(lines) == 1 and lines[0].startswith("auto_fit: the finest steps fit: step multiplier 0.2500 ->")
    assert len(blob) > natural  # finer steps than x1 cost bytes
    _, qs = tg.deserialize_artifact(blob)
    code_max = tg.fit_grid(h.quant_attn_bits, 0.25)[0]
    assert qmax_of(h.quant_attn_bits) < int(qs["blocks.0.attn.c_q.weight"]["q"].abs().max()) <= code_max


def test_auto_fit_off(budget_setup):
    h, model, config, natural = budget_setup
    off = dataclasses.replace(h, auto_fit=False)
    assert len(tg.quantize_within_budget(model, off, None, config)) == natural  # steps x1, whatever the room
    with pytest.raises(tg.ArtifactTooLarge, match="AUTO_FIT=0"):
        tg.quantize_within_budget(model, with_limit(off, natural - 1), None, config)


# ----------------------------------------------------------------------------------------------
# 9. calibration: training shards only, inside the training clock
# ----------------------------------------------------------------------------------------------


def calibration_reads(h, model, monkeypatch, redirect_to_val=False):
    """Shard paths calibrate() loads (GPTQ Hessians). redirect_to_val: the broken variant, every
    path the code builds points at the validation shards instead."""
    seen, real_load, real_join = [], tg.load_shard, os.path.join

    def spy(path, *window):
        seen.append(path)
        return real_load(path, *window)

    with monkeypatch.context() as m:
        m.setattr(tg, "load_shard", spy)
        if redirect_to_val:
            m.setattr(tg.os.path, "join", lambda *a: real_join(*a).replace("fineweb_train_", "fineweb_val_"))
        hessians = tg.calibrate(h, model, CPU_RT, lambda line: None, 0.0)
    return seen, hessians


def only_training_shards(paths) -> bool:
    return bool(paths) and all(re.fullmatch(r"fineweb_train_\d{6}\.bin", os.path.basename(p)) for p in paths)


@pytest.fixture
def calib_h(tiny_hparams):
    return dataclasses.replace(tiny_hparams, gptq_calib_tokens=256, gptq_embed=True)


def test_calibration_reads_only_training_shards(calib_h, monkeypatch):
    model = perturbed_model(calib_h, seed=1)
    seen, hessians = calibration_reads(calib_h, model, monkeypatch)
    assert only_training_shards(seen), seen
    assert len(hessians) == 6 * calib_h.num_layers + 1


def test_calibration_check_catches_validation_reads(calib_h, monkeypatch):
    """The broken variant (the shard pattern pointed at val) must fail the check above."""
    model = perturbed_model(calib_h, seed=1)
    seen, _ = calibration_reads(calib_h, model, monkeypatch, redirect_to_val=True)
    assert seen and not only_training_shards(seen)
    assert all("fineweb_val_" in os.path.basename(p) for p in seen)


def test_calibration_must_end_inside_the_training_budget(calib_h):
    model = perturbed_model(calib_h, seed=1)
    h = dataclasses.replace(calib_h, max_wallclock_seconds=100.0)
    with pytest.raises(RuntimeError) as exc:
        tg.calibrate(h, model, CPU_RT, lambda line: None, 100.0 - 1e-9)
    for knob in ("MAX_WALLCLOCK_SECONDS", "GPTQ_RESERVE_SECONDS", "GPTQ_CALIB_TOKENS"):
        assert knob in str(exc.value)
    lines = []
    tg.calibrate(h, model, CPU_RT, lines.append, 50.0)  # room left: fine, and the clock line says so
    assert re.match(r"clock_train: training 50\.0s \+ calibration [\d.]+s = [\d.]+s limit:100s", lines[-1])
    tg.calibrate(dataclasses.replace(h, max_wallclock_seconds=0.0), model, CPU_RT, lines.append, 1e9)  # no cap
    # no GPTQ: nothing is read, so a run that trained to the clock passes
    lines.clear()
    hessians = tg.calibrate(dataclasses.replace(h, gptq=False), model, CPU_RT, lines.append, 100.0 + 5.0)
    assert hessians is None
    assert lines[0].startswith("calibration: 0 training tokens (0 per rank, 1 shards), 0 Hessians in ")


# ----------------------------------------------------------------------------------------------
# 10. WeightAverager
# ----------------------------------------------------------------------------------------------


def averager_setup(tiny_hparams, **knobs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3, bias=False))
    return net, dataclasses.replace(tiny_hparams, **knobs)


def set_params(net, values):
    with torch.no_grad():
        for p, v in zip(net.parameters(), values):
            p.copy_(v)


def test_ema_closed_form(tiny_hparams):
    d = 0.3  # steps 1-2 take the warm-up decay (1+t)/(10+t), steps 3-7 this one
    net, h = averager_setup(tiny_hparams, averaging="ema", ema_decay=d)
    init = [p.detach().clone().double() for p in net.parameters()]
    avg = tg.WeightAverager(net, h)
    g = torch.Generator().manual_seed(1)
    history, k = [], 7
    for step in range(1, k + 1):
        vals = [torch.randn(p.shape, generator=g) for p in net.parameters()]
        history.append([v.double() for v in vals])
        set_params(net, vals)
        avg.update(step, lr_mul=1.0)
    final = [p.detach().clone() for p in net.parameters()]
    msg = avg.apply()
    assert "averaging:ema" in msg and "applied:yes" in msg and "0.3" in msg
    decay = [min(d, (1 + t) / (10 + t)) for t in range(1, k + 1)]  # the warm-up (bench/PARITY.md row 58)
    for j, p in enumerate(net.parameters()):
        expect = math.prod(decay) * init[j] + sum((1 - decay[i - 1]) * math.prod(decay[i:]) * history[i - 1][j]
                                                  for i in range(1, k + 1))
        assert torch.allclose(p.detach().double(), expect, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p.detach(), final[j])


def test_swa_takes_exactly_the_right_checkpoints(tiny_hparams):
    net, h = averager_setup(tiny_hparams, averaging="swa", swa_start_lr=0.5, swa_every=4)
    avg = tg.WeightAverager(net, h)
    g = torch.Generator().manual_seed(2)
    taken = []
    for step in range(1, 23):
        lr_mul = max(0.0, (20 - step) / 24)  # exactly 0.5 at step 8 (not taken: strictly below), then lower
        vals = [torch.randn(p.shape, generator=g) for p in net.parameters()]
        set_params(net, vals)
        avg.update(step, lr_mul)
        if lr_mul < 0.5 and step % 4 == 0:
            taken.append((step, vals))
    assert [s for s, _ in taken] == [12, 16, 20]
    assert avg.count == len(taken)
    assert avg.apply() == f"averaging:swa checkpoints:{len(taken)} applied:yes"
    for j, p in enumerate(net.parameters()):
        mean = sum(v[j].double() for _, v in taken) / len(taken)
        assert torch.allclose(p.detach().double(), mean, rtol=1e-6, atol=1e-7)


def test_swa_without_checkpoints_and_none_keep_final_weights(tiny_hparams):
    for mode in ("swa", "none"):
        net, h = averager_setup(tiny_hparams, averaging=mode, swa_start_lr=0.5, swa_every=2)
        avg = tg.WeightAverager(net, h)
        for step in range(1, 6):
            set_params(net, [torch.randn(p.shape) for p in net.parameters()])
            avg.update(step, lr_mul=1.0 if mode == "swa" else 0.0)  # swa: LR never below the start
        final = [p.detach().clone() for p in net.parameters()]
        msg = avg.apply()
        assert msg.startswith(f"averaging:{mode}") and "applied:no" in msg
        for p, f in zip(net.parameters(), final):
            assert torch.equal(p.detach(), f)
