"""Tokenize text documents into challenge-format train/val shards.

Usage (run from the repo root):

    # reuse an existing SentencePiece model, hold out the first 1000 docs as val
    python data/build_shards.py corpus/*.jsonl.zst --out /tmp/shards \\
        --tokenizer tok.model --val-docs 1000

    # train a fresh 1024-piece BPE tokenizer, separate validation files
    python data/build_shards.py train.jsonl --val-input val.jsonl --out /tmp/shards

    # the larger vocabularies of the later records (sp4096 / sp8192)
    python data/build_shards.py train.jsonl.zst --val-input val.jsonl.zst --out /tmp/sp8192 \\
        --vocab-size 8192 --tokenizer-chars 20000000

    # CaseOps (the records since 2026-04-18): case-factored text + the val byte sidecar
    python data/build_shards.py train.jsonl.zst --val-input val.jsonl.zst --out /tmp/sp8192_caseops \\
        --vocab-size 8192 --caseops

Inputs, in the order given:
  *.jsonl        one JSON object per line with a string "text" field
  *.jsonl.zst    the same, zstd-compressed (stream-decompressed)
  *.txt          UTF-8 text; by default (--txt-mode paragraph) every block of
                 lines separated by one or more blank lines is a document;
                 --txt-mode file makes each whole .txt file one document.

Every document becomes [BOS=1] + sp.encode(text) (no EOS); documents are
concatenated and cut into shards of --shard-tokens tokens named
fineweb_train_000000.bin, ... and fineweb_val_000000.bin, ... in --out, next to
tokenizer.model and meta.json (the counts printed in the summary).
Documents whose text is empty or whitespace-only are skipped and counted;
any other problem with the input is an error that names the file and line.

A trained tokenizer uses the challenge settings (BPE, byte fallback, split
digits, nmt_nfkc, no dummy prefix, pad/bos/eos/unk = 0/1/2/3,
character_coverage 0.999) and is trained on at most --tokenizer-docs training
documents / --tokenizer-chars characters (never on validation documents).
Any --vocab-size from 261 to 65536 works (1024, 4096 and 8192 are the sizes
the challenge records used) and the result has exactly that many pieces: 4
special ids, the 256 byte-fallback pieces <0x00>..<0xFF>, and learned
characters and merges. If the training text is too small to learn that many
merges the build stops with an error naming the largest size it allows (give
more text / a larger --tokenizer-chars); the vocabulary is never silently
smaller. On 2 CPU cores an 8192-piece tokenizer trains in about 1 s on the 6.5M
characters of data/sample and in 3-6 s on 20-25M characters of English
Wikipedia (the challenge's sp4096/sp8192 were trained on 5M FineWeb documents).

meta.json records, per split, the token count, the raw UTF-8 bytes of the
input text ("text_bytes") and "bpb_bytes": the UTF-8 bytes of the text after
the tokenizer's normalisation (nmt_nfkc, whitespace runs collapsed, leading
and trailing whitespace dropped), i.e. what val_bpb divides by; it equals
len(sp.decode(ids).encode("utf-8")) summed over the documents, with every
byte-fallback piece counted as 1 byte. (That is exact for byte-fallback
tokenizers, so for every one trained here. A --tokenizer without byte fallback
emits <unk> for unknown characters: by the challenge's rule an <unk> counts 0
bytes and the space of the piece after it is not counted, while decode() shows
" ⁇ "; data/check_bytes.py reports such documents.)

CaseOps (--caseops, data/caseops.py): every document is transformed (lowercase text + the
operators TITLE/ALLCAPS/CAPNEXT/ESC, U+E001..U+E004) before tokenizing. A trained tokenizer then uses
identity normalization (no NFKC, no whitespace collapsing: the pieces spell the text exactly) and
holds the 4 operators as user-defined pieces at ids 4..7 (byte pieces move to 8..263); --tokenizer
must be such a model. Beside every fineweb_val_XXXXXX.bin goes fineweb_val_bytes_XXXXXX.bin, the
records' byte sidecar: the same header and length, one uint16 per token, the original UTF-8 bytes
that token stands for (BOS and operators 0, a byte-fallback piece 1, an escaped literal operator
3). Every document's entries sum to its UTF-8 length exactly, its tokens are checked to decode back
to it, and meta.json's "bpb_bytes" is then the original byte count. --byte-sidecar writes the
sidecar for a plain build too; with a normalizing tokenizer (nmt_nfkc) it equals the byte-table
rule (TECHNIQUES 13.1) at every position. Train shards get no sidecar.

Importable: iter_documents, train_tokenizer, load_tokenizer, check_tokenizer, check_caseops_tokenizer,
byte_tables, count_bpb_bytes, SidecarTables, document_byte_counts, ShardWriter, build.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import sys
import time
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

try:
    from . import caseops
    from .shard_io import SIDECAR_TAG, write_shard
except ImportError:  # run as a script, or with data/ on sys.path
    import caseops
    from shard_io import SIDECAR_TAG, write_shard

BOS_ID = 1
SPACE_PIECE = "\u2581"  # '▁'
TRAINER_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    character_coverage=0.999,
)


# --------------------------------------------------------------------- input
def _iter_jsonl(path: Path, stream) -> Iterator[str]:
    for lineno, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), 1):
        if not line.strip():
            raise ValueError(f"{path}:{lineno}: blank line in JSONL input")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f'{path}:{lineno}: expected a JSON object with a string "text" field')
        try:
            obj["text"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone \udXXX escape: no UTF-8 bytes, SentencePiece cannot take it
            raise ValueError(f"{path}:{lineno}: text is not valid Unicode ({e.reason} at character {e.start})") from None
        yield obj["text"]


def _iter_txt(path: Path, mode: str) -> Iterator[str]:
    text = path.read_text(encoding="utf-8")
    if mode == "file":
        yield text
        return
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def iter_documents(paths: Iterable, txt_mode: str = "paragraph") -> Iterator[str]:
    """Yield the text of every document in `paths`, in order (empty texts included).

    Raises FileNotFoundError for a missing file, ValueError for an unknown
    extension, bad JSON, a JSONL line without a string "text", or bad UTF-8.
    """
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"input file not found: {path}")
        name = path.name.lower()
        try:
            if name.endswith((".jsonl.zst", ".jsonl.zstd")):
                import zstandard

                with open(path, "rb") as fh:
                    reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
                    yield from _iter_jsonl(path, reader)
            elif name.endswith(".jsonl"):
                with open(path, "rb") as fh:
                    yield from _iter_jsonl(path, fh)
            elif name.endswith(".txt"):
                yield from _iter_txt(path, txt_mode)
            else:
                raise ValueError(f"{path}: unknown input type; expected .jsonl, .jsonl.zst or .txt")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 ({e})") from None


# ----------------------------------------------------------------- tokenizer
def check_tokenizer(sp: spm.SentencePieceProcessor, where: str = "tokenizer") -> None:
    """Raise ValueError unless bos_id == 1, '▁' is its own piece and ids fit uint16."""
    if sp.bos_id() != BOS_ID:
        raise ValueError(f"{where}: bos_id is {sp.bos_id()}, the shards need BOS id {BOS_ID}")
    sid = sp.piece_to_id(SPACE_PIECE)
    if sid == sp.unk_id() or sp.id_to_piece(sid) != SPACE_PIECE:
        raise ValueError(f"{where}: no standalone '{SPACE_PIECE}' (U+2581) piece; BPB byte counting needs it")
    if sp.vocab_size() > 65536:
        raise ValueError(f"{where}: vocab size {sp.vocab_size()} does not fit uint16 shards")


def load_tokenizer(path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    check_tokenizer(sp, str(path))
    return sp


def check_caseops_tokenizer(sp: spm.SentencePieceProcessor, where: str = "tokenizer") -> None:
    """Raise ValueError unless every CaseOps operator is its own piece and normalization is identity."""
    for op in caseops.OPERATORS:
        ids = sp.encode(op)
        if len(ids) != 1 or sp.id_to_piece(ids[0]) != op:
            raise ValueError(f"{where}: CaseOps operator U+{ord(op):04X} is not a user-defined piece")
    if not normalizer_is_identity(sp):
        raise ValueError(f"{where}: CaseOps needs identity normalization; this tokenizer normalizes text "
                         "(e.g. the records' nmt_nfkc CaseOps model): train one with --caseops")


def _training_lines(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[str]:
    chars = 0
    for text in itertools.islice(texts, max_docs):
        for line in text.splitlines():
            # SentencePiece drops over-long sentences; cut them instead
            for i in range(0, len(line), 8192):
                piece = line[i:i + 8192]
                if piece.strip():
                    chars += len(piece)
                    yield piece
        if chars >= max_chars:
            return


NORMALIZATIONS = ("nmt_nfkc", "identity")
MIN_VOCAB = 261     # above the 4 special ids + 256 byte pieces (the text's characters need room too)
MAX_VOCAB = 65536   # token ids are stored as uint16


def train_tokenizer(texts: Iterable[str], model_path, vocab_size: int = 1024,
                    max_docs: int = 200_000, max_chars: int = 20_000_000,
                    threads: int | None = None, verbose: bool = False, *, normalization: str = "nmt_nfkc",
                    user_symbols: Iterable[str] = ()) -> spm.SentencePieceProcessor:
    """Train a challenge-style BPE model of exactly `vocab_size` pieces on (a prefix of) `texts`,
    write it to `model_path`.

    `normalization` "identity" (what CaseOps uses) keeps the text exactly as given: no NFKC, no
    whitespace collapsing or trimming, so the pieces of a document spell it out exactly.
    `user_symbols` become user-defined pieces (ids right after the 4 special ids, each always its own
    token), e.g. the CaseOps operators. Empty texts should be filtered out by the caller. Raises ValueError if
    `vocab_size` is outside [MIN_VOCAB, MAX_VOCAB] or the text is too small to
    learn that many pieces (the message names the largest size it allows).
    Returns the loaded, checked processor.
    """
    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"tokenizer output must end in .model: {model_path}")
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab size {vocab_size} is outside [{MIN_VOCAB}, {MAX_VOCAB}] "
                         f"(byte fallback takes 260 ids; ids must fit uint16 shards)")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} is not one of {NORMALIZATIONS}")
    settings = dict(TRAINER_SETTINGS, normalization_rule_name=normalization)
    if normalization == "identity":
        settings["remove_extra_whitespaces"] = False
    user_symbols = list(user_symbols)
    if user_symbols:
        settings["user_defined_symbols"] = user_symbols
    model_path.parent.mkdir(parents=True, exist_ok=True)
    lines = _training_lines(texts, max_docs, max_chars)
    first = next(lines, None)
    if first is None:
        raise ValueError("no non-empty text to train the tokenizer on")
    buf = io.BytesIO()  # model_writer: no path inside the model, so the bytes are reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines),
            model_writer=buf,
            vocab_size=vocab_size,
            hard_vocab_limit=True,  # exactly vocab_size pieces, or an error (never a smaller vocabulary)
            max_sentence_length=1 << 16,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2,
            **settings,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size too high" in msg:
            allowed = msg.rsplit("<=", 1)[-1].strip(" .")
            raise ValueError(f"the tokenizer training text is too small for {vocab_size} pieces (at most "
                             f"{allowed} can be learned from it): give more text or a larger --tokenizer-chars "
                             f"(now {max_chars:,}) / --tokenizer-docs (now {max_docs:,})") from None
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece tokenizer: {msg}") from None
    model_path.write_bytes(buf.getvalue())
    sp = load_tokenizer(model_path)
    if sp.vocab_size() != vocab_size:  # hard_vocab_limit makes this unreachable; keep the promise explicit
        raise ValueError(f"trained tokenizer has {sp.vocab_size()} pieces, asked for {vocab_size}")
    return sp


def byte_tables(sp: spm.SentencePieceProcessor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, leading_space, boundary) per id, the val_bpb byte rule (TECHNIQUES.md 13.1):
    bytes(y | x) = base[y] + (leading_space[y] and not boundary[x]).

    Control/unknown/unused ids: 0 bytes and a boundary; byte-fallback pieces <0xNN>:
    1 byte; any other piece: the UTF-8 length of its text, a leading U+2581 counted
    as one space byte unless the previous token is a boundary (BOS).
    """
    n = sp.vocab_size()
    base = np.zeros(n, dtype=np.int64)
    space = np.zeros(n, dtype=np.bool_)
    boundary = np.zeros(n, dtype=np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            if piece.startswith(SPACE_PIECE):
                space[i], piece = True, piece[len(SPACE_PIECE):]
            base[i] = len(piece.encode("utf-8"))
    return base, space, boundary


def count_bpb_bytes(stream: np.ndarray, tables) -> int:
    """Bytes that val_bpb charges for `stream` (a BOS-started [BOS] + ids + [BOS] + ids ... array)."""
    base, space, boundary = tables
    stream = np.asarray(stream, dtype=np.int64)
    if stream.size == 0:
        return 0
    prev, tgt = stream[:-1], stream[1:]
    return int(base[stream[0]] + base[tgt].sum() + (space[tgt] & ~boundary[prev]).sum())


# -------------------------------------------------------------- byte sidecar
_NORMALIZER_PROBE = "A  b\u00a0\ufb01 \uff21\n\te\u0301 \u2163 "


def normalizer_is_identity(sp: spm.SentencePieceProcessor) -> bool:
    """True if the model keeps text as it is (only ' ' shown as U+2581): identity, no whitespace trimming."""
    return sp.normalize(_NORMALIZER_PROBE) == _NORMALIZER_PROBE.replace(" ", SPACE_PIECE)


class SidecarTables:
    """Per-piece facts for attributing bytes to tokens: how many characters of the normalized text a
    piece spans (`adv`; a byte-fallback piece advances one character on the lead byte of its
    character and none on continuation bytes), which pieces are bytes, control ids, or start with
    '▁' (`space`)."""

    def __init__(self, sp: spm.SentencePieceProcessor):
        n = sp.vocab_size()
        self.adv = np.zeros(n, dtype=np.int64)
        self.is_byte = np.zeros(n, dtype=np.bool_)
        self.is_control = np.zeros(n, dtype=np.bool_)
        self.space = np.zeros(n, dtype=np.bool_)
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                self.is_control[i] = True
            elif sp.is_byte(i):
                self.is_byte[i] = True
                self.adv[i] = int(not 0x80 <= int(sp.id_to_piece(i)[3:5], 16) < 0xC0)
            else:
                piece = sp.id_to_piece(i)
                self.adv[i], self.space[i] = len(piece), piece.startswith(SPACE_PIECE)
        self.identity = normalizer_is_identity(sp)
        self.unk_id = sp.unk_id()


def token_byte_counts(tables: SidecarTables, ids, costs: np.ndarray, unk_spans=None) -> np.ndarray:
    """Bytes per token of `ids` (one document, no BOS), given `costs`: the bytes each character of the
    tokenizer's normalized text stands for. A token gets the costs of the characters it spans; a
    byte-fallback token 1 (the costs of a byte-fallback character equal its UTF-8 length).

    unk_spans: the characters each <unk> token of `ids` spans, in order (a tokenizer without byte
    fallback); then, by the challenge's byte rule, an <unk> counts 0 and is a boundary: a '▁' starting
    the next token counts 0 too. ValueError if the pieces do not span the text exactly.
    """
    ids = np.asarray(ids, dtype=np.int64)
    control = tables.is_control[ids]
    unk = ids == tables.unk_id
    if (control & ~unk).any() or (unk.any() and unk_spans is None):
        bad = int(ids[control][0])
        raise ValueError(f"control/unknown id {bad} inside a document: cannot attribute its bytes "
                         "(a tokenizer without byte fallback?)")
    adv = tables.adv[ids]
    if unk.any():
        adv[unk] = unk_spans
    ends = np.cumsum(adv)
    total = int(ends[-1]) if ids.size else 0
    if total != len(costs):
        raise ValueError(f"the pieces span {total} characters but the normalized text has {len(costs)}")
    cum = np.concatenate(([0], np.cumsum(costs, dtype=np.int64)))
    out = cum[ends] - cum[ends - adv]
    out[tables.is_byte[ids]] = 1
    if unk.any():
        out[unk] = 0
        after = np.flatnonzero(unk[:-1] & tables.space[ids[1:]]) + 1
        out[after] -= 1  # that '▁' cost 1 (costs of a normalized '▁' are 1)
    return out


def document_byte_counts(sp, tables: SidecarTables, text: str, ids, scheme=None) -> np.ndarray:
    """Original UTF-8 bytes that each token of `ids` (the tokens of one document, no BOS) stands for.

    scheme: the CaseOps scheme `text` was transformed with (then `text` is the transformed text and
    the counts are bytes of the original: operators 0), or None for plain text.
    - identity-normalized tokenizer: the pieces spell `text` exactly, so every character costs its
      own UTF-8 length (a space '▁' 1 byte, even at the start of a document), minus the operators;
      the document's counts sum to the UTF-8 length of the original document.
    - a normalizing tokenizer (nmt_nfkc, the challenge's): the counts are the bytes of the normalized
      text (whitespace runs collapsed, ends trimmed, NFKC), a '▁' 1 byte except as the first
      character, and <unk> 0 with no space byte after it: the challenge's byte rule (TECHNIQUES
      13.1), position by position. CaseOps needs an identity-normalized tokenizer (ValueError).
    """
    if tables.identity:
        costs = caseops.byte_costs(text) if scheme is not None else caseops.utf8_lengths(text)
        return token_byte_counts(tables, ids, costs)
    if scheme is not None:
        raise ValueError("CaseOps byte counts need a tokenizer with identity normalization "
                         "(build_shards.py --caseops trains one); this one normalizes text")
    norm = sp.normalize(text)
    costs = caseops.utf8_lengths(norm)
    costs[np.frombuffer(norm.encode("utf-32-le"), dtype="<u4") == ord(SPACE_PIECE)] = 1
    if norm.startswith(SPACE_PIECE):
        costs[0] = 0  # no space byte right after BOS (the byte rule's boundary case)
    spans = None
    if tables.unk_id in ids:  # the <unk> piece text is the normalized text it replaced
        pieces = sp.encode(text, out_type=str)
        if len(pieces) != len(ids):
            raise ValueError("the tokenizer's pieces do not match its ids")
        spans = [len(pieces[k]) for k in np.flatnonzero(np.asarray(ids) == tables.unk_id)]
    return token_byte_counts(tables, ids, costs, spans)


# -------------------------------------------------------------------- shards
class ShardWriter:
    """Accumulates token arrays and writes fixed-size shards `fineweb_{split}_{i:06d}.bin`.

    `limit` (optional) caps the total token count: add() truncates at it and
    returns False once it is reached.
    """

    def __init__(self, out_dir, split: str, shard_tokens: int, limit: int | None = None):
        if shard_tokens <= 0:
            raise ValueError("shard_tokens must be positive")
        self.out_dir, self.split, self.shard_tokens, self.limit = Path(out_dir), split, shard_tokens, limit
        self.buf = np.empty(min(shard_tokens, 1 << 24), dtype=np.uint16)
        self.pos = 0          # tokens in buf
        self.total = 0        # tokens accepted so far
        self.paths: list[Path] = []

    def add(self, tokens: np.ndarray) -> bool:
        if self.limit is not None:
            tokens = tokens[: max(0, self.limit - self.total)]
        self.total += len(tokens)
        while len(tokens):
            room = self.shard_tokens - self.pos
            take = tokens[:room]
            if self.pos + len(take) > len(self.buf):  # grow lazily up to shard_tokens
                new = np.empty(min(self.shard_tokens, max(2 * len(self.buf), self.pos + len(take))), np.uint16)
                new[: self.pos] = self.buf[: self.pos]
                self.buf = new
            self.buf[self.pos: self.pos + len(take)] = take
            self.pos += len(take)
            tokens = tokens[len(take):]
            if self.pos == self.shard_tokens:
                self._flush()
        return self.limit is None or self.total < self.limit

    def _flush(self) -> None:
        path = self.out_dir / f"fineweb_{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, self.buf[: self.pos])
        self.paths.append(path)
        self.pos = 0

    def close(self) -> list[Path]:
        if self.pos:
            self._flush()
        return self.paths


def _encode_into(sp, texts: Iterable[str], writer: ShardWriter, stats: dict,
                 batch_chars: int = 4_000_000, threads: int | None = None, *, scheme=None,
                 sidecar: ShardWriter | None = None, verify: bool = True) -> None:
    """Encode non-empty `texts` as [BOS] + ids into `writer`, updating `stats` in place.

    scheme: a caseops.CaseOps applied to every text before tokenizing (None: plain text).
    sidecar: a ShardWriter that gets the per-token byte counts, parallel to `writer` (BOS: 0); every
    document's counts are checked to sum to its UTF-8 length (identity-normalized tokenizers), and
    the tokens of a CaseOps document to decode to its transformed text and (verify) that to the
    original text.
    """
    if writer.limit is not None:  # a short cut split needs no 4M-character batches
        batch_chars = min(batch_chars, max(100_000, 8 * writer.limit))
    threads = threads or os.cpu_count() or 1
    tables = byte_tables(sp)
    side_tables = SidecarTables(sp) if sidecar is not None else None
    if sidecar is not None and writer.limit is not None:
        raise ValueError("a byte sidecar needs an untruncated split")
    batch: list[str] = []
    size = 0

    def byte_counts(batch: list[str], inputs: list[str], ids: list[list[int]]) -> np.ndarray:
        out = []
        for text, inp, doc in zip(batch, inputs, ids):
            counts = document_byte_counts(sp, side_tables, inp, doc[1:], scheme)
            if side_tables.identity and int(counts.sum()) != len(text.encode("utf-8")):
                raise ValueError(f"byte sidecar: a document's counts sum to {int(counts.sum())}, its text has "
                                 f"{len(text.encode('utf-8'))} UTF-8 bytes: {text[:60]!r}")
            if scheme is not None:
                back = sp.decode(doc[1:])  # shows the (escaped) literal U+2581 as a space
                if back != inp.replace(SPACE_PIECE, " ") or (
                        verify and scheme.decode(back, from_sentencepiece=True) != text):
                    raise ValueError(f"CaseOps tokens do not decode to the document: {text[:60]!r}")
            out += ([0], counts)
        counts = np.concatenate(out)
        if counts.size and int(counts.max()) > 65535:
            raise ValueError("a token stands for more than 65535 bytes")
        return counts

    def flush() -> bool:
        nonlocal batch, size
        inputs = [scheme.encode(t) for t in batch] if scheme is not None else batch
        ids = sp.encode(inputs, add_bos=True, num_threads=threads)
        lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16, count=int(lens.sum()))
        kept, accepted = len(ids), len(flat)
        if writer.limit is not None and writer.total + len(flat) > writer.limit:
            # docs that start before the cut count (the last one may be partial)
            starts = np.cumsum(lens) - lens
            accepted = max(0, writer.limit - writer.total)
            kept = int(np.searchsorted(starts, accepted, side="left"))
        more = writer.add(flat)
        stats["docs"] += kept
        text_bytes = sum(len(t.encode("utf-8")) for t in batch[:kept])
        stats["text_bytes"] += text_bytes
        if sidecar is not None:
            counts = byte_counts(batch, inputs, ids)
            sidecar.add(counts.astype(np.uint16))
            stats["sidecar_bytes"] = stats.get("sidecar_bytes", 0) + int(counts.sum())
        if scheme is not None:  # val_bpb divides by the original bytes (what a sidecar holds)
            if accepted == len(flat):
                stats["bpb_bytes"] += text_bytes
            else:  # a cut split: the last kept document counts up to the cut
                last = kept - 1
                n_cut = accepted - int(lens[:last].sum()) - 1  # its tokens before the cut, BOS excluded
                cut = document_byte_counts(sp, SidecarTables(sp), inputs[last], ids[last][1:], scheme)[:max(0, n_cut)]
                stats["bpb_bytes"] += sum(len(t.encode("utf-8")) for t in batch[:last]) + int(cut.sum())
        else:
            stats["bpb_bytes"] += count_bpb_bytes(flat[:accepted], tables)  # every batch starts with a BOS
        batch, size = [], 0
        return more

    for text in texts:
        if not text.strip():
            stats["empty_docs_skipped"] += 1
            continue
        batch.append(text)
        size += len(text)
        if size >= batch_chars and not flush():
            stats["truncated"] = True
            return
    if batch and not flush():
        stats["truncated"] = True


