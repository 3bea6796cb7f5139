"""Shared fixtures: tiny challenge-format data built from the embedded sample, and tiny-model knobs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import train_gpt  # noqa: E402

# A model small enough for a 2-core CPU; every part of the seed stack stays switched on.
TINY_KNOBS = {
    "NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "3",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "4096", "ITERATIONS": "12", "MAX_WALLCLOCK_SECONDS": "0",
    "WARMUP_STEPS": "1", "VAL_MAX_TOKENS": "4096", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "16",
    "VAL_BATCH_SEQS": "16", "TTT_CHUNK_TOKENS": "1024", "TTT_EPOCHS": "1", "TTT_BATCH_SEQS": "8",
    "BIGRAM_BUCKETS": "256", "BIGRAM_DIM": "16", "ROPE_DIMS": "8", "XSA_LAST_N": "2",
    "GPTQ_CALIB_TOKENS": "512", "PASSTHROUGH_MAX_NUMEL": "1024", "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "1",
    "AVERAGING": "none", "QAT_START_FRAC": "0.5", "SLIDING_EVAL": "1", "MATRIX_LR": "0.02", "EMBED_LR": "0.05",
}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread, like OMP_NUM_THREADS=1 for the script runs: the tensors here are tiny, and on a busy
    2-core machine a second OpenMP thread only spins (tiny forward passes ran ~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> Path:
    """Shards + tokenizer.model from data/sample (built once per test session, in seconds)."""
    import build_shards

    out = tmp_path_factory.mktemp("sample_shards")
    sample = ROOT / "data" / "sample"
    committed_tok = sample / "sample_1024_bpe.model"
    build_shards.build(
        [sample / "sample_train.jsonl.zst"], out, val_input=[sample / "sample_val.jsonl.zst"],
        tokenizer=committed_tok if committed_tok.is_file() else None, vocab_size=1024)
    return out


@pytest.fixture
def tiny_hparams(sample_data):
    """Hyperparameters for the tiny model on the sample data (no env vars touched)."""
    env = {**TINY_KNOBS, "DATA_PATH": str(sample_data), "TOKENIZER_PATH": str(sample_data / "tokenizer.model")}
    return train_gpt.Hyperparameters.from_env(env)


@pytest.fixture
def tiny_env(sample_data, tmp_path):
    """Environment for running train_gpt.py as a subprocess in tmp_path."""
    env = {k: v for k, v in os.environ.items() if k.upper() not in {n.upper() for n in TINY_KNOBS}}
    env.update(TINY_KNOBS)
    env.update({"DATA_PATH": str(sample_data), "TOKENIZER_PATH": str(sample_data / "tokenizer.model"),
                "LOG_DIR": str(tmp_path / "logs"), "ARTIFACT_PATH": str(tmp_path / "model.ptz"),
                "RUN_ID": "test", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    return env
