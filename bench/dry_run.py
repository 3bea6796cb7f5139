"""Dry run of a full-size configuration on CPU: every phase of train_gpt.main() (training with QAT and looping
switching on, EMA, calibration, GPTQ, the budget search and export, roundtrip, sliding-window and TTT evaluation)
on one small batch of synthetic tokens, plus the parameter count and an estimate of the GPU memory per rank.

Usage: [KNOB=VALUE ...] python bench/dry_run.py [KNOB=VALUE ...] [--workdir DIR] [--estimate-only]

The knobs (environment, then the arguments, which win) define the configuration, as for train_gpt.py: nothing
given is the default stack (11 x 512, seq 2048, vocab 1024), PRESET=frontier the frontier stack. The dry run then
shrinks only the amount of work (DRY_KNOBS below: 2 steps of 8 one-sequence micro-batches, QAT and looping from
step 2, 2 evaluation windows, one calibration sequence, one TTT step per phase; bf16 autocast as on the GPU,
eager), so every matrix keeps its real shape and the export is the real size. The tokens are random ids with a BOS (id 1) every 997 tokens, and there is no
tokenizer for an arbitrary vocabulary: every token counts 1 byte, so val_bpb is meaningless (only that it is
finite). What it checks: that the configuration builds, trains, exports under the byte budget and evaluates
without an error, the artifact bytes of the full-size export, and the time each phase takes on CPU.

Memory estimate (per rank, for the configuration's real TRAIN_BATCH_TOKENS: TRAIN_BATCH_TOKENS/8 tokens per
micro-batch on any number of GPUs): activation bytes per token, measured on CPU as the storages autograd saves
during one forward pass of one sequence (and of two, whose difference is the per-token part) under bf16 autocast
with looping and QAT on, plus fp32 weights, gradients and DDP buckets (4 bytes per parameter each), AdamW state (8
bytes per AdamW parameter), Muon momentum (4 bytes per Muon parameter) and the EMA (4 bytes per parameter). It is an
estimate: the compiled GPU graph saves a different set of tensors than eager CPU autograd, and allocator
fragmentation, the CUDA context and temporary buffers are not counted. With ATTN_DOC_MASK the measurement uses plain
causal attention (the CPU training path builds a dense T x T mask, flex_attention on the GPU saves what flash
attention saves).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import train_gpt as tg  # noqa: E402
from data.shard_io import write_shard  # noqa: E402

CPU = torch.device("cpu")
DOC_LEN = 997  # a BOS every DOC_LEN tokens
SAMPLE_TOKENIZER = os.path.join(ROOT, "data", "sample", "sample_1024_bpe.model")


def dry_knobs(h: tg.Hyperparameters) -> dict[str, str]:
    """The work-shrinking knobs for configuration h (sizes derived from its sequence lengths)."""
    return {
        "ITERATIONS": "2", "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "0", "VAL_LOSS_EVERY": "0",
        "TRAIN_LOG_EVERY": "1", "TRAIN_BATCH_TOKENS": str(8 * h.train_seq_len), "VAL_MAX_TOKENS": str(2 * h.eval_seq_len),
        "VAL_BATCH_SEQS": "1", "QAT_START_FRAC": "0.5", "LOOP_ENABLE_FRAC": "0.5", "GPTQ_CALIB_TOKENS": str(h.train_seq_len),
        "SLIDING_EVAL": "1", "EVAL_STRIDE": str(h.eval_seq_len // 2), "TTT_CHUNK_TOKENS": str(h.eval_seq_len),
        "TTT_EPOCHS": "1", "TTT_BATCH_SEQS": "1", "TTT_LORA_DOCS": "1", "TTT_LORA_CHUNK": "512", "TTT_PHASES": "1",
        "TTT_PHASE_DOCS": "1", "DEVICE": "cpu", "COMPILE": "0", "AUTOCAST": "bf16", "EVAL_ONLY": "0",
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("knobs", nargs="*", help="KNOB=VALUE settings (win over the environment)")
    p.add_argument("--workdir", help="keep the shards, log and artifact here (default: a temporary directory)")
    p.add_argument("--estimate-only", action="store_true", help="print the parameter count and memory estimate only")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy 2-core machine a second OpenMP thread made GPTQ's "
                        "column loop 40x and a training step 3x slower)")
    args = p.parse_args(argv)
    knobs = {}
    for item in args.knobs:
        key, sep, value = item.partition("=")
        if not sep or not key.isupper():
            p.error(f"expected KNOB=VALUE, got {item!r}")
        knobs[key] = value
    return args, knobs


def config_env(knobs: dict[str, str]) -> dict[str, str]:
    """The knobs of the configuration: the environment's train_gpt knobs (and PRESET), then the arguments."""
    names = {f.upper() for f in tg.Hyperparameters.__dataclass_fields__}
    env = {k: v for k, v in os.environ.items() if k in names}
    env.update(knobs)
    return env