# --------------------------------------------------------------------- build
def _first_nonempty(docs: Iterator[str], n: int) -> Iterator[str]:
    """Yield from `docs` until `n` non-empty documents (plus any empty ones between) are out."""
    if n <= 0:
        return
    for text in docs:
        yield text
        if text.strip():
            n -= 1
            if n == 0:
                return


def _new_stats() -> dict:
    return {"docs": 0, "empty_docs_skipped": 0, "text_bytes": 0, "bpb_bytes": 0, "truncated": False}


def build(inputs, out, *, val_input=None, val_docs: int | None = None, tokenizer=None,
          vocab_size: int = 1024, shard_tokens: int = 100_000_000, max_train_tokens: int | None = None,
          tokenizer_docs: int = 200_000, tokenizer_chars: int = 20_000_000, txt_mode: str = "paragraph",
          threads: int | None = None, verbose: bool = False, overwrite: bool = False,
          caseops_scheme: str | None = None, normalization: str | None = None,
          byte_sidecar: bool = False, verify: bool = True) -> dict:
    """Build shards + tokenizer.model + meta.json in `out`; return the meta dict.

    Exactly one of `val_input` (list of files) or `val_docs` (first N non-empty
    documents of `inputs`) selects the validation set. Existing shards in `out`
    are an error unless `overwrite` (then they are deleted first).

    caseops_scheme (e.g. "caseops_v1"): transform every document with that CaseOps scheme before
    tokenizing, train the tokenizer on transformed text with identity normalization and the operators
    as user-defined pieces, and write the validation byte sidecar (always on with CaseOps).
    normalization: of a trained tokenizer, "nmt_nfkc" (the default without CaseOps) or "identity".
    byte_sidecar: also write fineweb_val_bytes_*.bin for a plain build.
    verify: with CaseOps, invert the transform on every validation document's tokens and compare
    with the original (the tokens are always checked to decode to the transformed text).
    """
    t0 = time.time()
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("no input files given")
    if (val_input is None) == (val_docs is None):
        raise ValueError("give exactly one of val_input or val_docs")
    if val_docs is not None and val_docs < 1:
        raise ValueError("val_docs must be >= 1")
    for p in inputs + [Path(p) for p in (val_input or [])]:
        if not p.is_file():
            raise FileNotFoundError(f"input file not found: {p}")
    scheme = caseops.CaseOps.from_name(caseops_scheme) if caseops_scheme else None
    if normalization is None:
        normalization = "identity" if scheme is not None else "nmt_nfkc"
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} is not one of {NORMALIZATIONS}")
    if scheme is not None and normalization != "identity":
        raise ValueError("CaseOps needs identity normalization (NFKC and whitespace collapsing would break "
                         "the byte-exact round trip)")
    byte_sidecar = byte_sidecar or scheme is not None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("fineweb_train_*.bin")) + sorted(out.glob("fineweb_val_*.bin"))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds {len(old)} shard(s); pass overwrite=True / --overwrite")
    for path in old + [out / "meta.json"]:
        path.unlink(missing_ok=True)  # never mix outputs of an earlier run
    model_out = out / "tokenizer.model"

    def val_stream() -> Iterator[str]:
        if val_input is not None:
            return iter_documents(val_input, txt_mode)
        return _first_nonempty(iter_documents(inputs, txt_mode), val_docs)

    def train_stream() -> Iterator[str]:
        docs = iter_documents(inputs, txt_mode)
        if val_docs:
            for _ in _first_nonempty(docs, val_docs):  # skip exactly what val_stream() takes
                pass
        return docs

    # tokenizer
    t_tok = time.time()
    if tokenizer is not None:
        sp = load_tokenizer(tokenizer)
        if scheme is not None:
            check_caseops_tokenizer(sp, str(tokenizer))
        if Path(tokenizer).resolve() != model_out.resolve():
            shutil.copyfile(tokenizer, model_out)
        tok_source = str(tokenizer)
    else:
        texts = (t for t in train_stream() if t.strip())
        if scheme is not None:
            texts = map(scheme.encode, texts)
        sp = train_tokenizer(texts, model_out, vocab_size, tokenizer_docs, tokenizer_chars, threads, verbose,
                             normalization=normalization, user_symbols=caseops.OPERATORS if scheme else ())
        tok_source = "trained"
    t_tok = time.time() - t_tok

    # shards
    t_enc = time.time()
    meta = {"tokenizer": str(model_out), "tokenizer_source": tok_source, "vocab_size": sp.vocab_size(),
            "bos_id": BOS_ID, "shard_tokens": shard_tokens,
            "normalization": "identity" if normalizer_is_identity(sp) else "normalizing (e.g. nmt_nfkc)",
            "caseops": None if scheme is None else {
                "scheme": scheme.name, "operators": {name: sp.piece_to_id(op) for name, op in
                                                     zip(("TITLE", "ALLCAPS", "CAPNEXT", "ESC"), caseops.OPERATORS)},
                **({"unicodedata": unicodedata.unidata_version} if scheme.unicode_letters else {})}}
    for split, stream, limit in (("val", val_stream(), None), ("train", train_stream(), max_train_tokens)):
        stats = _new_stats()
        writer = ShardWriter(out, split, shard_tokens, limit)
        sidecar = ShardWriter(out, f"{split}_{SIDECAR_TAG}", shard_tokens) if split == "val" and byte_sidecar else None
        _encode_into(sp, stream, writer, stats, threads=threads, scheme=scheme, sidecar=sidecar,
                     verify=verify)
        paths = writer.close()
        if stats["docs"] == 0:
            raise ValueError(f"no non-empty {split} documents found "
                             f"({stats['empty_docs_skipped']} empty ones skipped)")
        stats.update(tokens=writer.total, shards=[p.name for p in paths])
        if sidecar is not None:
            stats["byte_sidecars"] = [p.name for p in sidecar.close()]
        meta[split] = stats
    meta["seconds"] = {"tokenizer": round(t_tok, 2), "encode": round(time.time() - t_enc, 2),
                       "total": round(time.time() - t0, 2)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def print_summary(meta: dict) -> None:
    print(f"tokenizer: {meta['tokenizer']} (vocab {meta['vocab_size']}, from {meta['tokenizer_source']})")
    for split in ("train", "val"):
        s = meta[split]
        tpb = s["tokens"] / max(1, s["text_bytes"])
        bpb_bytes = s.get("bpb_bytes", s["text_bytes"])
        print(f"{split:5s}: {s['docs']:,} docs, {s['tokens']:,} tokens, {len(s['shards'])} shard(s), "
              f"{s['text_bytes']:,} text bytes ({tpb:.3f} tokens/byte), {bpb_bytes:,} val_bpb bytes "
              f"({bpb_bytes / max(1, s['tokens']):.3f} bytes/token, BOS included), "
              f"{s['empty_docs_skipped']} empty docs skipped" + (", cut at --max-train-tokens" if s["truncated"] else ""))
    if meta.get("caseops"):
        print(f"caseops: {meta['caseops']['scheme']}, operator ids {meta['caseops']['operators']}")
    if "byte_sidecars" in meta["val"]:
        print(f"val byte sidecar: {', '.join(meta['val']['byte_sidecars'])}, {meta['val']['sidecar_bytes']:,} bytes "
              f"({meta['val']['text_bytes']:,} in the original documents)")
    t = meta["seconds"]
    print(f"time: tokenizer {t['tokenizer']}s, encode+write {t['encode']}s, total {t['total']}s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help=".jsonl, .jsonl.zst or .txt files (training documents)")
    ap.add_argument("--out", required=True, help="output directory")
    val = ap.add_mutually_exclusive_group(required=True)
    val.add_argument("--val-input", nargs="+", metavar="FILE", help="files with the validation documents")
    val.add_argument("--val-docs", type=int, metavar="N",
                     help="use the first N non-empty input documents as validation (never trained on)")
    ap.add_argument("--tokenizer", help="existing SentencePiece .model to use (else one is trained)")
    ap.add_argument("--vocab-size", type=int, default=1024,
                    help="exact number of pieces when training: 1024 (default, sp1024), 4096, 8192, ... "
                         f"({MIN_VOCAB}..{MAX_VOCAB}); ignored with --tokenizer")
    ap.add_argument("--tokenizer-docs", type=int, default=200_000,
                    help="max docs to train the tokenizer on (default 200,000)")
    ap.add_argument("--tokenizer-chars", type=int, default=20_000_000,
                    help="max chars to train the tokenizer on (default 20M; a larger vocab needs more text, "
                         "and training time grows with it)")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 1e8)")
    ap.add_argument("--max-train-tokens", type=int, default=None, help="stop after this many training tokens")
    ap.add_argument("--txt-mode", choices=["paragraph", "file"], default="paragraph",
                    help=".txt documents: blank-line separated blocks (default) or one per file")
    ap.add_argument("--threads", type=int, default=None, help="encoder/trainer threads (default: all cores)")
    ap.add_argument("--overwrite", action="store_true", help="delete shards already in --out first")
    ap.add_argument("--verbose", action="store_true", help="show SentencePiece trainer logs")
    ap.add_argument("--caseops", action="store_true",
                    help="CaseOps: case-factor the text (data/caseops.py), train the tokenizer on it with identity "
                         "normalization and the 4 operators as user-defined pieces, write the val byte sidecar")
    ap.add_argument("--caseops-scheme", default=caseops.BASE_NAME, choices=list(caseops.SCHEMES),
                    help=f"CaseOps variant (default {caseops.BASE_NAME}, the records' transform: ASCII letters, "
                         "operator right before its word); _opspace puts TITLE/ALLCAPS before the word's space, "
                         "_unicode case-factors non-ASCII letter pairs too")
    ap.add_argument("--normalization", choices=NORMALIZATIONS, default=None,
                    help="normalization of a trained tokenizer (default nmt_nfkc, the challenge's; identity with "
                         "--caseops, which requires it)")
    ap.add_argument("--byte-sidecar", action="store_true",
                    help="write fineweb_val_bytes_*.bin for a plain build too (always on with --caseops)")
    args = ap.parse_args(argv)
    try:
        meta = build(args.inputs, args.out, val_input=args.val_input, val_docs=args.val_docs,
                     tokenizer=args.tokenizer, vocab_size=args.vocab_size, shard_tokens=args.shard_tokens,
                     max_train_tokens=args.max_train_tokens, tokenizer_docs=args.tokenizer_docs,
                     tokenizer_chars=args.tokenizer_chars, txt_mode=args.txt_mode, threads=args.threads,
                     verbose=args.verbose, overwrite=args.overwrite,
                     caseops_scheme=args.caseops_scheme if args.caseops else None,
                     normalization=args.normalization, byte_sidecar=args.byte_sidecar)
    except (OSError, ValueError) as e:
        sys.exit(f"build_shards: error: {e}")
    print_summary(meta)
    print(f"wrote {args.out}/meta.json")


if __name__ == "__main__":
    main()
