"""bench/run_bench.py: log parser, FLOP/MFU arithmetic and the results table, on a synthetic log (no training)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("run_bench", ROOT / "bench" / "run_bench.py")
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)

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
#           + smear 512 + skip weights 6*512  (checked against GPT(Hyperparameters()) when this was written)
PARAMS = 27_879_001


def synthetic_log(hp: dict, *, gpu="NVIDIA H100 80GB HBM3", world=8, looping_step=None) -> str:
    lines = [
        "W1123 12:00:00.000000 1 torch/distributed/run.py:766] Setting OMP_NUM_THREADS ...",  # torchrun noise
        f"run_id:full torch:2.8.0 device:cuda:0 world:{world} grad_accum:{8 // world} gpu:{gpu}",
        "hyperparameters " + json.dumps(hp, sort_keys=True),
        "val_tokens:62021632",
        f"params:{PARAMS} bigram:1376257 blocks.attn:8650840 blocks.mlp:17301504 skip_weights:3072 smear:512 "
        "tok_emb:524288",
        "warmup: 20 priming steps run and undone",
        "step:1/20000 train_loss:6.9312 lr_mul:1.0000 train_time:0.1s step_avg:95.00ms",
        "step:1000 val_loss:2.500000 val_bpb:1.480000 train_time:87.0s step_avg:87.00ms",
        "qat:on step:5800 frac:0.850 bits attn:6 mlp:5 lr_factor:1.0",
    ]
    if looping_step is not None:
        lines.append(f"looping:on step:{looping_step} frac:0.500 layers:[0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]")
    lines += [
        "step:6800/20000 train_loss:2.1234 lr_mul:0.0100 train_time:588.0s step_avg:86.47ms",
        "step:6800 val_loss:1.950000 val_bpb:1.155000 train_time:588.0s step_avg:86.47ms",
        "training stopped step:6800 train_time:588.0s tokens:5347737600 tokens_per_s:9094792",
        "peak_memory_allocated_mib:21500",
        "averaging:ema decay:0.997 applied:yes",
        "weights_in_sync hashes:[1, 1, 1, 1, 1, 1, 1, 1]",
        "pre_quant val_loss:1.94000000 val_bpb:1.14900000",
        "gptq: calibration on 64 training sequences, 66 Hessians, 3.2s",
        "export: zstd bitpack:0 prune:0.0 -> final_model.ptz 15800000 bytes in 20.5s",
        "auto_fit: zeroed 10 of 2000 +-1 codes: 16000100 -> 15800000 bytes (limit 16000000)",
        "train_plus_export_time:612.0s",
        "bytes_model:15800000 bytes_code:67522 bytes_total:15867522 limit:16000000",
        "final_roundtrip val_loss:1.95200000 val_bpb:1.15600000 tokens:62021632 bytes:151000000 eval_time:3.1s",
        "final_sliding val_loss:1.91500000 val_bpb:1.13400000 tokens:62021632 bytes:151000000 eval_time:80.2s",
        "final_ttt val_loss:1.90800000 val_bpb:1.13000000 tokens:62021632 bytes:151000000 eval_time:350.4s",
        "eval_total_time:433.7s world:8 est_8gpu:433.7s (limit 600s)",
        "quant_gap val_bpb:+0.007000 (pre 1.149000 -> roundtrip 1.156000)",
        "final val_loss:1.90800000 val_bpb:1.13000000 source:ttt",
        "bytes_model:15800000",
        "bytes_code:67522",
        "bytes_total:15867522",
    ]
    return "\n".join(lines) + "\n"


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
    assert p["eval_seconds"] == 433.7 and p["final_bpb"] == 1.13 and p["final_source"] == "ttt"
    assert (p["bytes_model"], p["bytes_code"], p["bytes_total"]) == (15800000, 67522, 15867522)
    assert p["export_seconds"] == 20.5 and p["train_plus_export_seconds"] == 612.0
    assert p["auto_fit"].startswith("zeroed 10 of 2000")


def test_summary_and_mfu():
    s = rb.summarize(rb.parse_log(synthetic_log(HP)))
    assert s["steps"] == 6800 and s["ms_per_step"] == 86.47 and s["tokens_per_s"] == 9094792
    assert (s["pre_quant_bpb"], s["roundtrip_bpb"], s["sliding_bpb"], s["ttt_bpb"]) == (1.149, 1.156, 1.134, 1.13)
    assert s["flops_per_token"] == FLOPS_11 and s["flops_model_matches_params"] is True
    assert s["peak_flops"] == 989e12
    assert s["mfu"] == pytest.approx(FLOPS_11 * 9094792 / (8 * 989e12))
    assert 0.2 < s["mfu"] < 0.3  # 26.3%
    assert s["eval_seconds"] == 433.7 and s["bytes_total"] == 15867522 and s["peak_memory_mib"] == 21500


def test_flop_model_pieces():
    assert rb.matmul_params(HP) == 26_542_080
    assert rb.flops_per_token(HP) == FLOPS_11
    assert rb.expected_param_count(HP) == PARAMS
    no_bigram = {**HP, "bigram_buckets": 0}
    assert rb.flops_per_token(no_bigram) == FLOPS_11 - 6 * 128 * 512
    loop = {**HP, "num_loops": 1}
    assert rb.flops_per_token(loop, looping=True) == FLOPS_13
    assert rb.expected_param_count(loop) == PARAMS + 512  # one more U-Net skip row for the 13-layer schedule


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
    names = rb.known_knobs(str(ROOT / "train_gpt.py"))
    for _, knobs in rb.ABLATIONS:  # every built-in ablation names real knobs
        assert set(knobs) <= names
