"""Parameter Golf submission: a small GPT trained in 10 minutes on 8xH100, exported under 16,000,000 bytes.

Launch: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (also 1 process, or a CPU with tiny knobs).
Every setting is an environment variable; see `Hyperparameters` for the names and defaults.
Sections follow the data: knobs, data, model, optimizers, averaging and QAT, quantization and export,
evaluation, training loop, main.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import difflib
import gc
import glob
import hashlib
import json
import lzma
import math
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

try:
    import zstandard
except ImportError:  # only needed when COMPRESSOR=zstd; checked where used
    zstandard = None

# ----------------------------------------------------------------------------------------------
# Knobs
# ----------------------------------------------------------------------------------------------


class KnobError(ValueError):
    pass


@dataclass
class Hyperparameters:
    # data and run
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = "./data/tokenizers/fineweb_1024_bpe.model"
    run_id: str = ""
    log_dir: str = "logs"
    artifact_path: str = "final_model.ptz"
    seed: int = 1337
    device: str = "auto"
    compile: bool = True
    val_max_tokens: int = 0  # 0 = the whole validation split
    train_seq_len: int = 2048
    train_batch_tokens: int = 786_432
    iterations: int = 20_000
    max_wallclock_seconds: float = 600.0  # 0 = no cap; the schedule then runs on ITERATIONS
    warmup_steps: int = 20  # compile priming; weights, optimizer and loader are restored afterwards
    warmdown_frac: float = 0.5
    min_lr_frac: float = 0.0
    val_loss_every: int = 1000
    train_log_every: int = 100
    val_batch_seqs: int = 32
    # model
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    mlp_act: str = "leaky_relu2"
    leaky_slope: float = 0.5
    logit_softcap: float = 30.0
    rope_base: float = 10_000.0
    rope_dims: int = 16  # rotated dims per head; 0 = all
    rope_ntk: bool = True  # NTK-aware base rescaling when a sequence is longer than TRAIN_SEQ_LEN
    qk_gain_init: float = 1.5
    ln_scale: bool = True
    xsa_last_n: int = 4
    smear_gate: bool = True
    bigram_buckets: int = 10_240  # 0 = no BigramHash
    bigram_dim: int = 128
    ortho_init: bool = True
    overtone_init: bool = False
    unet_skips: bool = True
    tied_embed_init_std: float = 0.005
    parallel_resid_from: int = -1  # physical layer index from which blocks run attention and MLP in parallel
    num_loops: int = 0  # extra passes over layers LOOP_START..LOOP_END (depth recurrence); 0 = off
    loop_start: int = 4
    loop_end: int = 5
    loop_enable_frac: float = 0.5
    # optimizers
    matrix_lr: float = 0.025
    scalar_lr: float = 0.025
    embed_lr: float = 0.035
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_ns_steps: int = 5
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    # averaging and QAT
    averaging: str = "ema"
    ema_decay: float = 0.997
    swa_start_lr: float = 0.5  # SWA collects while the LR multiplier is below this
    swa_every: int = 50
    qat: bool = True
    qat_start_frac: float = 0.85
    qat_lr_factor: float = 1.0
    # quantization and export
    quant_attn_bits: int = 6
    quant_mlp_bits: int = 5
    quant_embed_bits: int = 8
    quant_bigram_bits: int = 6
    passthrough_max_numel: int = 65_536
    gptq: bool = True
    gptq_calib_seqs: int = 64
    gptq_reserve_seconds: float = 12.0
    gptq_block: int = 128
    gptq_damp: float = 0.01
    prune_frac: float = 0.0
    bitpack: bool = False
    compressor: str = "zstd"
    zstd_level: int = 22
    max_artifact_bytes: int = 16_000_000
    auto_fit: bool = True  # when over budget, widen the quantization steps until the artifact fits
    # evaluation
    eval_only: bool = False
    eval_seq_len: int = 2048
    eval_stride: int = 64
    sliding_eval: bool = False  # TTT already scores every sliding window; a separate pass costs eval time
    ttt: bool = True
    ttt_optimizer: str = "sgd"
    ttt_lr: float = 0.002
    ttt_momentum: float = 0.9
    ttt_epochs: int = 3
    ttt_chunk_tokens: int = 32_768
    ttt_freeze_blocks: int = 0
    ttt_batch_seqs: int = 32
    ttt_grad_clip: float = 1.0
    ttt_lr_horizon: int = 62_000_000  # tokens over which the TTT lr decays to 0 (cosine; ~ the FineWeb val split)

    @classmethod
    def from_env(cls, env=None) -> "Hyperparameters":
        env = os.environ if env is None else env
        names = {f.name.upper(): f for f in fields(cls)}
        values = {}
        for key, raw in env.items():
            if key in names:
                values[names[key].name] = _parse_knob(key, raw, names[key].default)
            elif key.isupper() and len(key) > 5:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.9)
                if close:
                    raise KnobError(f"unknown knob {key}={raw!r}; did you mean {close[0]}?")
        h = cls(**values)
        h.validate()
        return h

    def validate(self):
        choices = {"mlp_act": ("relu2", "leaky_relu2"), "averaging": ("ema", "swa", "none"),
                   "compressor": ("zstd", "lzma"), "ttt_optimizer": ("sgd", "adamw"),
                   "device": ("auto", "cuda", "cpu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise KnobError(f"{name.upper()}={getattr(self, name)!r} is not one of {allowed}")
        positive = ("num_layers", "model_dim", "num_heads", "num_kv_heads", "vocab_size", "train_seq_len",
                    "train_batch_tokens", "eval_seq_len", "eval_stride", "val_batch_seqs", "ttt_chunk_tokens",
                    "ttt_batch_seqs", "gptq_calib_seqs", "gptq_block", "swa_every", "muon_ns_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise KnobError(f"{name.upper()} must be positive, got {getattr(self, name)}")
        for name in ("quant_attn_bits", "quant_mlp_bits", "quant_embed_bits", "quant_bigram_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise KnobError(f"{name.upper()} must be in 2..8, got {getattr(self, name)}")
        head_dim, rem = divmod(self.model_dim, self.num_heads)
        if rem or head_dim % 2 or self.num_heads % self.num_kv_heads:
            raise KnobError("MODEL_DIM must split into NUM_HEADS even-sized heads, NUM_HEADS into NUM_KV_HEADS groups")
        if self.rope_dims % 2 or self.rope_dims > head_dim or self.rope_dims < 0:
            raise KnobError(f"ROPE_DIMS must be even and at most the head dim {head_dim}")
        if self.eval_stride > self.eval_seq_len:
            raise KnobError("EVAL_STRIDE must not exceed EVAL_SEQ_LEN")
        if self.bigram_buckets == 1 or self.bigram_buckets < 0:
            raise KnobError("BIGRAM_BUCKETS must be 0 (off) or at least 2")
        if self.num_loops and not 0 <= self.loop_start <= self.loop_end < self.num_layers:
            raise KnobError("need 0 <= LOOP_START <= LOOP_END < NUM_LAYERS when NUM_LOOPS > 0")
        if not 0.0 <= self.prune_frac < 1.0 or not 0.0 <= self.warmdown_frac <= 1.0:
            raise KnobError("PRUNE_FRAC must be in [0, 1) and WARMDOWN_FRAC in [0, 1]")


def _parse_knob(key: str, raw: str, default):
    text = raw.strip()
    try:
        if isinstance(default, bool):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
        return text
    except ValueError:
        raise KnobError(f"knob {key}={raw!r} is malformed: expected {type(default).__name__}") from None


# Knobs that define the network; the artifact stores them so it can be evaluated alone.
MODEL_KNOBS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "mlp_act",
               "leaky_slope", "logit_softcap", "rope_base", "rope_dims", "rope_ntk", "qk_gain_init", "ln_scale",
               "xsa_last_n", "smear_gate", "bigram_buckets", "bigram_dim", "unet_skips", "parallel_resid_from",
               "num_loops", "loop_start", "loop_end", "train_seq_len")

# ----------------------------------------------------------------------------------------------
# Data: shards, token loader, validation tokens, byte counting
# ----------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
BOS_ID = 1


def load_shard(path: str) -> np.ndarray:
    header_bytes = SHARD_HEADER_INTS * 4
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shard {path} does not exist")
    size = os.path.getsize(path)
    if size < header_bytes:
        raise ValueError(f"shard {path} is {size} bytes, shorter than its {header_bytes}-byte header")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"shard {path} has magic {header[0]} version {header[1]}, "
                         f"expected {SHARD_MAGIC} version {SHARD_VERSION}")
    n = int(header[2])
    if n < 0 or size != header_bytes + 2 * n:
        raise ValueError(f"shard {path} declares {n} tokens ({header_bytes + 2 * n} bytes) but is {size} bytes")
    return np.fromfile(path, dtype="<u2", count=n, offset=header_bytes)


def list_shards(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}")
    return files


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str):
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{where} holds token id {int(tokens.max())} >= VOCAB_SIZE {vocab_size}: wrong tokenizer?")


class TokenStream:
    """Reads shards in order, wrapping around at the end, and hands out contiguous token spans."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files, self.vocab_size = list_shards(pattern), vocab_size
        self.file_idx, self.pos = 0, 0
        self.tokens = self._load(0)

    def _load(self, idx: int) -> np.ndarray:
        tokens = load_shard(self.files[idx])
        check_token_range(tokens, self.vocab_size, self.files[idx])
        return tokens

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = self._load(self.file_idx), 0
                continue
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)


