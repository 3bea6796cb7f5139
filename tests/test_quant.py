"""Quantization and export: per-row rounding, GPTQ, bit packing, tensor routing, the artifact, the byte
budget, eval-only reproduction of the in-run scores, and EMA/SWA weight averaging."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_gpt as tg
from conftest import TINY_KNOBS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_gpt.py"
FP16_TINIEST = 2.0 ** -24  # smallest positive (subnormal) float16



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


def row_error(w, w_hat, cw=None):
    d = (w.double() - w_hat.double()).square()
    if cw is not None:
        d = d * cw.double()
    return d.sum(dim=1)


# ----------------------------------------------------------------------------------------------
# 1. quantize_rows / fake_quantize_rows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_quantize_rows_round_trip_bounds(bits, weighted):
    w = make_matrix(bits)
    cw = torch.rand(w.size(1), generator=torch.Generator().manual_seed(9)) * 3 + 0.05 if weighted else None
    q, scale = tg.quantize_rows(w, bits, cw)
    qmax = qmax_of(bits)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float16 and scale.shape == (w.size(0),)
    assert int(q.abs().max()) <= qmax
    assert bool(q.abs().max() == qmax)  # the grid is used to its edge somewhere
    s = scale.double()[:, None]
    assert torch.isfinite(s).all() and (s >= 0).all()
    w64 = w.double()
    w_hat = q.double() * s
    err = (w64 - w_hat).abs()
    limit = qmax * s
    inside = w64.abs() <= limit
    slack = 1e-6 * s + 1e-12
    assert (err[inside] <= (s / 2).expand_as(w64)[inside] + slack.expand_as(w64)[inside]).all()
    outside_bound = (w64.abs() - limit + s / 2 + slack).expand_as(w64)
    assert (err[~inside] <= outside_bound[~inside]).all()
    # the zero row stays exactly zero
    assert (q[3] == 0).all() and (w_hat[3] == 0).all()
    # rows whose scale is a normal fp16 number: the clip search is never worse than plain row-max rounding
    # (fake_quantize_rows, fp32 scale) beyond what the fp16 rounding of the scale (2^-11 relative, i.e. up to
    # qmax * 2^-11 of a step at the largest code) can cost
    normal = scale.float() >= 2.0 ** -14
    e_chosen = row_error(w, w_hat, cw)
    e_plain = row_error(w, tg.fake_quantize_rows(w, bits), cw)
    tol = 1 + 2 * qmax * 2.0 ** -11
    assert (e_chosen[normal] <= e_plain[normal] * tol + 1e-12).all()
    # at low bits clipping pays off on Gaussian rows: strictly better in aggregate
    gauss = torch.tensor([i for i in range(9, 48)])
    if bits <= 6:
        assert e_chosen[gauss].sum() < 0.97 * e_plain[gauss].sum()


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_quantize_rows_picks_least_error_clip(bits):
    """The chosen per-row scale has no more weighted error than any candidate ratio (ratio 1.0 included),
    with candidates built independently here: fp16 scale of rowmax*ratio/qmax, round, clamp."""
    w = make_matrix(10 + bits)
    cw = torch.rand(w.size(1), generator=torch.Generator().manual_seed(3)) + 0.1
    q, scale = tg.quantize_rows(w, bits, cw)
    qmax = qmax_of(bits)
    e_chosen = row_error(w, q.double() * scale.double()[:, None], cw)
    rowmax = w.abs().amax(dim=1)
    assert 1.0 in tg.CLIP_RATIOS
    for r in tg.CLIP_RATIOS:
        s = (rowmax * r / qmax).half().double()
        ok = s > 0  # rows where this candidate is a usable fp16 scale
        cand = torch.clamp(torch.round(w.double() / s.clamp_min(1e-30)[:, None]), -qmax, qmax) * s[:, None]
        e_cand = row_error(w, cand, cw)
        assert (e_chosen[ok] <= e_cand[ok] * (1 + 1e-9) + 1e-30).all(), f"ratio {r} beats the chosen clip"


@pytest.mark.parametrize("bits", [4, 5, 6, 7, 8])
def test_no_clip_when_clipping_cannot_help(bits):
    """Rows exactly on the row-max grid (scale a power of two): ratio 1.0 is exact, so it must be chosen and
    quantize_rows must agree exactly with fake_quantize_rows."""
    qmax = qmax_of(bits)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(-qmax, qmax + 1, (16, 64), generator=g)
    codes[:, 0] = qmax  # the row max sits on the top code
    codes[1::2, 0] = -qmax
    steps = 2.0 ** torch.randint(-10, 3, (16, 1), generator=g).float()
    w = codes.float() * steps
    q, scale = tg.quantize_rows(w, bits)
    assert torch.equal(scale.float(), steps.squeeze(1))  # ratio 1.0: rowmax / qmax exactly
    assert torch.equal(q.long(), codes)
    w_hat = q.float() * scale.float()[:, None]
    assert torch.equal(w_hat, w)
    assert torch.equal(tg.fake_quantize_rows(w, bits), w_hat)
    # and on random (uniform) rows where ratio 1.0 wins, the two agree up to the fp16 rounding of the scale
    w2 = torch.rand(64, 128, generator=g) * 2 - 1
    q2, s2 = tg.quantize_rows(w2, bits)
    chosen_one = (s2.float() - (w2.abs().amax(1) / qmax).half().float()).abs() == 0
    assert chosen_one.any()
    step = (w2.abs().amax(1, keepdim=True) / qmax)[chosen_one]
    fake_codes = torch.round(tg.fake_quantize_rows(w2, bits)[chosen_one] / step)
    assert (fake_codes == q2[chosen_one].float()).float().mean() > 0.95  # only ties near .5 may flip
    dq = (q2.float() * s2.float()[:, None])[chosen_one]
    ds = (s2.float()[chosen_one, None] - step).abs()
    assert ((tg.fake_quantize_rows(w2, bits)[chosen_one] - dq).abs() <= step + qmax * ds + 1e-7).all()


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_tiny_rows_get_usable_scale(bits):
    """A non-zero row must never be stored as (non-zero codes, scale 0): its scale should be the smallest
    fp16 number that is positive, so that the row decodes better than all zeros."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(4, 64, generator=g) * torch.tensor([[1e-7], [3e-7], [1e-6], [1e-4]])
    q, scale = tg.quantize_rows(w, bits)
    zero_scale = scale == 0
    assert (q[zero_scale] == 0).all(), "codes are stored for a row whose scale underflowed to 0 in fp16"
    w_hat = q.float() * scale.float()[:, None]
    representable = w.abs().amax(1) >= 2 * FP16_TINIEST
    err = row_error(w, w_hat)
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
# 2. GPTQ
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


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_gptq_beats_rounding(calib, bits):
    x, w = calib
    h = x.T @ x / x.size(0)
    q, s = tg.gptq_quantize(w, h, bits, block=64, damp=0.01)
    qmax = qmax_of(bits)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert int(q.abs().max()) <= qmax
    e_gptq = out_err(x, w, q.float() * s.float()[:, None])
    q_r, s_r = tg.quantize_rows(w, bits)
    e_rows = out_err(x, w, q_r.float() * s_r.float()[:, None])
    q_h, s_h = tg.quantize_rows(w, bits, torch.diag(h))
    e_rows_h = out_err(x, w, q_h.float() * s_h.float()[:, None])
    e_fake = out_err(x, w, tg.fake_quantize_rows(w, bits))
    assert e_gptq < 0.9 * e_rows
    assert e_gptq < 0.9 * e_rows_h
    assert e_gptq < 0.9 * e_fake