def write_synthetic_shards(directory: str, h: tg.Hyperparameters, seed: int = 0) -> tuple[int, int]:
    """A train shard for the dry run's steps and calibration and a val shard for its evaluation windows."""
    rng = np.random.default_rng(seed)
    seq = max(h.train_seq_len, h.eval_seq_len)
    sizes = {"train": 20 * (seq + 1), "val": 4 * seq + 1}
    for split, n in sizes.items():
        tokens = rng.integers(2, h.vocab_size, size=n, dtype=np.int64) if h.vocab_size > 2 else np.zeros(n, np.int64)
        tokens[::DOC_LEN] = tg.BOS_ID
        write_shard(os.path.join(directory, f"fineweb_{split}_000000.bin"), tokens)
    return sizes["train"], sizes["val"]


def one_byte_luts(sp, vocab_size, device=None):
    """build_byte_luts stand-in: every token is 1 byte (no tokenizer exists for a synthetic vocabulary)."""
    return (torch.ones(vocab_size, dtype=torch.int16, device=device),
            torch.zeros(vocab_size, dtype=torch.bool, device=device),
            torch.zeros(vocab_size, dtype=torch.bool, device=device))


def saved_activation_bytes(model: tg.GPT, h: tg.Hyperparameters, n_seqs: int) -> int:
    """Bytes of the distinct storages autograd saves for backward in one bf16-autocast forward pass of n_seqs
    sequences (the parameters themselves excluded: they are counted as weights)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, h.vocab_size, (n_seqs, h.train_seq_len), generator=g)
    y = torch.randint(2, h.vocab_size, (n_seqs, h.train_seq_len), generator=g)
    no_mask = contextlib.nullcontext()
    if h.attn_doc_mask:  # see the module docstring
        original = tg.document_mask
        tg.document_mask = lambda ids: None
        no_mask = contextlib.ExitStack()
        no_mask.callback(setattr, tg, "document_mask", original)
    with no_mask, torch.autocast("cpu", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, y)
    del loss
    return sum(saved.values())


def memory_estimate(h: tg.Hyperparameters, log=print) -> dict:
    torch.manual_seed(h.seed)
    model = tg.GPT(h)
    adam, muon = tg.build_optimizers(model, h, tg.Runtime(CPU))
    n_params = sum(p.numel() for p in model.parameters())
    n_adam = sum(p.numel() for g in adam.param_groups for p in g["params"])
    n_muon = sum(p.numel() for g in muon.param_groups for p in g["params"])
    assert n_adam + n_muon == n_params, (n_adam, n_muon, n_params)
    log(tg.parameter_report(model))
    log(f"params: {n_params:,} (Muon {n_muon:,}, AdamW {n_adam:,})")
    model.set_looping(True)
    model.set_qat(h.qat)
    t0 = time.perf_counter()
    one, two = saved_activation_bytes(model, h, 1), saved_activation_bytes(model, h, 2)
    per_token = (two - one) / h.train_seq_len
    fixed = one - per_token * h.train_seq_len  # saved once per forward, whatever the batch (bf16 weight copies)
    micro_tokens = h.train_batch_tokens // 8
    gib = 2.0 ** 30
    parts = {
        "activations": fixed + per_token * micro_tokens,
        "weights+grads+ddp_buckets": 12 * n_params,
        "adamw_state": 8 * n_adam,
        "muon_momentum": 4 * n_muon,
        "ema": 4 * n_params if h.averaging != "none" else 0,
    }
    total = sum(parts.values())
    log(f"activations measured in {time.perf_counter() - t0:.1f}s: one sequence of {h.train_seq_len} saves "
        f"{one / 2**20:.1f} MiB = {one / h.train_seq_len / 1024:.1f} KiB/token; per extra token "
        f"{per_token / 1024:.1f} KiB, fixed {fixed / 2**20:.1f} MiB (bf16 autocast, looping:{int(model.looping)} "
        f"qat:{int(h.qat)}{', doc mask measured as causal' if h.attn_doc_mask else ''})")
    log(f"gpu_memory_per_rank (estimate) for TRAIN_BATCH_TOKENS={h.train_batch_tokens} ({micro_tokens} tokens per "
        f"micro-batch): " + " ".join(f"{k}:{v / gib:.2f}GiB" for k, v in parts.items()) + f" total:{total / gib:.2f}GiB")
    return {"params": n_params, "muon_params": n_muon, "adamw_params": n_adam, "act_bytes_per_token": per_token,
            "act_fixed_bytes": fixed, "memory_parts": parts, "memory_total": total}


def run_main(env: dict[str, str]) -> float:
    """train_gpt.main() in this process with exactly the knobs in env; returns its wall time."""
    names = {f.upper() for f in tg.Hyperparameters.__dataclass_fields__} | {"PRESET"}
    saved = {k: os.environ.get(k) for k in names | set(env)}
    saved_luts = tg.build_byte_luts
    for k in names:
        os.environ.pop(k, None)
    os.environ.update(env)
    tg.build_byte_luts = one_byte_luts
    t0 = time.perf_counter()
    try:
        tg.main()
    finally:
        tg.build_byte_luts = saved_luts
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return time.perf_counter() - t0


def summarize(log_text: str, seconds: float, log=print) -> dict:
    def find(pattern, cast=float):
        m = re.search(pattern, log_text, re.M)
        return cast(m.group(1)) if m else None

    out = {
        "seconds": seconds,
        "bytes_model": find(r"^bytes_model:(\d+)$", int), "bytes_total": find(r"^bytes_total:(\d+)$", int),
        "train_time": find(r"^training stopped step:\d+ train_time:([0-9.]+)s"),
        "export_seconds": find(r"^export: .* bytes in ([0-9.]+)s"),
        "auto_fit_trials": find(r"^auto_fit: .* (\d+) (?:quantization )?trials", int),
        "calibration_seconds": find(r"^calibration: .* in ([0-9.]+)s"),
        "eval_seconds": {n: float(t) for n, t in re.findall(r"^final_(\w+) .* eval_time:([0-9.]+)s", log_text, re.M)},
        "final_bpb": find(r"^final val_loss:\S+ val_bpb:(\S+)"),
        "steps": find(r"^training stopped step:(\d+)", int),
    }
    log(f"dry_run: main() took {seconds:.1f}s: training {out['train_time']}s, calibration "
        f"{out['calibration_seconds']}s, export {out['export_seconds']}s ({out['auto_fit_trials']} quantization "
        f"trials), evaluation {out['eval_seconds']}")
    log(f"dry_run: artifact of the full-size export: bytes_model:{out['bytes_model']} bytes_total:{out['bytes_total']} "
        f"(2 training steps on random tokens: trained weights compress differently)")
    log(f"dry_run: final val_bpb:{out['final_bpb']} is meaningless (random tokens, every token counted as 1 byte)")
    return out


def dry_run(knobs: dict[str, str], workdir: str | None = None, estimate_only: bool = False, log=print) -> dict:
    env = config_env(knobs)
    h = tg.Hyperparameters.from_env(env)
    log(f"dry_run: configuration preset:{h.preset} layers:{h.num_layers} dim:{h.model_dim} vocab:{h.vocab_size} "
        f"seq:{h.train_seq_len} loops:{h.num_loops} ttt:{h.ttt_mode if h.ttt else 'off'} "
        f"(knobs: {' '.join(f'{k}={v}' for k, v in sorted(env.items())) or 'defaults'})")
    result = memory_estimate(h, log)
    if estimate_only:
        return result
    with contextlib.ExitStack() as stack:
        work = workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="dry_run_"))
        os.makedirs(work, exist_ok=True)
        n_train, n_val = write_synthetic_shards(work, h)
        shrink = dry_knobs(h)
        run_env = {**env, **shrink, "DATA_PATH": work, "TOKENIZER_PATH": SAMPLE_TOKENIZER,
                   "LOG_DIR": os.path.join(work, "logs"), "ARTIFACT_PATH": os.path.join(work, "final_model.ptz"),
                   "RUN_ID": "dry_run"}
        log(f"dry_run: synthetic shards train:{n_train} val:{n_val} tokens (BOS every {DOC_LEN}); byte tables: 1 byte "
            f"per token; work knobs: {' '.join(f'{k}={v}' for k, v in shrink.items())}")
        seconds = run_main(run_env)
        with open(os.path.join(work, "logs", "dry_run.txt"), encoding="utf-8") as f:
            log_text = f.read()
        result.update(summarize(log_text, seconds, log))
        result["log"] = log_text
    return result


def main(argv=None):
    args, knobs = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dry_run(knobs, args.workdir, args.estimate_only)
    print(f"dry_run: total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