class DistributedTokenLoader:
    """Each call takes world*(local+1) tokens from the stream; rank r keeps the r-th contiguous slice.

    A background thread prepares the next batches so the training step never waits on disk.
    """

    def __init__(self, pattern, vocab_size, rank, world_size, device, batch_tokens, seq_len, prefetch=2):
        if batch_tokens % (world_size * seq_len):
            raise KnobError(f"batch of {batch_tokens} tokens does not split into {world_size} ranks x {seq_len}")
        self.stream = TokenStream(pattern, vocab_size)
        self.rank, self.world, self.device = rank, world_size, device
        self.local_tokens, self.seq_len = batch_tokens // world_size, seq_len
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.error, self.closed = None, False
        self.thread = threading.Thread(target=self._produce, daemon=True) if prefetch else None
        if self.thread:
            self.thread.start()

    def _make(self):
        span = self.local_tokens + 1
        chunk = self.stream.take(span * self.world)[self.rank * span:(self.rank + 1) * span]
        t = torch.from_numpy(chunk.astype(np.int64))
        x, y = t[:-1].reshape(-1, self.seq_len), t[1:].reshape(-1, self.seq_len)
        if self.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _produce(self):
        try:
            while not self.closed:
                item = self._make()
                while not self.closed:
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except Exception as exc:  # surfaced in next_batch
            self.error = exc
            self.queue.put(None)

    def close(self):
        self.closed = True
        if self.thread:
            self.thread.join()

    def next_batch(self):
        item = self.queue.get() if self.thread else self._make()
        if item is None:
            raise RuntimeError(f"token loader failed: {self.error}") from self.error
        x, y = item
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def load_validation_tokens(pattern: str, seq_len: int, vocab_size: int, max_tokens: int = 0) -> torch.Tensor:
    tokens = np.concatenate([load_shard(f) for f in list_shards(pattern)])
    check_token_range(tokens, vocab_size, pattern)
    if max_tokens > 0:
        tokens = tokens[:max_tokens + 1]
    usable = ((len(tokens) - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ValueError(f"validation split {pattern} is shorter than one sequence of {seq_len} tokens")
    return torch.from_numpy(tokens[:usable + 1].astype(np.int64))


def build_byte_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device=None):
    """Per-token byte tables (TECHNIQUES.md 13.1): bytes(y | x) = base[y] + (space[y] and not boundary[x])."""
    if sp.vocab_size() != vocab_size:
        raise ValueError(f"tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    if sp.piece_to_id("\u2581") == sp.unk_id() or sp.bos_id() != BOS_ID:
        raise ValueError("tokenizer needs '\u2581' as its own piece and BOS id 1 for exact byte counting")
    base = np.zeros(vocab_size, dtype=np.int16)
    space = np.zeros(vocab_size, dtype=np.bool_)
    boundary = np.ones(vocab_size, dtype=np.bool_)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i], piece = True, piece[1:]
        base[i] = len(piece.encode("utf-8"))
    as_t = lambda a: torch.tensor(a, device=device)
    return as_t(base), as_t(space), as_t(boundary)


def target_bytes(prev: torch.Tensor, tgt: torch.Tensor, luts) -> torch.Tensor:
    base, space, boundary = luts
    return base[tgt].to(torch.int64) + (space[tgt] & ~boundary[prev]).to(torch.int64)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def fake_quantize_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-row rounding onto the export grid (row max / qmax steps)."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / qmax
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


class CastedLinear(nn.Linear):
    """fp32 master weight, used in the activation dtype; with QAT, fake-quantized with a straight-through grad.

    The QAT switch is a buffer, not a Python flag, so a compiled graph reads it at run time.
    """

    def __init__(self, in_features, out_features, qat_bits=0, zero_init=False):
        super().__init__(in_features, out_features, bias=False)
        self.qat_bits, self.zero_init = qat_bits, zero_init
        self.register_buffer("qat_on", torch.zeros(()), persistent=False)

    def forward(self, x):
        w = self.weight
        if self.qat_bits:
            w = w + self.qat_on * (fake_quantize_rows(w, self.qat_bits) - w).detach()
        return F.linear(x, w.to(x.dtype))


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rope_tables(seq_len: int, dims: int, base: float, train_seq_len: int, ntk: bool, device):
    if ntk and seq_len > train_seq_len and dims > 2:  # NTK-aware: stretch the base so low frequencies cover the longer span
        base = base * (seq_len / train_seq_len) ** (dims / (dims - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rope(x: torch.Tensor, cos, sin, dims: int) -> torch.Tensor:
    half = dims // 2
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, h: Hyperparameters, xsa: bool):
        super().__init__()
        dim, self.heads, self.kv_heads = h.model_dim, h.num_heads, h.num_kv_heads
        self.head_dim = dim // h.num_heads
        kv_dim = self.kv_heads * self.head_dim
        bits = h.quant_attn_bits
        self.c_q, self.c_k = CastedLinear(dim, dim, bits), CastedLinear(dim, kv_dim, bits)
        self.c_v, self.proj = CastedLinear(dim, kv_dim, bits), CastedLinear(dim, dim, bits, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((self.heads,), h.qk_gain_init))
        self.rope_dims = h.rope_dims or self.head_dim
        self.rope_base, self.rope_ntk, self.train_seq_len = h.rope_base, h.rope_ntk, h.train_seq_len
        self.xsa = xsa

    def forward(self, x):
        B, T, _ = x.shape
        q = rms_norm(self.c_q(x).view(B, T, self.heads, self.head_dim))
        k = rms_norm(self.c_k(x).view(B, T, self.kv_heads, self.head_dim))
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim)
        cos, sin = rope_tables(T, self.rope_dims, self.rope_base, self.train_seq_len, self.rope_ntk, x.device)
        q = apply_rope(q, cos, sin, self.rope_dims) * self.q_gain.to(q.dtype)[:, None]
        k = apply_rope(k, cos, sin, self.rope_dims)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=self.heads != self.kv_heads)
        y = y.transpose(1, 2)
        if self.xsa:  # exclusive self attention: drop the part of the output along the token's own value
            group = self.heads // self.kv_heads
            y = y.reshape(B, T, self.kv_heads, group, self.head_dim)
            v_hat = F.normalize(v, dim=-1).unsqueeze(3)
            y = y - (y * v_hat).sum(-1, keepdim=True) * v_hat
        return self.proj(y.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        hidden = int(round(h.mlp_mult * h.model_dim))
        self.fc = CastedLinear(h.model_dim, hidden, h.quant_mlp_bits)
        self.proj = CastedLinear(hidden, h.model_dim, h.quant_mlp_bits, zero_init=True)
        self.slope = h.leaky_slope if h.mlp_act == "leaky_relu2" else 0.0

    def forward(self, x):
        z = self.fc(x)
        z = F.leaky_relu(z, self.slope) if self.slope else F.relu(z)
        return self.proj(z.square())


class Block(nn.Module):
    def __init__(self, h: Hyperparameters, idx: int):
        super().__init__()
        dim = h.model_dim
        self.attn = CausalSelfAttention(h, xsa=idx >= h.num_layers - h.xsa_last_n)
        self.mlp = MLP(h)
        self.attn_scale, self.mlp_scale = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.norm_scale = 1.0 / math.sqrt(idx + 1) if h.ln_scale else 1.0
        self.parallel = 0 <= h.parallel_resid_from <= idx

    def forward(self, x, x0):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        attn_out = self.attn(rms_norm(x) * self.norm_scale)
        mlp_in = x if self.parallel else x + self.attn_scale.to(x.dtype) * attn_out
        mlp_out = self.mlp(rms_norm(mlp_in) * self.norm_scale)
        return x + self.attn_scale.to(x.dtype) * attn_out + self.mlp_scale.to(x.dtype) * mlp_out


class SmearGate(nn.Module):
    """x_t <- x_t + g*(x_{t-1} - x_t), per-dim g = sigmoid(gate); never blends into a BOS position."""

    def __init__(self, dim):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x, ids):
        prev = torch.cat((x[:, :1], x[:, :-1]), dim=1)  # position 0 blends with itself: a no-op
        keep = (ids != BOS_ID).to(x.dtype).unsqueeze(-1)
        return x + keep * torch.sigmoid(self.gate.to(x.dtype)) * (prev - x)