def test_gptq_block_size_does_not_change_the_algorithm(calib):
    """Lazy block updates are an implementation detail: block 16 and block 256 (one block) agree."""
    x, w = calib
    h = x.T @ x / x.size(0)
    q1, s1 = tg.gptq_quantize(w, h, 5, block=16)
    q2, s2 = tg.gptq_quantize(w, h, 5, block=256)
    assert torch.equal(s1, s2)
    assert (q1 != q2).float().mean() < 0.01  # only float-association ties may flip


def test_gptq_dead_columns(calib):
    x, w = calib
    x = x.clone()
    dead = [0, 7, 100, 255]
    x[:, dead] = 0.0
    h = x.T @ x / x.size(0)
    q, s = tg.gptq_quantize(w, h, 4)
    w_hat = q.float() * s.float()[:, None]
    assert torch.isfinite(w_hat).all() and (s.float() > 0).all()
    assert (q[:, dead] == 0).all()  # dead inputs carry nothing; their weights need no codes
    q_r, s_r = tg.quantize_rows(w, 4)
    assert out_err(x, w, w_hat) < 0.9 * out_err(x, w, q_r.float() * s_r.float()[:, None])


def test_gptq_all_dead_hessian_is_finite():
    w = torch.randn(8, 32)
    q, s = tg.gptq_quantize(w, torch.zeros(32, 32), 6)
    assert torch.isfinite(s.float()).all() and (q == 0).all()


