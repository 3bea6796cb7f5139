"""bench/run_bench.py: log parser, FLOP/MFU arithmetic (checked against train_gpt.GPT), the results table and the
built-in ablations, on synthetic logs (no training); bench/artifact_size.py on the tiny model."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

import train_gpt as tg
from conftest import TINY_KNOBS

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rb = _load("run_bench")
artifact_size = _load("artifact_size")

# The seed stack's shape (train_gpt.py defaults that matter for FLOPs and the parameter count).
HP = {"vocab_size": 1024, "num_layers": 11, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 3.0,
      "train_seq_len": 2048, "bigram_buckets": 10240, "bigram_dim": 128, "smear_gate": True,
      "num_loops": 0, "loop_start": 4, "loop_end": 5, "train_batch_tokens": 786432}

# Hand arithmetic, d=512, kv=4*64=256, mlp hidden=1536:
#   per layer 2*512^2 + 2*512*256 + 2*512*1536 = 2,359,296; x11 = 25,952,256
#   + bigram proj 128*512 = 65,536 + tied head 1024*512 = 524,288 -> 26,542,080 matmul params
#   6*26,542,080 = 159,252,480 + attention 6*11*2048*512 = 69,206,016 -> 228,458,496 FLOPs/token
FLOPS_11 = 228_458_496
#   looping 1x over layers 4..5 -> 13 virtual layers:
#   6*(13*2,359,296 + 65,536 + 524,288) + 6*13*2048*512 = 187,564,032 + 81,788,928
FLOPS_13 = 269_352_960
#   params: emb 524,288 + 11*(2,359,296 + 8 q_gain + 4*512 scales) + bigram 10240*128 + 65,536 + 1
#           + smear 512 + skip weights 5*512 (11 // 2 skips); test_param_count_matches_gpt builds the model
PARAMS = 27_878_489


def synthetic_log(hp: dict, *, gpu="NVIDIA H100 80GB HBM3", world=8, looping_step=None) -> str:
    """A log in train_gpt.py's current format (the lines parse_log reads)."""
    lines = [
        "W1123 12:00:00.000000 1 torch/distributed/run.py:766] Setting OMP_NUM_THREADS ...",  # torchrun noise
        f"run_id:full torch:2.8.0 device:cuda:0 world:{world} grad_accum:{8 // world} compile:1 autocast:bf16 "
        "preset:seed",
        "hyperparameters " + json.dumps(hp, sort_keys=True),
        f"provenance code_sha256:abc123 torch:2.8.0 cuda:12.8 gpu:{gpu} gpus:{world} world:{world}",
        "data train_shards:80 val_shards:1 val_tokens:62021632 val_max_tokens:0",
        f"params:{PARAMS} bigram:1376257 blocks.attn:8650840 blocks.mlp:17301504 skip_weights:2560 smear:512 "
        "tok_emb:524288",
        "warmup: 20 priming steps run and undone; graphs compiled:4",
        "step:1/20000 train_loss:6.9312 lr_mul:1.0000 train_time:0.1s step_avg:95.00ms",
        "step:1000 val_loss:2.500000 val_bpb:1.480000 train_time:87.0s step_avg:87.00ms",
        "qat:on step:5800 frac:0.850 bits attn:6 mlp:5",
    ]
    if looping_step is not None:
        lines.append(f"looping:on step:{looping_step} frac:0.500 layers:[0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]")
    lines += [
        "step:6800/20000 train_loss:2.1234 lr_mul:0.0100 train_time:588.0s step_avg:86.47ms",
        "step:6800 val_loss:1.950000 val_bpb:1.155000 train_time:588.0s step_avg:86.47ms",
        "compile_guard: ok graphs compiled after warmup:0",
        "training stopped step:6800 train_time:588.0s tokens:5347737600 tokens_per_s:9094792",
        "peak_memory_allocated_mib:21500",
        "averaging:ema decay:0.997 applied:yes",
        "weights_in_sync hashes:[1, 1, 1, 1, 1, 1, 1, 1]",
        "calibration: 1572864 training tokens (196608 per rank, 80 shards), 67 Hessians in 3.2s: 61440 tokens/s per rank, "
        "reserve:8s",
        "clock_train: training 588.0s + calibration 3.2s = 591.2s limit:600s",
        "pre_quant val_loss:1.94000000 val_bpb:1.14900000",
        "auto_fit: searched: step multiplier 1.0712 -> 15920000 bytes, 99.85% of the 15932478-byte budget; "
        "14 quantization trials in 18.0s",
        "export: zstd-22 lqer_rank:0 -> final_model.ptz 15920000 bytes in 20.5s",
        "bytes_model:15920000 bytes_code:67522 bytes_total:15987522 limit:16000000",
        "final_roundtrip val_loss:1.95200000 val_bpb:1.15600000 tokens:62021632 bytes:151000000 eval_time:3.1s",
        "final_sliding val_loss:1.91500000 val_bpb:1.13400000 tokens:62021632 bytes:151000000 eval_time:80.2s",
        "final_ttt val_loss:1.90800000 val_bpb:1.13000000 tokens:62021632 bytes:151000000 eval_time:350.4s",
        f"clock_eval: total 433.7s limit:600s world:{world}" + (" est_8gpu:54.2s (estimate)" if world < 8 else ""),
        "compile: graphs train:4 training:0 eval:1 ttt:2 recompiles:0",
        "quant_gap val_bpb:+0.007000 (pre 1.149000 -> roundtrip 1.156000)",
        "final val_loss:1.90800000 val_bpb:1.13000000 source:ttt",
        "bytes_model:15920000",
        "bytes_code:67522",
        "bytes_total:15987522",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# log parsing, MFU, table
# ----------------------------------------------------------------------------------------------


def test_parse_log_fields():
    p = rb.parse_log(synthetic_log(HP))
    assert p["run_id"] == "full" and p["world"] == 8 and p["grad_accum"] == 1
    assert p["gpu"] == "NVIDIA H100 80GB HBM3" and p["device"] == "cuda:0"
    assert p["hparams"]["model_dim"] == 512
    assert p["params"] == PARAMS and p["param_groups"]["tok_emb"] == 524288
    assert p["steps"] == 6800 and p["train_seconds"] == 588.0 and p["tokens"] == 5347737600
    assert p["tokens_per_s"] == 9094792 and p["last_step_avg_ms"] == 86.47
    assert p["val_curve"] == [[1000, 1.48], [6800, 1.155]]
    assert p["qat_step"] == 5800 and "looping_step" not in p
    assert p["peak_memory_mib"] == 21500
    assert p["pre_quant_bpb"] == 1.149 and p["quant_gap"] == 0.007
    assert p["evals"]["roundtrip"] == {"val_loss": 1.952, "val_bpb": 1.156, "eval_seconds": 3.1}
    assert p["evals"]["sliding"]["val_bpb"] == 1.134 and p["evals"]["ttt"]["eval_seconds"] == 350.4
    # the current log has no eval_total_time line: the eval clock comes from clock_eval
    assert p["eval_seconds"] == 433.7 and p["final_bpb"] == 1.13 and p["final_source"] == "ttt"
    assert (p["bytes_model"], p["bytes_code"], p["bytes_total"]) == (15920000, 67522, 15987522)
    assert p["export_seconds"] == 20.5
    assert p["clock_train"] == {"training": 588.0, "calibration": 3.2, "total": 591.2, "limit": 600}
    assert p["auto_fit"].startswith("searched: step multiplier 1.0712")


def test_summary_and_mfu():
    s = rb.summarize(rb.parse_log(synthetic_log(HP)))
    assert s["steps"] == 6800 and s["ms_per_step"] == 86.47 and s["tokens_per_s"] == 9094792
    assert (s["pre_quant_bpb"], s["roundtrip_bpb"], s["sliding_bpb"], s["ttt_bpb"]) == (1.149, 1.156, 1.134, 1.13)
    assert s["flops_per_token"] == FLOPS_11 and s["flops_model_matches_params"] is True
    assert s["peak_flops"] == 989e12
    assert s["mfu"] == pytest.approx(FLOPS_11 * 9094792 / (8 * 989e12))
    assert 0.2 < s["mfu"] < 0.3  # 26.3%
    assert s["eval_seconds"] == 433.7 and s["bytes_total"] == 15987522 and s["peak_memory_mib"] == 21500
    assert s["train_clock_seconds"] == 591.2 and s["calibration_seconds"] == 3.2
    # a params: line that disagrees with the FLOP model's count is flagged
    off = synthetic_log(HP).replace(f"params:{PARAMS} ", f"params:{PARAMS + 512} ")
    assert rb.summarize(rb.parse_log(off))["flops_model_matches_params"] is False


def test_flop_model_pieces():
    assert rb.matmul_params(HP) == 26_542_080
    assert rb.flops_per_token(HP) == FLOPS_11
    assert rb.expected_param_count(HP) == PARAMS
    no_bigram = {**HP, "bigram_buckets": 0}
    assert rb.flops_per_token(no_bigram) == FLOPS_11 - 6 * 128 * 512
    loop = {**HP, "num_loops": 1}
    assert rb.flops_per_token(loop, looping=True) == FLOPS_13
    assert rb.expected_param_count(loop) == PARAMS + 512  # one more U-Net skip row for the 13-layer schedule
    gate = {**HP, "attn_gate": True}  # 8 heads x 12 gate inputs per layer: matmul weights too
    assert rb.matmul_params(gate) == 26_542_080 + 11 * 8 * 12
    assert rb.expected_param_count(gate) == PARAMS + 11 * 8 * 12


def tiny_env(**extra) -> dict:
    return {"MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "ROPE_DIMS": "8", "BIGRAM_BUCKETS": "64",
            "BIGRAM_DIM": "16", **extra}


PARAM_CONFIGS = {
    "seed": {},
    "seed_tiny": tiny_env(),
    "frontier": {"PRESET": "frontier"},  # vocab 8192, MLP x4, 2 loops over 3..5, two lanes from 8, all gates
    "frontier_tiny": tiny_env(PRESET="frontier"),
    "gates_two_lane": tiny_env(NUM_LAYERS="5", ATTN_GATE="1", SKIP_GATES="1", PARALLEL_RESID_FROM="2",
                               PARALLEL_LANES="2", MLP_MULT="4", VOCAB_SIZE="8192"),
    "one_lane_parallel": tiny_env(PARALLEL_RESID_FROM="3"),  # GPT-J parallel: no lane parameters
    "bare_loops": tiny_env(UNET_SKIPS="0", SMEAR_GATE="0", BIGRAM_BUCKETS="0", NUM_LOOPS="2", LOOP_START="1",
                           LOOP_END="3"),
    "skip_gates_loops": tiny_env(NUM_LAYERS="6", SKIP_GATES="1", NUM_LOOPS="1", LOOP_START="2", LOOP_END="4"),
}


def model_matmul_params(model: tg.GPT, looping: bool) -> int:
    """Matmul weights a token passes through, read off the module tree: every CastedLinear and attention gate of
    the blocks in schedule order, the bigram projection and the tied head."""
    per_block = [sum(m.weight.numel() for m in b.modules() if isinstance(m, tg.CastedLinear))
                 + (b.attn.gate_w.numel() if b.attn.gate_w is not None else 0) for b in model.blocks]
    head = model.tok_emb.weight.numel()
    bigram = model.bigram.proj.weight.numel() if model.bigram is not None else 0
    return sum(per_block[i] for i in tg.layer_schedule(model.h, looping)) + bigram + head


@pytest.mark.parametrize("name", sorted(PARAM_CONFIGS))
def test_param_count_matches_gpt(name):
    """The FLOP model's parameter count and matmul weights equal train_gpt.GPT's, for the hyperparameters as the
    log records them (asdict(h), the `hyperparameters` line). The model is built on the meta device (no init cost)."""
    h = tg.Hyperparameters.from_env(PARAM_CONFIGS[name])
    with torch.device("meta"):
        model = tg.GPT(h)
    hp = json.loads(json.dumps(dataclasses.asdict(h)))
    assert rb.expected_param_count(hp) == sum(p.numel() for p in model.parameters())
    assert rb.matmul_params(hp) == model_matmul_params(model, looping=False)
    assert rb.matmul_params(hp, looping=True) == model_matmul_params(model, looping=True)
    if name == "seed":
        assert rb.expected_param_count(hp) == PARAMS
    if name == "frontier":  # every new parameter kind is present
        assert h.vocab_size == 8192 and h.mlp_mult == 4.0
        names = {n.split(".")[-1] for n, _ in model.named_parameters()}
        assert {"gate_w", "skip_gates", "lane_write", "lane_keep"} <= names


def test_mfu_with_looping_and_other_gpus():
    loop = {**HP, "num_loops": 1}
    s = rb.summarize(rb.parse_log(synthetic_log(loop, looping_step=1700, world=1)))
    avg = (1700 * FLOPS_11 + 5100 * FLOPS_13) / 6800
    assert s["flops_per_token"] == pytest.approx(avg)
    assert s["mfu"] == pytest.approx(avg * 9094792 / (1 * 989e12))
    assert rb.summarize(rb.parse_log(synthetic_log(HP, gpu="NVIDIA H200")))["peak_flops"] == 989e12
    assert rb.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert rb.summarize(rb.parse_log(synthetic_log(HP, gpu="Mystery GPU")))["mfu"] is None
    override = rb.summarize(rb.parse_log(synthetic_log(HP, gpu="Mystery GPU")), peak_override=500e12)
    assert override["mfu"] == pytest.approx(FLOPS_11 * 9094792 / (8 * 500e12))


def test_cpu_and_truncated_logs():
    cpu = synthetic_log(HP).replace("device:cuda:0", "device:cpu").replace("gpu:NVIDIA H100 80GB HBM3", "gpu:none")
    s = rb.summarize(rb.parse_log(cpu))
    assert s["gpu"] is None and s["mfu"] is None and s["steps"] == 6800
    cut = synthetic_log(HP).split("training stopped")[0]  # a run that died mid-training
    s = rb.summarize(rb.parse_log(cut))
    assert s["steps"] is None and s["mfu"] is None and s["final_bpb"] is None and s["quant_gap"] is None


def test_table_config_and_errors():
    assert rb.parse_config("loops=NUM_LOOPS=1,LOOP_START=4,LOOP_END=5") == (
        "loops", {"NUM_LOOPS": "1", "LOOP_START": "4", "LOOP_END": "5"})
    assert rb.parse_config("full=") == ("full", {})
    rows = [{"name": "full", "returncode": 0, "steps": 10, "final_bpb": 1.20, "mfu": 0.25, "bytes_total": 123},
            {"name": "no_x", "returncode": 0, "steps": 10, "final_bpb": 1.21},
            {"name": "bad", "returncode": 1}]
    table = rb.markdown_table(rows, baseline="full").splitlines()
    assert table[0].endswith("| Δ bpb vs full |") and len(table) == 5
    assert "25.0%" in table[2] and "| 123 |" in table[2] and table[2].endswith("| +0.0000 |")
    assert table[3].endswith("| +0.0100 |") and "FAILED rc=1" in table[4]
    out = "Traceback...\nKnobError: MLP_ACT='gelu' is bad\n" \
          "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    assert rb.first_exception(out) == "KnobError: MLP_ACT='gelu' is bad"


# ----------------------------------------------------------------------------------------------
# the built-in ablations
# ----------------------------------------------------------------------------------------------

NEW_ABLATIONS = {"doc_mask": "attn_doc_mask", "attn_gate": "attn_gate", "skip_gates": "skip_gates",
                 "two_lane": "parallel_lanes", "muon_eq_r": "muon_eq_r", "polar_ns": "muon_ns_coeffs",
                 "gptq_embed": "gptq_embed", "lqer": "lqer_rank",
                 "quant_small_fp16": "quant_small_bits", "ttt_lora": "ttt_mode", "ttt_phased": "ttt_mode",
                 "frontier": "preset"}


def test_ablations_parse_and_each_changes_the_run():
    """Every ablation's knobs are Hyperparameters fields that from_env accepts, and each changes the run it is
    named after (a typo'd value or a knob that is already the default would be a silent no-op row)."""
    names = [n for n, _ in rb.ABLATIONS]
    assert names[0] == "full" and rb.ABLATIONS[0][1] == {} and len(set(names)) == len(names)
    assert set(NEW_ABLATIONS) <= set(names)
    assert "sdclip" not in names  # SDClip is the only clip rule now: there is nothing to switch on
    known = rb.known_knobs(str(ROOT / "train_gpt.py"))
    base = dataclasses.asdict(tg.Hyperparameters.from_env({}))
    for name, knobs in rb.ABLATIONS:
        assert set(knobs) <= known, name
        h = dataclasses.asdict(tg.Hyperparameters.from_env(knobs))
        changed = {k for k in h if h[k] != base[k]}
        if name == "full":
            assert not changed
            continue
        assert changed, f"ablation {name} changes nothing"
        if name in NEW_ABLATIONS:
            assert NEW_ABLATIONS[name] in changed, (name, changed)
    assert dataclasses.asdict(tg.Hyperparameters.from_env({"PRESET": "frontier"}))["vocab_size"] == 8192
    assert rb.ABLATION_VOCAB == {"frontier": 8192}
    two_lane = tg.Hyperparameters.from_env(dict(rb.ABLATIONS)["two_lane"])
    assert (two_lane.parallel_resid_from, two_lane.parallel_lanes) == (7, 2)


def test_frontier_ablation_skipped_on_sp1024_data(sample_data, capsys):
    """--ablations on sp1024 shards: the frontier row (sp8192) is skipped with a message, the others are planned;
    a VOCAB_SIZE knob keeps it."""
    args = ["--data-path", str(sample_data), "--ablations", "--dry-run", "--only", "full,frontier,lqer"]
    assert rb.main(args) == 0
    out = capsys.readouterr().out
    assert "[bench] skipping frontier: it needs sp8192" in out and "1024 pieces" in out
    planned = [line[2:] for line in out.splitlines() if line.startswith("# ")]
    assert planned == ["full", "lqer"]
    assert rb.main(args + ["--knob", "VOCAB_SIZE=1024"]) == 0
    out = capsys.readouterr().out
    assert "[bench] skipping" not in out and [line[2:] for line in out.splitlines() if line.startswith("# ")] == \
        ["full", "lqer", "frontier"]
    assert "PRESET=frontier" in out


# ----------------------------------------------------------------------------------------------
# bench/artifact_size.py
# ----------------------------------------------------------------------------------------------


def test_artifact_size_tool(sample_data, monkeypatch):
    """The tool measures the artifact of the env's config at its initial weights: one JSON line per variant, the
    bytes of exactly that quantization (rebuilt here), fewer bits -> fewer bytes, and AUTO_FIT under a budget."""
    for k, v in {**TINY_KNOBS, "DATA_PATH": str(sample_data), "ZSTD_LEVEL": "3"}.items():
        monkeypatch.setenv(k, v)
    budget = 100_000  # under the base size (~126 KB with SDClip steps), so AUTO_FIT must search
    monkeypatch.setenv("MAX_ARTIFACT_BYTES", str(tg.code_bytes() + budget))
    def run(*argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            artifact_size.main(list(argv))
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("params:")
        return {r["variant"]: r for r in map(json.loads, lines[1:])}

    rows = run("--variants", "base,mlp4,small8+lqer2+gptq_embed", "--gptq-seqs", "4", "--calib-seq-len", "64")
    rows.update(run("--variants", "fit"))  # plain rounding: AUTO_FIT's trials with GPTQ take seconds each
    assert set(rows) == {"base", "mlp4", "small8+lqer2+gptq_embed", "fit"}
    for r in rows.values():
        assert r["bytes_total"] == r["bytes_model"] + tg.code_bytes()
        assert r["gptq"] is (r["variant"] != "fit")
    assert rows["mlp4"]["bytes_model"] < rows["base"]["bytes_model"]
    assert rows["base"]["bytes_model"] > budget >= rows["fit"]["bytes_model"] >= 0.997 * budget
    assert "searched" in rows["fit"]["auto_fit"]
    # the base figure is the serialized quantize_state of the tool's model and Hessians
    h = tg.Hyperparameters.from_env()
    model = artifact_size.init_model(h)
    hessians = artifact_size.calibration_hessians(model, h, 4, 64, gptq_embed=False)
    blob = tg.serialize_artifact(tg.quantize_state(model, h, hessians), tg.model_config(h, False), h)
    assert len(blob) == rows["base"]["bytes_model"]
    # the combined variant is exactly its knobs (int8 small tensors, LQER, GPTQ on the embedding) on the same model
    hc = dataclasses.replace(h, quant_small_bits=8, lqer_rank=2, gptq_embed=True)
    hessians_e = artifact_size.calibration_hessians(model, h, 4, 64, gptq_embed=True)
    assert set(hessians_e) == set(hessians) | {"tok_emb.weight"}
    blob = tg.serialize_artifact(tg.quantize_state(model, hc, hessians_e), tg.model_config(hc, False), hc)
    assert len(blob) == rows["small8+lqer2+gptq_embed"]["bytes_model"] != rows["base"]["bytes_model"]
    assert artifact_size.parse_variant("small8+lqer2+gptq_embed") == {"quant_small_bits": 8, "lqer_rank": 2,
                                                                    "gptq_embed": True, "auto_fit": False}
    for removed in ("bitpack", "sdclip"):  # removed formats and the removed clip switch are refused, not ignored
        with pytest.raises(ValueError, match="unknown variant tag"):
            artifact_size.parse_variant(f"mlp5+{removed}")
        with pytest.raises(SystemExit):
            artifact_size.main(["--variants", removed])