def bigram_bucket_ids(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """Hash (previous, current) token pairs into buckets-1 slots; the last slot is for pairs with no valid
    previous token: the first position of a sequence and every BOS (so no pair spans two documents)."""
    cur = ids.to(torch.int64)
    prev = torch.cat((torch.zeros_like(cur[:, :1]), cur[:, :-1]), dim=1)
    h = torch.bitwise_xor(36313 * cur, 27191 * prev) % (buckets - 1)
    first = torch.zeros_like(cur, dtype=torch.bool)
    first[:, 0] = True
    return torch.where(first | (cur == BOS_ID), torch.full_like(h, buckets - 1), h)


class BigramHash(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.buckets = h.bigram_buckets
        self.table = nn.Embedding(h.bigram_buckets, h.bigram_dim)
        nn.init.zeros_(self.table.weight)  # the projection is non-zero, so the table still gets gradients
        self.proj = CastedLinear(h.bigram_dim, h.model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids):
        return self.scale * self.proj(self.table(bigram_bucket_ids(ids, self.buckets)))


def layer_schedule(h: Hyperparameters, looping: bool) -> list[int]:
    """Physical block index of each virtual layer; with looping, LOOP_START..LOOP_END run 1+NUM_LOOPS times."""
    order = list(range(h.num_layers))
    if looping and h.num_loops:
        loop = order[h.loop_start:h.loop_end + 1]
        order = order[:h.loop_start] + loop * (h.num_loops + 1) + order[h.loop_end + 1:]
    return order


class GPT(nn.Module):
    def __init__(self, h: Hyperparameters):
        super().__init__()
        self.h = h
        self.tok_emb = nn.Embedding(h.vocab_size, h.model_dim)
        self.bigram = BigramHash(h) if h.bigram_buckets else None
        self.smear = SmearGate(h.model_dim) if h.smear_gate else None
        self.blocks = nn.ModuleList(Block(h, i) for i in range(h.num_layers))
        longest = layer_schedule(h, looping=True)
        n_skips = len(longest) // 2  # decoder j takes encoder n_enc-1-j; an odd extra decoder layer gets none
        self.skip_weights = nn.Parameter(torch.ones(n_skips, h.model_dim)) if h.unet_skips else None
        self.looping = False
        self.order = layer_schedule(h, looping=False)
        self._init_weights()

    def _init_weights(self):
        h = self.h
        nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
        if h.overtone_init:  # flatten the spectrum to S_1 * k^-1/2
            u, s, vh = torch.linalg.svd(self.tok_emb.weight.data, full_matrices=False)
            spectrum = s[0] * torch.arange(1, len(s) + 1, dtype=s.dtype).rsqrt()
            self.tok_emb.weight.data = (u * spectrum) @ vh
        for name, m in self.named_modules():
            if not isinstance(m, CastedLinear):
                continue
            if m.zero_init:
                nn.init.zeros_(m.weight)
            elif h.ortho_init and min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight)
                if name.endswith(".proj"):  # non-zero output projections are scaled down with depth
                    m.weight.data.mul_(1.0 / math.sqrt(2 * h.num_layers))

    def set_looping(self, on: bool):
        self.looping = bool(on and self.h.num_loops)
        self.order = layer_schedule(self.h, self.looping)

    def set_qat(self, on: bool):
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.qat_on.fill_(1.0 if on else 0.0)

    def hidden(self, ids):
        x = self.tok_emb(ids)
        if self.bigram is not None:
            x = x + self.bigram(ids)
        x = rms_norm(x)
        if self.smear is not None:
            x = self.smear(x, ids)
        x0, skips, n_enc = x, [], len(self.order) // 2
        for i, layer in enumerate(self.order):
            if self.skip_weights is not None and i >= n_enc and skips:  # U-Net: mirror-layer skip
                x = x + self.skip_weights[i - n_enc].to(x.dtype) * skips.pop()
            x = self.blocks[layer](x, x0)
            if i < n_enc:
                skips.append(x)
        return rms_norm(x)

    def logits(self, ids):
        z = F.linear(self.hidden(ids), self.tok_emb.weight)
        c = self.h.logit_softcap
        return c * torch.tanh(z.float() / c)

    def forward(self, ids, targets, reduction: str = "mean"):
        z = self.logits(ids)
        nll = F.cross_entropy(z.reshape(-1, z.size(-1)), targets.reshape(-1), reduction="none")
        return nll.mean() if reduction == "mean" else nll.view_as(targets)


def parameter_report(model: GPT) -> str:
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = name.split(".")[0] if not name.startswith("blocks.") else "blocks." + name.split(".")[2]
        groups[key] = groups.get(key, 0) + p.numel()
    total = sum(groups.values())
    return f"params:{total} " + " ".join(f"{k}:{v}" for k, v in sorted(groups.items()))


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------


def newton_schulz_orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    x = x / (x.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalised updates for 2-D matrices.

    Rank r computes the updates of parameters r, r+world, ...; one all-reduce shares them.
    """

    def __init__(self, params, lr, momentum, ns_steps, weight_decay, rank=0, world_size=1):
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay))
        self.rank, self.world = rank, world_size
        self._orth = newton_schulz_orthogonalize
        if torch.cuda.is_available():
            self._orth = torch.compile(newton_schulz_orthogonalize)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device,
                               dtype=torch.bfloat16 if params[0].is_cuda else torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % self.world == self.rank and p.grad is not None:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                    update = self._orth(update, group["ns_steps"]) * max(1.0, p.size(0) / p.size(1)) ** 0.5
                    flat[offset:offset + p.numel()] = update.flatten()
                offset += p.numel()
            if self.world > 1:
                dist.all_reduce(flat)
            offset = 0
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


def build_optimizers(model: GPT, h: Hyperparameters, rank: int, world_size: int):
    """Muon: block matrices and the bigram projection. AdamW: embedding tables, and scalars/gains/mixes."""
    matrices, tables, scalars = [], [], []
    for name, p in model.named_parameters():
        if name in ("tok_emb.weight", "bigram.table.weight"):
            tables.append(p)
        elif p.ndim == 2 and (name.startswith("blocks.") or name == "bigram.proj.weight"):
            matrices.append(p)
        else:
            scalars.append(p)
    adam = torch.optim.AdamW(
        [dict(params=tables, lr=h.embed_lr, base_lr=h.embed_lr), dict(params=scalars, lr=h.scalar_lr, base_lr=h.scalar_lr)],
        betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.adam_wd, fused=torch.cuda.is_available())
    muon = Muon(matrices, h.matrix_lr, h.muon_momentum, h.muon_ns_steps, h.muon_wd, rank, world_size)
    for g in muon.param_groups:
        g["base_lr"] = h.matrix_lr
    return [adam, muon]


def lr_multiplier(frac: float, h: Hyperparameters) -> float:
    """1 until the last WARMDOWN_FRAC of the budget, then linear down to MIN_LR_FRAC at the end."""
    if h.warmdown_frac <= 0 or frac < 1.0 - h.warmdown_frac:
        return 1.0
    return max((1.0 - frac) / h.warmdown_frac, h.min_lr_frac)


# ----------------------------------------------------------------------------------------------
# Averaging (EMA / SWA)
# ----------------------------------------------------------------------------------------------


class WeightAverager:
    def __init__(self, model: nn.Module, h: Hyperparameters):
        self.mode, self.h = h.averaging, h
        self.params = [p for p in model.parameters()]
        self.avg = [p.detach().float().clone() for p in self.params] if self.mode == "ema" else None
        self.count = 0

    @torch.no_grad()
    def update(self, step: int, lr_mul: float):
        if self.mode == "ema":
            torch._foreach_lerp_(self.avg, [p.detach().float() for p in self.params], 1.0 - self.h.ema_decay)
        elif self.mode == "swa" and lr_mul < self.h.swa_start_lr and step % self.h.swa_every == 0:
            if self.avg is None:
                self.avg = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            torch._foreach_add_(self.avg, [p.detach().float() for p in self.params])
            self.count += 1

    @torch.no_grad()
    def apply(self) -> str:
        if self.mode == "none" or self.avg is None:
            return f"averaging:{self.mode} applied:no (final weights kept)"
        scale = 1.0 / self.count if self.mode == "swa" else 1.0
        for p, a in zip(self.params, self.avg):
            p.copy_((a * scale).to(p.dtype))
        detail = f"checkpoints:{self.count}" if self.mode == "swa" else f"decay:{self.h.ema_decay}"
        return f"averaging:{self.mode} {detail} applied:yes"


# ----------------------------------------------------------------------------------------------
# Quantization and export
# ----------------------------------------------------------------------------------------------

CLIP_RATIOS = (1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.75)


def tensor_bits(name: str, h: Hyperparameters) -> int:
    """Bits for a tensor, or 0 to store it as fp16 passthrough."""
    if name == "tok_emb.weight":
        return h.quant_embed_bits
    if name == "bigram.table.weight":
        return h.quant_bigram_bits
    if name.startswith("blocks.") and ".attn.c_" in name or name.endswith("attn.proj.weight"):
        return h.quant_attn_bits
    if ".mlp." in name:
        return h.quant_mlp_bits
    return 0


def quantize_rows(w: torch.Tensor, bits: int, col_weight: torch.Tensor | None = None, keep=None, step_mult=1.0):
    """Per-row symmetric quantization; each row's clip is the candidate ratio of its max with least
    (optionally column-weighted) squared error. step_mult > 1 then widens the chosen steps (fewer levels in use,
    fewer bytes). Returns int8 codes and fp16 scales."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float() if keep is None else w.float() * keep
    cw = torch.ones(w.size(1), device=w.device) if col_weight is None else col_weight.float()
    rowmax = w.abs().amax(dim=1).clamp_min(1e-8)
    best_err = torch.full_like(rowmax, float("inf"))
    best_scale = torch.zeros_like(rowmax)
    for r in CLIP_RATIOS:
        scale = (rowmax * r / qmax).half().float().clamp_min(2.0 ** -24)  # smallest positive fp16
        q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)
        err = ((w - q * scale[:, None]).square() * cw).sum(dim=1)
        better = err < best_err
        best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
    if step_mult != 1.0:
        best_scale = (best_scale * step_mult).half().float()
    q = torch.clamp(torch.round(w / best_scale[:, None]), -qmax, qmax)
    return q.to(torch.int8), best_scale.half()


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, block: int = 128, damp: float = 0.01,
                  keep: torch.Tensor | None = None, step_mult: float = 1.0):
    """GPTQ: quantize columns in order of decreasing Hessian diagonal, pushing each column's rounding error
    onto the columns not yet quantized through the inverse-Hessian Cholesky factor."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float().clone()
    keep = torch.ones_like(w) if keep is None else keep.float()
    H = hessian.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    w[:, dead] = 0.0
    _, scale = quantize_rows(w, bits, torch.diag(H), keep, step_mult)
    scale = scale.float()
    perm = torch.argsort(torch.diag(H), descending=True)
    inv_perm = torch.argsort(perm)
    w, keep, H = w[:, perm], keep[:, perm], H[perm][:, perm]
    mean_diag = torch.diag(H).mean()
    for attempt in range(6):
        try:
            Hd = H + (damp * 10 ** attempt) * mean_diag * torch.eye(H.size(0), device=H.device)
            U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
            break
        except torch.linalg.LinAlgError:
            continue
    else:
        raise RuntimeError("GPTQ: Hessian is not positive definite even with heavy damping")
    q = torch.zeros_like(w)
    cols = w.size(1)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w_blk, err_blk, U_blk = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = w_blk[:, j]
            qc = torch.clamp(torch.round(col / scale), -qmax, qmax) * keep[:, i1 + j]
            q[:, i1 + j] = qc
            err = (col - qc * scale) / U_blk[j, j]
            w_blk[:, j:] -= err[:, None] * U_blk[j, j:][None, :]
            err_blk[:, j] = err
        w[:, i2:] -= err_blk @ U[i1:i2, i2:]
    return q[:, inv_perm].to(torch.int8), scale.half()


def magnitude_keep_mask(w: torch.Tensor, frac: float) -> torch.Tensor | None:
    if frac <= 0:
        return None
    k = max(1, int(frac * w.numel()))
    threshold = w.abs().flatten().kthvalue(k).values
    return (w.abs() > threshold).float()


@torch.no_grad()
def collect_hessians(model: GPT, batches, names: set[str], world_size: int) -> dict[str, torch.Tensor]:
    """H = mean over calibration tokens of x x^T for the input x of each named linear layer."""
    hessians, counts, hooks = {}, {}, []
    modules = dict(model.named_modules())
    for name in names:
        mod_name = name[: -len(".weight")]

        def hook(mod, inputs, _out, key=name):
            with torch.autocast(inputs[0].device.type, enabled=False):  # fp32 Hessian, not bf16
                x = inputs[0].detach().reshape(-1, inputs[0].size(-1)).float()
                hessians[key] = hessians.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.size(0)

        hooks.append(modules[mod_name].register_forward_hook(hook))
    try:
        for x, _ in batches:
            with autocast_context(x.device):
                model.logits(x)
    finally:
        for hk in hooks:
            hk.remove()
    for key in hessians:
        n = torch.tensor(float(counts[key]), device=hessians[key].device)
        if world_size > 1:
            dist.all_reduce(hessians[key])
            dist.all_reduce(n)
        hessians[key] /= n
    return hessians


@torch.no_grad()
def quantize_state(model: GPT, h: Hyperparameters, hessians: dict | None = None, step_mult: float = 1.0) -> dict:
    """name -> {"bits", "q", "scale"} for quantized tensors or {"data"} for passthrough."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        bits = tensor_bits(name, h) if t.is_floating_point() and t.ndim == 2 else 0
        if bits == 0 or t.numel() <= h.passthrough_max_numel:
            out[name] = {"data": t.cpu().half() if t.is_floating_point() else t.cpu()}
            continue
        keep = magnitude_keep_mask(t.float(), h.prune_frac) if name.startswith("blocks.") else None
        if hessians is not None and name in hessians:
            q, scale = gptq_quantize(t, hessians[name], bits, h.gptq_block, h.gptq_damp, keep, step_mult)
        else:
            q, scale = quantize_rows(t, bits, keep=keep, step_mult=step_mult)
        out[name] = {"bits": bits, "q": q.cpu(), "scale": scale.cpu()}
    return out