def test_gptq_prune_mask(calib):
    x, w = calib
    h = x.T @ x / x.size(0)
    keep = tg.magnitude_keep_mask(w, 0.3)
    assert keep is not None and keep.shape == w.shape
    assert tg.magnitude_keep_mask(w, 0.0) is None
    pruned = keep == 0
    assert abs(pruned.float().mean().item() - 0.3) < 0.002
    # the pruned entries are the smallest by magnitude
    assert w.abs()[pruned].max() <= w.abs()[~pruned].min()
    q, s = tg.gptq_quantize(w, h, 5, keep=keep)
    assert (q[pruned] == 0).all()
    assert torch.isfinite(s.float()).all()
    # GPTQ compensates the pruning on the kept weights: better than rounding the masked matrix
    q_r, s_r = tg.quantize_rows(w, 5, keep=keep)
    assert (q_r[pruned] == 0).all()
    assert out_err(x, w, q.float() * s.float()[:, None]) < 0.9 * out_err(x, w, q_r.float() * s_r.float()[:, None])


# ----------------------------------------------------------------------------------------------
# 3. bit packing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 1001])
def test_pack_unpack_round_trip(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    top = 2 ** bits - 1
    values = rng.integers(0, top + 1, size=count).astype(np.int64)
    if count >= 2:
        values[0], values[-1] = top, 0
    data = tg.pack_bits(values, bits)
    assert len(data) == math.ceil(count * bits / 8)
    back = tg.unpack_bits(data, bits, count)
    assert back.shape == (count,)
    assert np.array_equal(back.astype(np.int64), values)


def test_pack_bits_layout():
    # MSB first: 3-bit values 5 (101), 3 (011), 7 (111) -> 101011 11(0 padding)
    assert tg.pack_bits(np.array([5, 3, 7]), 3) == bytes([0b10101111, 0b10000000])


# ----------------------------------------------------------------------------------------------
# 4. quantize_state routing, artifact round trip and size
# ----------------------------------------------------------------------------------------------


def randomized_model(h, seed=0):
    torch.manual_seed(seed)
    model = tg.GPT(dataclasses.replace(h, ortho_init=False))  # weights are redrawn below; skip the QR
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.size(1)))
    return model