def dequantize_state(qstate: dict) -> dict:
    return {name: (e["q"].float() * e["scale"].float()[:, None]) if "q" in e else e["data"].float()
            for name, e in qstate.items()}


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ints < 2**bits, `bits` bits each, most significant bit first."""
    as_bits = np.unpackbits(values.astype(np.uint8)[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(as_bits.reshape(-1)).tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    padded = np.concatenate((np.zeros((count, 8 - bits), dtype=np.uint8), flat), axis=1)
    return np.packbits(padded, axis=1).reshape(count)


ARTIFACT_MAGIC = b"PGOLF1"


def serialize_artifact(qstate: dict, config: dict, h: Hyperparameters) -> bytes:
    """One file: compressor tag, then compressed [magic, header length, JSON header, payload].
    Codes of all quantized tensors come first, then scales, then passthrough tensors (like data compresses
    better together)."""
    header = {"config": config, "tensors": []}
    codes, scales, raws = [], [], []
    for name, e in qstate.items():
        if "q" in e:
            q = e["q"].numpy()
            qmax = 2 ** (e["bits"] - 1) - 1
            code = pack_bits((q.astype(np.int16) + qmax).reshape(-1), e["bits"]) if h.bitpack else q.tobytes()
            header["tensors"].append({"name": name, "bits": e["bits"], "shape": list(q.shape),
                                      "packed": h.bitpack, "code_bytes": len(code)})
            codes.append(code)
            scales.append(e["scale"].numpy().astype("<f2").tobytes())
        else:
            arr = e["data"].numpy()
            header["tensors"].append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape)})
            raws.append(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    head = json.dumps(header, separators=(",", ":")).encode()
    blob = ARTIFACT_MAGIC + len(head).to_bytes(4, "little") + head + b"".join(codes + scales + raws)
    if h.compressor == "zstd":
        if zstandard is None:
            raise RuntimeError("COMPRESSOR=zstd needs the zstandard package (pip install zstandard)")
        return b"Z" + zstandard.ZstdCompressor(level=h.zstd_level).compress(blob)
    return b"L" + lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME)


def deserialize_artifact(data: bytes) -> tuple[dict, dict]:
    tag, body = data[:1], data[1:]
    if tag == b"Z":
        if zstandard is None:
            raise RuntimeError("this artifact is zstd-compressed: pip install zstandard")
        decoder, errors = zstandard.ZstdDecompressor().decompressobj(), zstandard.ZstdError
    elif tag == b"L":
        decoder, errors = lzma.LZMADecompressor(), lzma.LZMAError
    else:
        raise ValueError(f"unknown artifact compressor tag {tag!r}")
    try:
        blob = decoder.decompress(body)
    except errors as exc:
        raise ValueError(f"corrupt artifact: {exc}") from exc
    if not decoder.eof or decoder.unused_data:
        raise ValueError("corrupt artifact: truncated, or bytes after the compressed stream")
    if not blob.startswith(ARTIFACT_MAGIC):
        raise ValueError("not a Parameter Golf artifact (bad magic)")
    n = int.from_bytes(blob[len(ARTIFACT_MAGIC):len(ARTIFACT_MAGIC) + 4], "little")
    header, pos = json.loads(blob[len(ARTIFACT_MAGIC) + 4:len(ARTIFACT_MAGIC) + 4 + n]), len(ARTIFACT_MAGIC) + 4 + n

    def take(nbytes: int) -> bytes:
        nonlocal pos
        if pos + nbytes > len(blob):
            raise ValueError("artifact payload is shorter than its header says")
        pos += nbytes
        return blob[pos - nbytes:pos]

    qstate, quantized = {}, [t for t in header["tensors"] if "bits" in t]
    for t in quantized:  # same order as serialize_artifact: all codes, all scales, then passthrough tensors
        raw, qmax = take(t["code_bytes"]), 2 ** (t["bits"] - 1) - 1
        q = (unpack_bits(raw, t["bits"], math.prod(t["shape"])).astype(np.int16) - qmax).astype(np.int8) \
            if t["packed"] else np.frombuffer(raw, dtype=np.int8)
        qstate[t["name"]] = {"bits": t["bits"], "q": torch.from_numpy(q.reshape(t["shape"]).copy())}
    for t in quantized:
        scale = np.frombuffer(take(2 * t["shape"][0]), dtype="<f2").astype(np.float16)
        qstate[t["name"]]["scale"] = torch.from_numpy(scale)
    for t in (t for t in header["tensors"] if "bits" not in t):
        dtype = np.dtype(t["dtype"]).newbyteorder("<")
        arr = np.frombuffer(take(math.prod(t["shape"]) * dtype.itemsize), dtype=dtype).reshape(t["shape"])
        qstate[t["name"]] = {"data": torch.from_numpy(arr.astype(dtype.newbyteorder("=")))}
    if pos != len(blob):
        raise ValueError(f"artifact payload has {len(blob) - pos} unexplained trailing bytes")
    return header["config"], qstate


STEP_MULTS = (1.0, 1.1, 1.2, 1.3, 1.45, 1.6, 1.8, 2.0)


def quantize_within_budget(model: GPT, h: Hyperparameters, hessians, config: dict, log=print) -> bytes:
    """Quantize and serialize. If AUTO_FIT and the artifact is over budget, widen every quantization step by the
    next STEP_MULTS factor (fewer levels in use: lower entropy, fewer bytes) until it fits. After the first pass,
    a trial's size is first estimated with zstd level 3 scaled by the first pass's level-22/level-3 ratio."""
    limit, ratio = h.max_artifact_bytes - code_bytes(), None
    fast = Hyperparameters(**{**asdict(h), "zstd_level": 3})
    for mult in STEP_MULTS if h.auto_fit else (1.0,):
        qstate = quantize_state(model, h, hessians, mult)
        if ratio is not None and len(serialize_artifact(qstate, config, fast)) * ratio > 1.02 * limit:
            log(f"auto_fit: steps x{mult}: estimated over the {limit}-byte limit")
            continue
        blob = serialize_artifact(qstate, config, h)
        if len(blob) <= limit or not h.auto_fit:
            if mult > 1.0:
                log(f"auto_fit: quantization steps x{mult} -> {len(blob)} bytes (limit {limit})")
            return blob
        if ratio is None and h.compressor == "zstd":  # only needed once a trial has to be estimated
            ratio = len(blob) / len(serialize_artifact(qstate, config, fast))
        log(f"auto_fit: steps x{mult}: {len(blob)} bytes, over the {limit}-byte limit")
    raise ArtifactTooLarge(f"artifact stays over {limit} bytes for the model even with steps x{STEP_MULTS[-1]}")


def model_config(h: Hyperparameters, looping: bool) -> dict:
    return {**{k: getattr(h, k) for k in MODEL_KNOBS}, "looping": looping}


def code_bytes() -> int:
    with open(os.path.abspath(__file__), "rb") as f:
        return len(f.read())


class ArtifactTooLarge(RuntimeError):
    pass


def check_budget(model_bytes: int, h: Hyperparameters) -> int:
    total = model_bytes + code_bytes()
    if total > h.max_artifact_bytes:
        raise ArtifactTooLarge(f"bytes_total {total} (model {model_bytes} + code {code_bytes()}) exceeds "
                               f"MAX_ARTIFACT_BYTES {h.max_artifact_bytes}")
    return total


# ----------------------------------------------------------------------------------------------
# Evaluation: plain, sliding window, score-first test-time training
# ----------------------------------------------------------------------------------------------


def autocast_context(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Scores:
    """fp64 sums of NLL (nats), scored tokens and their UTF-8 bytes; all-reduced exactly across ranks."""

    def __init__(self, device):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def add(self, nll: torch.Tensor, prev: torch.Tensor, tgt: torch.Tensor, luts, mask=None):
        mask = torch.ones_like(nll, dtype=torch.bool) if mask is None else mask
        self.sums[0] += torch.where(mask, nll.double(), 0.0).sum()
        self.sums[1] += mask.sum()
        self.sums[2] += torch.where(mask, target_bytes(prev, tgt, luts), 0).sum()

    def reduce(self, world_size: int) -> "Scores":
        if world_size > 1:
            dist.all_reduce(self.sums)
        return self

    @property
    def val_loss(self) -> float:
        return (self.sums[0] / self.sums[1]).item()

    @property
    def val_bpb(self) -> float:
        return (self.sums[0] / (math.log(2.0) * self.sums[2])).item()


def rank_slice(n: int, rank: int, world_size: int) -> range:
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def eval_plain(model, tokens, seq_len, batch_seqs, luts, rank=0, world_size=1) -> Scores:
    """Non-overlapping windows of seq_len: the sliding evaluation with stride = seq_len."""
    return eval_sliding(model, tokens, seq_len, seq_len, batch_seqs, luts, rank, world_size)


def sliding_windows(n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, score_from, score_to) in target indices: window k reads inputs [start, start+seq_len) and
    scores targets [score_from, score_to). Consecutive ranges tile [0, n_targets) exactly once; every
    target but those of the first window sees at least seq_len-stride+1 tokens of context."""
    windows, start = [], 0
    while True:
        score_from = 0 if start == 0 else start + seq_len - stride
        if score_from >= n_targets:
            break
        windows.append((start, score_from, min(start + seq_len, n_targets)))
        start += stride
    return windows