def test_quantize_state_routes_tensors(tiny_hparams):
    h = dataclasses.replace(tiny_hparams, quant_embed_bits=7, quant_bigram_bits=4, quant_attn_bits=6,
                            quant_mlp_bits=5, passthrough_max_numel=2048)
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
            assert "q" in e and e["bits"] == expected[name], name
            assert e["q"].dtype == torch.int8 and e["q"].shape == t.shape
            assert e["scale"].dtype == torch.float16 and e["scale"].shape == (t.shape[0],)
            assert int(e["q"].abs().max()) <= qmax_of(e["bits"])
            assert bool(e["q"].abs().max() == qmax_of(e["bits"]))
        else:
            # c_k / c_v hold exactly PASSTHROUGH_MAX_NUMEL (2048) elements: passthrough; also 1-D, scalars,
            # bigram.proj (no bits) and skip_weights / resid_mix
            assert "q" not in e, name
            assert e["data"].dtype == torch.float16 and e["data"].shape == t.shape
            assert torch.equal(e["data"], t.half())
    assert qs["blocks.0.attn.c_k.weight"]["data"].numel() == 2048
    for name in ("smear.gate", "blocks.0.attn_scale", "bigram.scale", "blocks.1.attn.q_gain", "skip_weights",
                 "bigram.proj.weight"):
        assert "data" in qs[name]
    # tensor_bits by name
    assert tg.tensor_bits("blocks.3.attn.c_v.weight", h) == 6
    assert tg.tensor_bits("blocks.3.mlp.proj.weight", h) == 5
    assert tg.tensor_bits("bigram.proj.weight", h) == 0
    assert tg.tensor_bits("skip_weights", h) == 0