@torch.no_grad()
def score_windows(model, tokens, windows, seq_len, batch_seqs, luts, scores: Scores):
    """Score each window's target range in batches of exactly batch_seqs rows, so a compiled model sees one
    shape: missing rows score nothing, and a window running past the end is right-padded (harmless: causal)."""
    device = luts[0].device
    tokens = tokens.to(device)
    offsets = torch.arange(seq_len + 1, device=device)
    for b in range(0, len(windows), batch_seqs):
        w = torch.tensor(windows[b:b + batch_seqs], dtype=torch.int64, device=device).view(-1, 3)
        w = torch.cat((w, w.new_zeros(batch_seqs - w.size(0), 3)))  # (0, 0, 0): an empty score range
        pos = w[:, :1] + offsets
        seq = tokens[pos.clamp_max(tokens.numel() - 1)]
        x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        with autocast_context(device):
            nll = model(x, y, reduction="none")
        mask = (pos[:, :-1] >= w[:, 1:2]) & (pos[:, :-1] < w[:, 2:3])
        scores.add(nll, x, y, luts, mask)


def eval_sliding(model, tokens, seq_len, stride, batch_seqs, luts, rank=0, world_size=1) -> Scores:
    windows = sliding_windows(tokens.numel() - 1, seq_len, stride)
    scores = Scores(luts[0].device)
    mine = rank_slice(len(windows), rank, world_size)
    score_windows(model, tokens, windows[mine.start:mine.stop], seq_len, batch_seqs, luts, scores)
    return scores.reduce(world_size)


def eval_ttt(model: GPT, tokens, h: Hyperparameters, luts, rank=0, world_size=1, events=None):
    """Legal score-first TTT. For each chunk of TTT_CHUNK_TOKENS targets: score every sliding window whose
    scored range starts in the chunk (final scores, under no_grad), then train on the chunk's targets, all of
    which are already scored. The last chunk is not trained on. Returns (total Scores, per-chunk sums)."""
    device = luts[0].device
    seq_len, chunk = h.eval_seq_len, h.ttt_chunk_tokens
    n_targets = tokens.numel() - 1
    windows = sliding_windows(n_targets, seq_len, h.eval_stride)
    n_chunks = (n_targets + chunk - 1) // chunk
    by_chunk = [[] for _ in range(n_chunks)]
    for w in windows:
        by_chunk[w[1] // chunk].append(w)
    frozen = {id(p) for i, blk in enumerate(model.blocks) if i < h.ttt_freeze_blocks for p in blk.parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen]
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    if h.ttt_optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=h.ttt_lr, momentum=h.ttt_momentum)
    else:
        opt = torch.optim.AdamW(params, lr=h.ttt_lr, betas=(h.beta1, h.beta2), weight_decay=0.0)
    total, per_chunk = Scores(device), []
    scored_to = 0
    for c in range(n_chunks):
        chunk_scores = Scores(device)
        mine = rank_slice(len(by_chunk[c]), rank, world_size)
        score_windows(model, tokens, by_chunk[c][mine.start:mine.stop], seq_len, h.val_batch_seqs, luts,
                      chunk_scores)
        chunk_scores.reduce(world_size)
        total.sums += chunk_scores.sums
        per_chunk.append(chunk_scores.sums.clone())
        scored_to = max([scored_to] + [w[2] for w in by_chunk[c]])
        if events is not None:
            events.append(("score", c, scored_to))
        if c == n_chunks - 1 or h.ttt_epochs <= 0:
            continue
        lo, hi = c * chunk, min((c + 1) * chunk, n_targets)  # targets lo..hi-1 are tokens[lo+1..hi]
        assert hi <= scored_to, "TTT would train on a token before scoring it"
        if events is not None:
            events.append(("train", c, hi))
        decay = min(lo / h.ttt_lr_horizon, 1.0) if h.ttt_lr_horizon > 0 else 0.0
        for g in opt.param_groups:  # fixed horizon: a chunk's score never depends on how much text follows it
            g["lr"] = h.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * decay))
        starts = list(range(lo, hi, seq_len))
        per_step = h.ttt_batch_seqs * world_size
        for _ in range(h.ttt_epochs):
            for b in range(0, len(starts), per_step):  # every rank takes part in every step
                group = starts[b:b + per_step]
                n_tokens = sum(min(seq_len, hi - s) for s in group)
                mine = [group[i] for i in rank_slice(len(group), rank, world_size)]
                for length in sorted({min(seq_len, hi - s) for s in mine}):  # full sequences, then the tail
                    seqs = torch.stack([tokens[s:s + length + 1] for s in mine if min(seq_len, hi - s) == length])
                    seqs = seqs.to(device)
                    with autocast_context(device):
                        nll = model(seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous(), reduction="none")
                    (nll.float().sum() / n_tokens).backward()
                if world_size > 1:  # one flat all-reduce; each rank's loss is already over the global count
                    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
                    dist.all_reduce(flat)
                    for p, g in zip(params, flat.split([p.numel() for p in params])):
                        p.grad = g.view_as(p)
                if h.ttt_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, h.ttt_grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return total, per_chunk


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------