def test_dequantize_and_artifact_round_trip(tiny_hparams):
    h = dataclasses.replace(tiny_hparams, passthrough_max_numel=1024)
    model = randomized_model(h, seed=1)
    qs = tg.quantize_state(model, h)
    deq = tg.dequantize_state(qs)
    for name, e in qs.items():
        if "q" in e:
            assert torch.equal(deq[name], e["q"].float() * e["scale"].float()[:, None])
        assert deq[name].dtype == torch.float32
    config = tg.model_config(h, looping=False)
    for bitpack, compressor in ((False, "zstd"), (True, "zstd"), (True, "lzma")):
        hh = dataclasses.replace(h, bitpack=bitpack, compressor=compressor)
        blob = tg.serialize_artifact(qs, config, hh)
        assert blob[:1] == (b"Z" if compressor == "zstd" else b"L")
        cfg, back = tg.deserialize_artifact(blob)
        assert cfg == json_round(config)
        assert set(back) == set(qs)
        for name, e in qs.items():
            for k, v in e.items():
                assert (back[name][k] == v) if k == "bits" else torch.equal(back[name][k], v), (name, k)
    # model_from_artifact / load_artifact_into give exactly the dequantized weights and the same function
    blob = tg.serialize_artifact(qs, config, h)
    m2 = tg.model_from_artifact(blob, h, torch.device("cpu"))
    for name, t in m2.state_dict().items():
        assert torch.equal(t, deq[name]), name
    m3 = randomized_model(h, seed=5)
    m3.set_qat(True)
    tg.load_artifact_into(m3, blob)
    assert all(float(m.qat_on) == 0.0 for m in m3.modules() if isinstance(m, tg.CastedLinear))
    ids = torch.randint(0, h.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.equal(m2.logits(ids), m3.logits(ids))
    with pytest.raises(ValueError):
        tg.deserialize_artifact(b"X" + blob[1:])


def json_round(config):
    return json.loads(json.dumps(config))


def artifact_size(model, h, **overrides):
    hh = dataclasses.replace(h, **overrides)
    return len(tg.serialize_artifact(tg.quantize_state(model, hh), tg.model_config(hh, False), hh))


def test_step_mult_widens_the_chosen_steps():
    w = make_matrix(3)
    q1, s1 = tg.quantize_rows(w, 6)
    q2, s2 = tg.quantize_rows(w, 6, step_mult=1.5)
    assert torch.allclose(s2.float(), (s1.float() * 1.5).half().float())
    assert q2.abs().float().mean() < q1.abs().float().mean() / 1.3  # fewer levels in use


def test_auto_fit_widens_steps_until_the_artifact_fits(tiny_hparams):
    model = randomized_model(tiny_hparams, seed=4)
    config = tg.model_config(tiny_hparams, False)
    full = len(tg.quantize_within_budget(model, tiny_hparams, None, config))
    limit = int(full * 0.93)  # needs wider steps, but is reachable
    h = dataclasses.replace(tiny_hparams, max_artifact_bytes=limit + tg.code_bytes())
    lines = []
    blob = tg.quantize_within_budget(model, h, None, config, log=lines.append)
    assert len(blob) <= limit < full
    assert lines and lines[-1].startswith("auto_fit: quantization steps x")
    _, qstate = tg.deserialize_artifact(blob)
    mult = float(lines[-1].split("x")[1].split()[0])
    ref = tg.quantize_state(model, h, None, mult)
    assert all(torch.equal(qstate[n]["q"], e["q"]) for n, e in ref.items() if "q" in e)
    with pytest.raises(tg.ArtifactTooLarge):  # unreachable: fails loudly
        tg.quantize_within_budget(model, dataclasses.replace(h, max_artifact_bytes=tg.code_bytes() + 1000), None, config)
    off = dataclasses.replace(h, auto_fit=False)  # no fitting: the oversize blob comes back for check_budget
    assert len(tg.quantize_within_budget(model, off, None, config)) == full


@pytest.mark.parametrize("bitpack", [False, True])
def test_artifact_shrinks_with_fewer_bits_and_pruning(tiny_hparams, bitpack):
    h = dataclasses.replace(tiny_hparams, passthrough_max_numel=1024, bitpack=bitpack, zstd_level=3,
                            quant_attn_bits=6, quant_mlp_bits=6, quant_embed_bits=8, quant_bigram_bits=6)
    model = randomized_model(h, seed=2)
    int6 = artifact_size(model, h)
    int5 = artifact_size(model, h, quant_mlp_bits=5)
    int4 = artifact_size(model, h, quant_mlp_bits=4)
    assert int4 < int5 < int6
    # 4 layers x 2 MLP matrices x 12288 codes lose one bit each: at least a third of it shows after compression
    assert int6 - int5 > (4 * 2 * 12288 / 8) / 3
    pruned = artifact_size(model, h, prune_frac=0.2)
    assert pruned < int6
    qs0 = tg.quantize_state(model, h)
    qs = tg.quantize_state(model, dataclasses.replace(h, prune_frac=0.2))
    for name in ("blocks.0.mlp.fc.weight", "blocks.3.attn.c_q.weight"):
        zeros0 = (qs0[name]["q"] == 0).float().mean().item()
        zeros = (qs[name]["q"] == 0).float().mean().item()
        assert zeros >= 0.2 - 1e-3 and zeros >= zeros0
    assert torch.equal(qs["tok_emb.weight"]["q"], qs0["tok_emb.weight"]["q"])  # pruning is for blocks only


# ----------------------------------------------------------------------------------------------
# 5. and 6. the script end to end: in-run scores == eval-only scores; the byte budget
# ----------------------------------------------------------------------------------------------

FINAL_RE = re.compile(r"^final_(roundtrip|sliding|ttt) val_loss:(\S+) val_bpb:(\S+) tokens:(\d+) bytes:(\d+)",
                      re.M)


def script_env(sample_data, tmp: Path, **extra) -> dict:
    knob_names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters)}
    env = {k: v for k, v in os.environ.items() if k.upper() not in knob_names}
    env.update(TINY_KNOBS)
    env.update({"DATA_PATH": str(sample_data), "TOKENIZER_PATH": str(sample_data / "tokenizer.model"),
                "LOG_DIR": str(tmp / "logs"), "ARTIFACT_PATH": str(tmp / "model.ptz"), "RUN_ID": "test",
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "ITERATIONS": "10"})
    env.update(extra)
    return env


def run_script(env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=env["LOG_DIR"].rsplit("/", 1)[0])