def make_logger(path: str | None):
    """Rank 0 prints and appends to its log file; the other ranks stay silent."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def log(msg: str):
        if path:
            print(msg, flush=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(msg + "\n")
    return log


def setup_distributed(h: Hyperparameters):
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world:
        raise KnobError(f"world size {world} must divide 8 (gradient accumulation keeps 8-GPU semantics)")
    if h.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE=cuda but no CUDA device is available")
    use_cuda = h.device == "cuda" or (h.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dynamo = torch._dynamo.config  # eval and TTT add a few graphs to the training one; never fall back to eager
        setattr(dynamo, "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit", 64)
    if world > 1:
        # generous timeout: ranks wait at a barrier while rank 0 runs GPTQ and zstd-22 (several passes if auto-fit)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return rank, world, device


def elapsed_all_ranks(seconds: float, device, world_size: int) -> float:
    """The slowest rank's training time, so every rank takes the same schedule decisions on the same step."""
    if world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def check_ranks_in_sync(model: nn.Module, world_size: int, device) -> list[int]:
    digest = hashlib.sha256()
    for p in model.state_dict().values():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    mine = torch.tensor([int.from_bytes(digest.digest()[:7], "little")], dtype=torch.int64, device=device)
    hashes = [torch.zeros_like(mine) for _ in range(world_size)] if world_size > 1 else [mine]
    if world_size > 1:
        dist.all_gather(hashes, mine)
    values = [int(x.item()) for x in hashes]
    if len(set(values)) != 1:
        raise RuntimeError(f"ranks disagree on the weights: {values}")
    return values


def train_model(h: Hyperparameters, model: GPT, device, rank: int, world: int, log, val_tokens, luts):
    grad_accum = 8 // world
    compiled = torch.compile(model, dynamic=False) if device.type == "cuda" and h.compile else model
    ddp = DDP(compiled, device_ids=[device.index] if device.type == "cuda" else None,
              broadcast_buffers=False) if world > 1 else compiled
    optimizers = build_optimizers(model, h, rank, world)
    train_pattern = os.path.join(h.data_path, "fineweb_train_*.bin")

    def make_loader():
        return DistributedTokenLoader(train_pattern, h.vocab_size, rank, world, device,
                                      h.train_batch_tokens // grad_accum, h.train_seq_len)

    def train_step(loader):
        total = torch.zeros((), device=device)
        for micro in range(grad_accum):
            x, y = loader.next_batch()
            sync = ddp.no_sync() if world > 1 and micro < grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast_context(device):
                    loss = ddp(x, y)
                (loss / grad_accum).backward()
            total += loss.detach()
        if h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if world > 1:  # log the loss of the whole global batch, not only this rank's share
            dist.all_reduce(total)
        return total / (grad_accum * world)

    if h.warmup_steps > 0:  # compile priming on real batches; every trace of it is undone below
        saved = copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in optimizers]
        loader = make_loader()
        for i in range(h.warmup_steps):
            model.set_looping(i >= h.warmup_steps // 2)  # prime the looped graph too, if there is one
            train_step(loader)
        loader.close()
        model.set_looping(False)
        model.load_state_dict(saved[0])
        for opt, state in zip(optimizers, saved[1]):
            opt.load_state_dict(state)
        log(f"warmup: {h.warmup_steps} priming steps run and undone")

    averager = WeightAverager(model, h)
    reserve = h.gptq_reserve_seconds if h.gptq else 0.0
    budget = max(h.max_wallclock_seconds - reserve, 1e-9) if h.max_wallclock_seconds > 0 else 0.0
    loader = make_loader()
    step, train_time, train_time_now, qat_on, stop = 0, 0.0, 0.0, False, False
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_resume = time.perf_counter()
    while True:
        last = stop or step >= h.iterations
        if (h.val_loss_every > 0 and step > 0 and step % h.val_loss_every == 0) or last:
            train_time += time.perf_counter() - t_resume  # validation does not count as training time
            scores = eval_plain(model, val_tokens, h.train_seq_len, h.val_batch_seqs, luts, rank, world)
            log(f"step:{step} val_loss:{scores.val_loss:.6f} val_bpb:{scores.val_bpb:.6f} "
                f"train_time:{train_time:.1f}s step_avg:{1000 * train_time / max(step, 1):.2f}ms")
            t_resume = time.perf_counter()
        if last:
            break
        frac = train_time_now / budget if budget else step / h.iterations  # same value on every rank
        lr_mul = lr_multiplier(frac, h)
        if h.qat and not qat_on and frac >= h.qat_start_frac:
            model.set_qat(True)
            qat_on = True
            log(f"qat:on step:{step} frac:{frac:.3f} bits attn:{h.quant_attn_bits} mlp:{h.quant_mlp_bits} "
                f"lr_factor:{h.qat_lr_factor}")
        if h.num_loops and not model.looping and frac >= h.loop_enable_frac:
            model.set_looping(True)
            log(f"looping:on step:{step} frac:{frac:.3f} layers:{model.order}")
        scale = lr_mul * (h.qat_lr_factor if qat_on else 1.0)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
        warm = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps else 1.0
        optimizers[1].param_groups[0]["momentum"] = (1 - warm) * h.muon_momentum_warmup_start + warm * h.muon_momentum
        loss = train_step(loader)
        step += 1
        averager.update(step, lr_mul)
        train_time_now = elapsed_all_ranks(train_time + time.perf_counter() - t_resume, device, world)
        stop = budget > 0 and train_time_now >= budget
        if h.train_log_every > 0 and (step % h.train_log_every == 0 or step <= 5 or stop):
            log(f"step:{step}/{h.iterations} train_loss:{loss.item():.4f} lr_mul:{lr_mul:.4f} "
                f"train_time:{train_time_now:.1f}s step_avg:{1000 * train_time_now / step:.2f}ms")
    loader.close()
    tokens_seen = step * h.train_batch_tokens
    log(f"training stopped step:{step} train_time:{train_time:.1f}s tokens:{tokens_seen} "
        f"tokens_per_s:{tokens_seen / max(train_time, 1e-9):.0f}")
    if device.type == "cuda":
        log(f"peak_memory_allocated_mib:{torch.cuda.max_memory_allocated() // 2**20}")
    log(averager.apply())
    return train_time, step


def export_artifact(h: Hyperparameters, model: GPT, device, rank: int, world: int, log, train_time: float) -> bytes:
    """GPTQ calibration on training tokens, quantization, compression, and the write to ARTIFACT_PATH."""
    hessians = None
    if h.gptq:
        t0 = time.perf_counter()
        names = {n for n, p in model.named_parameters()
                 if n.startswith("blocks.") and p.ndim == 2 and tensor_bits(n, h) and p.numel() > h.passthrough_max_numel}
        per_rank = math.ceil(h.gptq_calib_seqs / world)
        calib = DistributedTokenLoader(os.path.join(h.data_path, "fineweb_train_*.bin"), h.vocab_size, rank, world,
                                       device, per_rank * world * h.train_seq_len, h.train_seq_len, prefetch=0)
        x, y = calib.next_batch()
        batches = [(x[i:i + h.val_batch_seqs], None) for i in range(0, x.size(0), h.val_batch_seqs)]
        hessians = collect_hessians(model, batches, names, world)
        calib_s = time.perf_counter() - t0  # reads training data, so it must end inside the training budget
        log(f"gptq: calibration on {per_rank * world} training sequences, {len(hessians)} Hessians, {calib_s:.1f}s; "
            f"train+calibration {train_time + calib_s:.1f}s of {h.max_wallclock_seconds:.0f}s")
    t0 = time.perf_counter()
    if rank == 0:  # one writer; the other ranks read the same bytes back after the barrier
        tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False  # fp32 GPTQ
        blob = quantize_within_budget(model, h, hessians, model_config(h, model.looping), log)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with open(h.artifact_path, "wb") as f:
            f.write(blob)
    if world > 1:
        dist.barrier()
    with open(h.artifact_path, "rb") as f:
        blob = f.read()
    log(f"export: {h.compressor} bitpack:{int(h.bitpack)} prune:{h.prune_frac} -> {h.artifact_path} "
        f"{len(blob)} bytes in {time.perf_counter() - t0:.1f}s")
    return blob


def load_artifact_into(model: GPT, data: bytes):
    config, qstate = deserialize_artifact(data)
    model.load_state_dict(dequantize_state(qstate), strict=True)
    model.set_looping(config["looping"])
    model.set_qat(False)


def model_from_artifact(data: bytes, h: Hyperparameters, device) -> GPT:
    config, _ = deserialize_artifact(data)
    model = GPT(Hyperparameters(**{**asdict(h), **{k: v for k, v in config.items() if k != "looping"}})).to(device)
    load_artifact_into(model, data)
    return model


def final_evaluations(h: Hyperparameters, model: GPT, val_tokens, luts, rank, world, log) -> dict:
    """Round-trip, sliding-window and score-first TTT scores of the artifact's weights, each timed."""
    device = luts[0].device
    evaluator = torch.compile(model, dynamic=False) if device.type == "cuda" and h.compile else model
    results, eval_start = {}, time.perf_counter()

    def report(name, fn):
        t0 = time.perf_counter()
        scores = fn()
        seconds = time.perf_counter() - t0
        results[name] = (scores.val_loss, scores.val_bpb)
        log(f"final_{name} val_loss:{scores.val_loss:.8f} val_bpb:{scores.val_bpb:.8f} "
            f"tokens:{int(scores.sums[1].item())} bytes:{int(scores.sums[2].item())} eval_time:{seconds:.1f}s")

    report("roundtrip", lambda: eval_plain(evaluator, val_tokens, h.train_seq_len, h.val_batch_seqs, luts, rank, world))
    if h.sliding_eval:
        report("sliding", lambda: eval_sliding(evaluator, val_tokens, h.eval_seq_len, h.eval_stride,
                                               h.val_batch_seqs, luts, rank, world))
    if h.ttt:
        report("ttt", lambda: eval_ttt(evaluator, val_tokens, h, luts, rank, world)[0])
    total = time.perf_counter() - eval_start
    log(f"eval_total_time:{total:.1f}s world:{world} est_8gpu:{total * world / 8:.1f}s (limit 600s)")
    return results


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main():
    h = Hyperparameters.from_env()
    rank, world, device = setup_distributed(h)
    run_id = h.run_id or time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    log = make_logger(os.path.join(h.log_dir, f"{run_id}.txt") if rank == 0 else None)
    log(f"run_id:{run_id} torch:{torch.__version__} device:{device} world:{world} grad_accum:{8 // world} "
        f"gpu:{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'none'}")
    log("hyperparameters " + json.dumps(asdict(h), sort_keys=True))
    torch.manual_seed(h.seed)
    np.random.seed(h.seed)
    if not os.path.isfile(h.tokenizer_path):
        raise FileNotFoundError(f"tokenizer {h.tokenizer_path} does not exist (TOKENIZER_PATH)")
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    luts = build_byte_luts(sp, h.vocab_size, device)
    val_tokens = load_validation_tokens(os.path.join(h.data_path, "fineweb_val_*.bin"), h.train_seq_len,
                                        h.vocab_size, h.val_max_tokens).to(device)
    log(f"val_tokens:{val_tokens.numel() - 1}")
    pre_quant = None
    if h.eval_only:
        with open(h.artifact_path, "rb") as f:
            blob = f.read()
        model = model_from_artifact(blob, h, device)
        log(f"eval_only: loaded {h.artifact_path} ({len(blob)} bytes)")
    else:
        model = GPT(h).to(device)
        log(parameter_report(model))
        train_time, _ = train_model(h, model, device, rank, world, log, val_tokens, luts)
        log(f"weights_in_sync hashes:{check_ranks_in_sync(model, world, device)}")
        model.set_qat(False)
        scores = eval_plain(model, val_tokens, h.train_seq_len, h.val_batch_seqs, luts, rank, world)
        pre_quant = scores.val_bpb
        log(f"pre_quant val_loss:{scores.val_loss:.8f} val_bpb:{scores.val_bpb:.8f}")
        blob = export_artifact(h, model, device, rank, world, log, train_time)  # the bytes on disk
        load_artifact_into(model, blob)  # every score below comes from the artifact's bytes
    bytes_code = code_bytes()
    log(f"bytes_model:{len(blob)} bytes_code:{bytes_code} bytes_total:{len(blob) + bytes_code} "
        f"limit:{h.max_artifact_bytes}")
    check_budget(len(blob), h)
    results = final_evaluations(h, model, val_tokens, luts, rank, world, log)
    if pre_quant is not None:
        log(f"quant_gap val_bpb:{results['roundtrip'][1] - pre_quant:+.6f} (pre {pre_quant:.6f} -> "
            f"roundtrip {results['roundtrip'][1]:.6f})")
    log("final_summary " + " ".join(f"{k}_val_bpb:{v[1]:.8f}" for k, v in
                                    ([("pre_quant", (None, pre_quant))] if pre_quant is not None else []) + list(results.items())))
    best = "ttt" if "ttt" in results else "sliding" if "sliding" in results else "roundtrip"
    log(f"final val_loss:{results[best][0]:.8f} val_bpb:{results[best][1]:.8f} source:{best}")
    log(f"bytes_model:{len(blob)}")
    log(f"bytes_code:{bytes_code}")
    log(f"bytes_total:{len(blob) + bytes_code}")
    if world > 1:  # free the DDP wrapper (a reference cycle) while its process group is alive, then leave together
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