@pytest.fixture(scope="module")
def trained(sample_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("script_run")
    env = script_env(sample_data, tmp)
    r = run_script(env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return tmp, env, (tmp / "logs" / "test.txt").read_text()


@pytest.fixture(scope="module")
def eval_only(trained):
    tmp, env, _ = trained
    r = run_script({**env, "EVAL_ONLY": "1", "RUN_ID": "evalonly"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return (tmp / "logs" / "evalonly.txt").read_text()


def finals(log: str) -> dict:
    out = {m.group(1): m.group(2, 3, 4, 5) for m in FINAL_RE.finditer(log)}
    assert set(out) == {"roundtrip", "sliding", "ttt"}, log[-2000:]
    return out


def test_in_run_log(trained, sample_data):
    tmp, env, log = trained
    assert re.search(r"^pre_quant val_loss:\d+\.\d{8} val_bpb:\d+\.\d{8}$", log, re.M)
    assert re.search(r"^averaging:none applied:no", log, re.M)
    m = re.search(r"^qat:on step:(\d+) ", log, re.M)
    assert m and int(m.group(1)) == 5  # QAT_START_FRAC 0.5 of ITERATIONS 10
    m = re.search(r"^gptq: calibration on (\d+) training sequences, (\d+) Hessians", log, re.M)
    assert m and int(m.group(1)) == 8
    h = tg.Hyperparameters.from_env({k: v for k, v in env.items() if k in TINY_KNOBS or k in ("DATA_PATH",)})
    n_block_matrices = sum(1 for n, p in tg.GPT(h).named_parameters()
                           if n.startswith("blocks.") and p.ndim == 2 and tg.tensor_bits(n, h)
                           and p.numel() > h.passthrough_max_numel)
    assert n_block_matrices == 24
    assert int(m.group(2)) == n_block_matrices
    f = finals(log)
    pre = float(re.search(r"^pre_quant val_loss:\S+ val_bpb:(\S+)", log, re.M).group(1))
    gap = re.search(r"^quant_gap val_bpb:([+-]\d+\.\d+)", log, re.M)
    assert gap and abs(float(gap.group(1)) - (float(f["roundtrip"][1]) - pre)) < 2e-6
    assert all(v[2] == "4096" for v in f.values())  # VAL_MAX_TOKENS: every target scored once
    final = re.search(r"^final val_loss:(\S+) val_bpb:(\S+) source:ttt$", log, re.M)
    assert final and final.group(1, 2) == f["ttt"][:2]
    size = (tmp / "model.ptz").stat().st_size
    assert re.search(rf"^bytes_model:{size}$", log, re.M)
    assert re.search(rf"^bytes_total:{size + tg.code_bytes()}$", log, re.M)
    # the artifact on disk: blocks and embedding at their knob's bits, fp16 for the small rest
    config, qs = tg.deserialize_artifact((tmp / "model.ptz").read_bytes())
    assert config["num_layers"] == 4 and config["model_dim"] == 64 and config["looping"] is False
    assert qs["tok_emb.weight"]["bits"] == h.quant_embed_bits
    assert qs["blocks.2.mlp.fc.weight"]["bits"] == h.quant_mlp_bits
    assert qs["blocks.0.attn.c_k.weight"]["bits"] == h.quant_attn_bits  # 2048 > PASSTHROUGH_MAX_NUMEL 1024
    assert "data" in qs["bigram.proj.weight"] and "data" in qs["blocks.0.attn_scale"]


def test_eval_only_reproduces_in_run_scores(trained, eval_only):
    _, _, log = trained
    assert "eval_only: loaded" in eval_only
    assert "pre_quant" not in eval_only and "quant_gap" not in eval_only
    assert finals(eval_only) == finals(log)


def test_artifact_alone_reproduces_roundtrip_in_process(trained, sample_data):
    tmp, env, log = trained
    h = tg.Hyperparameters.from_env({k: v for k, v in env.items() if k in TINY_KNOBS or k in
                                     ("DATA_PATH", "TOKENIZER_PATH")})
    import sentencepiece as spm
    luts = tg.build_byte_luts(spm.SentencePieceProcessor(model_file=h.tokenizer_path), h.vocab_size)
    val = tg.load_validation_tokens(str(sample_data / "fineweb_val_*.bin"), h.train_seq_len, h.vocab_size,
                                    h.val_max_tokens)
    model = tg.model_from_artifact((tmp / "model.ptz").read_bytes(), h, torch.device("cpu"))
    s = tg.eval_plain(model, val, h.train_seq_len, h.val_batch_seqs, luts)
    loss, bpb, tokens, nbytes = finals(log)["roundtrip"]
    assert int(s.sums[1]) == int(tokens) and int(s.sums[2]) == int(nbytes)
    assert abs(s.val_loss - float(loss)) < 1e-6 and abs(s.val_bpb - float(bpb)) < 1e-6


def test_check_budget(tiny_hparams):
    code = tg.code_bytes()
    assert code == SCRIPT.stat().st_size
    h = dataclasses.replace(tiny_hparams, max_artifact_bytes=code + 1000)
    assert tg.check_budget(1000, h) == code + 1000  # exactly at the limit is allowed
    with pytest.raises(tg.ArtifactTooLarge, match="exceeds"):
        tg.check_budget(1001, h)


def test_eval_only_oversize_artifact_fails(trained):
    tmp, env, _ = trained
    r = run_script({**env, "EVAL_ONLY": "1", "RUN_ID": "oversize", "MAX_ARTIFACT_BYTES": "1000"})
    assert r.returncode != 0
    assert "exceeds" in r.stderr and "ArtifactTooLarge" in r.stderr
    assert "final_roundtrip" not in r.stdout  # nothing is scored from an artifact over budget


# ----------------------------------------------------------------------------------------------
# 7. WeightAverager
# ----------------------------------------------------------------------------------------------


def averager_setup(tiny_hparams, **knobs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3, bias=False))
    h = dataclasses.replace(tiny_hparams, **knobs)
    return net, h


def set_params(net, values):
    with torch.no_grad():
        for p, v in zip(net.parameters(), values):
            p.copy_(v)


def test_ema_closed_form(tiny_hparams):
    d = 0.9
    net, h = averager_setup(tiny_hparams, averaging="ema", ema_decay=d)
    init = [p.detach().clone().double() for p in net.parameters()]
    avg = tg.WeightAverager(net, h)
    g = torch.Generator().manual_seed(1)
    history = []
    k = 7
    for step in range(1, k + 1):
        vals = [torch.randn(p.shape, generator=g) for p in net.parameters()]
        history.append([v.double() for v in vals])
        set_params(net, vals)
        avg.update(step, lr_mul=1.0)
    final = [p.detach().clone() for p in net.parameters()]
    msg = avg.apply()
    assert "averaging:ema" in msg and "applied:yes" in msg and "0.9" in msg
    for j, p in enumerate(net.parameters()):
        expect = d ** k * init[j] + sum((1 - d) * d ** (k - i) * history[i - 1][j] for i in range(1, k + 1))
        assert torch.allclose(p.detach().double(), expect, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p.detach(), final[j])


def test_swa_takes_exactly_the_right_checkpoints(tiny_hparams):
    net, h = averager_setup(tiny_hparams, averaging="swa", swa_start_lr=0.5, swa_every=4)
    avg = tg.WeightAverager(net, h)
    g = torch.Generator().manual_seed(2)
    n_steps = 22
    taken = []
    for step in range(1, n_steps + 1):
        lr_mul = max(0.0, (20 - step) / 24)  # exactly 0.5 at step 8 (not taken: strictly below), then lower
        vals = [torch.randn(p.shape, generator=g) for p in net.parameters()]
        set_params(net, vals)
        avg.update(step, lr_mul)
        if lr_mul < 0.5 and step % 4 == 0:
            taken.append((step, vals))
    assert [s for s, _ in taken] == [12, 16, 20]
    assert avg.count == len(taken)
    msg = avg.apply()
    assert msg == f"averaging:swa checkpoints:{len(taken)} applied:yes"
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
