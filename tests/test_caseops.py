"""CaseOps data side: the transform (data/caseops.py), CaseOps tokenizers and shards with the val byte sidecar
(data/build_shards.py --caseops), the sidecar reader (data/shard_io.py), check_bytes on CaseOps builds, and the
sp8192_caseops / docs download plans.

The tests on the stand-in corpus (/work/shared/corpus/wikipedia) and the challenge tokenizer skip when those are
absent; the rest run on the embedded sample (data/sample) and hand-written text.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import build_sample
import build_shards
import cached_challenge_fineweb as ccf
import caseops as co
import check_bytes
import shard_io
import train_gpt
from caseops import ALLCAPS as A, CAPNEXT as C, ESC as E, TITLE as T

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SHARED = Path("/work/shared")
WIKI = SHARED / "corpus" / "wikipedia"
VAL_000, TRAIN_000 = WIKI / "val_000.jsonl.zst", WIKI / "train_000.jsonl.zst"
CHALLENGE_SP1024 = SHARED / "tokenizers" / "fineweb_1024_bpe.model"
needs_wiki = pytest.mark.skipif(not (VAL_000.is_file() and TRAIN_000.is_file()), reason="no shared wikipedia corpus")
needs_sp1024 = pytest.mark.skipif(not CHALLENGE_SP1024.is_file(), reason="no shared challenge tokenizer")

SCHEMES = [co.CaseOps.from_name(name) for name in co.SCHEMES]
V1, OPSPACE = co.CaseOps(), co.CaseOps(op_before_space=True)
UNI = co.CaseOps(unicode_letters=True)

# Hand-written edge cases: every case pattern, non-ASCII letters, digits, apostrophes, operator characters already
# in the text, whitespace, and the Unicode letters without a simple 1:1 case pair.
EDGE = [
    "", " ", "  \n\t ", "a", "A", "I", "Hello", "hello", "HELLO", "The NASA Launch", "iPhone OpenAI", "McDonald",
    "MacBook Pro", "ABc", "aBC", "eBay's CEO", "DON'T Don't don't", "O'Neill O'NEILL", "rock'n'roll", "B2B 3M 4x4 X11",
    "COVID-19 covid-19 Covid-19", "NEW YORK CITY is BIG", "A B C", "a.B.c", "x\ny\nZ", "  The  cat  Sat  ",
    "Ärger Öl Über ÅNGSTRÖM École", "İstanbul ıI iİ", "Straße STRASSE STRAẞE ẞ", "ΟΔΟΣ Οδός οδός ΣΊΣΥΦΟΣ σς",
    "ǅemal ǄEMAL ǆemal Ǉ ǈ ǉ", "\u212a Kelvin \u212b", "Ⱥ ⱥ ȺA", "ﬁ ﬂ ﬃ ＡＢＣ ａｂｃ", "Ǳ ǲ ǳ", "ᾈ ᾀ ῼ",
    "\ue001", "\ue004\ue004", "x\ue001y", "\ue002NASA\ue003", "The\ue001 \ue004End", "\ue004 The", "a\ue001 B",
    "\u2581 literal \u2581Word", "emoji \U0001F600 Émoji \U0001F1FA\U0001F1F8 ZWJ \U0001F468\u200d\U0001F469",
    "\U00010400\U00010428 Deseret \U0001E900\U0001E922",  # 4-byte case pairs (Deseret, Adlam)
    "CamelCaseWordsHere snake_case_THING", "ÀÉÎÕÜ àéîõü", "ΑΒΓ αβγ Ωmega", "ДОБРЫЙ Добрый добрый",
]


def _show(t: str) -> str:
    return t.replace(T, "T|").replace(A, "A|").replace(C, "C|").replace(E, "E|")


# ----------------------------------------------------------------------------------------------
# the transform
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_round_trip_edge_cases(scheme):
    for text in EDGE:
        t = scheme.encode(text)
        assert scheme.decode(t) == text, (text, _show(t))
        assert scheme.encode(scheme.decode(t)) == t
        assert int(co.byte_costs(t).sum()) == len(text.encode("utf-8"))  # operators cost 0
        assert not any(c in scheme._upper for c in t)  # the lexical stream has no case-pair capitals


@pytest.mark.parametrize("text,v1,opspace", [
    ("hello world", "hello world", "hello world"),
    ("Hello", "T|hello", "T|hello"),
    ("I", "T|i", "T|i"),                                          # a single capital is title case
    ("The NASA Launch", "T|the A|nasa T|launch", "T|theA| nasaT| launch"),
    ("iPhone OpenAI", "iC|phone T|openC|aC|i", "iC|phoneT| openC|aC|i"),
    ("McDonald", "T|mcC|donald", "T|mcC|donald"),
    ("ABc", "T|aC|bc", "T|aC|bc"),                               # not all caps: TITLE + CAPNEXT
    ("DON'T Don't", "A|don'T|t T|don't", "A|don'T|tT| don't"),   # the apostrophe ends the run
    ("B2B", "T|b2T|b", "T|b2T|b"),                               # so does a digit
    ("NEW YORK", "A|new A|york", "A|newA| york"),                # one ALLCAPS per run
    ("  The", "  T|the", " T| the"),                             # only the space next to the word hops
    ("x\ue001y\ue004", "xE|\ue001yE|E|", "xE|\ue001yE|E|"),          # literal operators escaped
    ("\ue004 The", "E|E| T|the", "E|E|T| the"),
    ("a\u2581b \u2581", "aE|\u2581b E|\u2581", "aE|\u2581b E|\u2581"),  # SentencePiece's space mark escaped
    ("", "", ""),
])
def test_case_patterns(text, v1, opspace):
    def ops(shown: str) -> str:
        return shown.replace("T|", T).replace("A|", A).replace("C|", C).replace("E|", E)

    assert V1.encode(text) == ops(v1), _show(V1.encode(text))
    assert OPSPACE.encode(text) == ops(opspace), _show(OPSPACE.encode(text))
    assert V1.decode(V1.encode(text)) == text and OPSPACE.decode(OPSPACE.encode(text)) == text


def test_records_readme_examples():
    """The two examples of the CaseOps record's README (2026-04-18), operator by operator."""
    assert V1.encode("The NASA Launch") == f"{T}the {A}nasa {T}launch"
    assert V1.encode("iPhone OpenAI") == f"i{C}phone {T}open{C}a{C}i"


def test_unicode_case_pairs():
    pairs = co.case_pairs(True)
    assert all(len(u.encode()) == len(l.encode()) and l.upper() == u for u, l in pairs.items())
    assert len(set(pairs.values())) == len(pairs)  # one-to-one
    assert pairs["Σ"] == "σ" and pairs["Ǆ"] == "ǆ" and pairs["É"] == "é" and pairs["\U00010400"] == "\U00010428"
    left_alone = ["İ", "ı", "ß", "ẞ", "ς", "ǅ", "ǈ", "ǋ", "ǲ", "\u212a", "\u212b", "Ⱥ", "ⱥ", "ᾈ", "ﬁ"]
    assert not any(c in pairs or c in pairs.values() for c in left_alone)
    assert co.case_pairs(False) == {chr(c): chr(c + 32) for c in range(65, 91)}
    # what that means for the text
    assert UNI.encode("ΟΔΟΣ οδός") == f"{A}οδοσ οδός"                 # Σ -> σ; a final ς stays as it is
    assert UNI.decode(UNI.encode("ΟΔΟΣ")) == "ΟΔΟΣ"                   # and comes back as Σ, not ς
    assert UNI.encode("İstanbul") == "İstanbul"                       # İ is no letter: "stanbul" is lowercase
    assert UNI.encode("STRAẞE") == f"{A}stra" + "ẞ" + f"{T}e"         # ẞ splits the run
    assert UNI.encode("ǅemal ǄEMAL") == f"ǅemal {A}ǆemal"
    assert UNI.encode("École") == f"{T}école" and V1.encode("École") == "École"  # ASCII mode leaves É alone
    assert UNI.encode("\u212aelvin") == "\u212aelvin" and UNI.encode("Kelvin") == f"{T}kelvin"


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("bad", [
    T, A, C, E, f"{T} ", f"{T}.", f"{A}a", f"{A}a{C}b", f"{T}a{C}b", f"{C}ab", f"ab{C}", f"ab{C}1", f"a{T}b",
    f"{E}a", f"{E}", f"{T}{T}a", "Abc", "aBc", f"{E}{T}{T}",
])
def test_decode_rejects_what_encode_never_writes(scheme, bad):
    if scheme.op_before_space and bad == f"{T} ":
        bad = f"{T} ."
    with pytest.raises(ValueError):
        scheme.decode(bad)


def test_opspace_rejects_operator_after_space():
    assert OPSPACE.decode(f"a{T} b") == "a B"
    with pytest.raises(ValueError, match="start of a letter run"):
        OPSPACE.decode(f"a {T}b")  # OPSPACE writes the operator before the space
    assert V1.decode(f"a {T}b") == "a B"
    with pytest.raises(ValueError):
        V1.decode(f"a{T} b")


def test_fuzz_bijective():
    """Random strings from a tricky alphabet round-trip; random transformed strings either fail to decode or are
    exactly what encode writes for their decoding (so the transform is a bijection onto its image)."""
    rng = random.Random(1234)
    alphabet = ["a", "b", "Z", "Q", " ", "  ", ".", "'", "1", "ß", "ẞ", "Σ", "σ", "ς", "İ", "ı", "ǅ", "Ǆ", "ǆ",
                "\u212a", "É", "é", "\u2581", "\n", *co.OPERATORS]
    t_alphabet = ["a", "b", "σ", "ς", "ǆ", " ", ".", "é", "Z", *co.OPERATORS, *co.OPERATORS]
    decoded = 0
    for _ in range(2500):
        x = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        t = "".join(rng.choice(t_alphabet) for _ in range(rng.randint(0, 10)))
        for scheme in SCHEMES:
            enc = scheme.encode(x)
            assert scheme.decode(enc) == x, (scheme.name, x, _show(enc))
            assert int(co.byte_costs(enc).sum()) == len(x.encode())
            try:
                back = scheme.decode(t)
            except ValueError:
                continue
            decoded += 1
            assert scheme.encode(back) == t, (scheme.name, _show(t), back)
    assert decoded > 1000


def test_space_mark_escape():
    t = V1.encode("\u2581x \ue004\u2581")
    assert t == f"{E}\u2581x {E}{E}{E}\u2581"
    assert co.byte_costs(t).tolist() == [0, 3, 1, 1, 0, 3, 0, 3]
    assert V1.decode(t) == "\u2581x \ue004\u2581"
    assert V1.decode(f"{E} x {E}{E}{E} ", from_sentencepiece=True) == "\u2581x \ue004\u2581"  # what the tokens show
    with pytest.raises(ValueError):
        V1.decode(f"{E} x")  # a strict decode takes only what encode writes
    assert V1.decode(f"{E}{E} x", from_sentencepiece=True) == "\ue004 x"  # an escaped ESC does not escape the space


def test_byte_costs_and_escapes():
    t = V1.encode(f"A{E}b{T}")  # TITLE a, ESC ESC b, ESC TITLE
    assert t == f"{T}a{E}{E}b{E}{T}"
    assert co.byte_costs(t).tolist() == [0, 1, 0, 3, 1, 0, 3]
    assert co.acting_operators(t).tolist() == [0, 2, 5]
    assert co.byte_costs("é\U0001F600 ").tolist() == [2, 4, 1]
    assert co.byte_costs("").tolist() == []


def test_scheme_names():
    assert [s.name for s in SCHEMES] == list(co.SCHEMES) == [
        "caseops_v1", "caseops_v1_opspace", "caseops_v1_unicode", "caseops_v1_unicode_opspace"]
    assert repr(co.CaseOps.from_name("caseops_v1_opspace")) == "CaseOps(caseops_v1_opspace)"
    with pytest.raises(ValueError, match="unknown CaseOps scheme"):
        co.CaseOps.from_name("caseops_v2")


# ----------------------------------------------------------------------------------------------
# every document of the stand-in corpus
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def val_docs():
    if not VAL_000.is_file():
        pytest.skip("no shared wikipedia corpus")
    return list(build_shards.iter_documents([VAL_000]))


@needs_wiki
def test_round_trip_every_val_000_document(val_docs):
    assert len(val_docs) == 500
    encoded = [V1.encode(d) for d in val_docs]
    assert [V1.decode(t) for t in encoded] == val_docs
    assert sum(int(co.byte_costs(t).sum()) for t in encoded) == sum(len(d.encode()) for d in val_docs)
    n_ops = sum(sum(t.count(op) for op in (T, A, C)) for t in encoded)
    assert n_ops > 100_000  # the corpus really exercises the operators


@needs_wiki
def test_round_trip_train_000_sample():
    docs = list(itertools.islice(build_shards.iter_documents([TRAIN_000]), 0, None, 12))  # every 12th document
    assert len(docs) > 100
    for d in docs:
        assert V1.decode(V1.encode(d)) == d
    for scheme in SCHEMES[1:]:  # the other schemes on part of it
        for d in docs[:40]:
            assert scheme.decode(scheme.encode(d)) == d


@needs_wiki
def test_caseops_val_000_sidecar_sums_to_the_original_bytes(tmp_path, val_docs):
    """A CaseOps build (1024-piece tokenizer trained on train_000): the sidecar of the whole val split sums to the
    UTF-8 byte count of the 500 original documents exactly, per document too."""
    meta = build_shards.build([TRAIN_000], tmp_path, val_input=[VAL_000], vocab_size=1024,
                              tokenizer_chars=2_000_000, max_train_tokens=1000, caseops_scheme="caseops_v1",
                              threads=1, verify=False)  # (the transform round trip is the test above)
    tokens, counts = shard_io.read_byte_sidecars(tmp_path, "val")
    original = [len(d.encode("utf-8")) for d in val_docs]
    assert int(counts.sum(dtype=np.int64)) == sum(original) == meta["val"]["text_bytes"] == meta["val"]["bpb_bytes"]
    assert meta["val"]["sidecar_bytes"] == sum(original) and meta["val"]["docs"] == 500
    starts = np.flatnonzero(tokens == 1)
    assert len(starts) == 500 and counts[starts].max() == 0
    per_doc = np.add.reduceat(counts.astype(np.int64), starts)
    assert per_doc.tolist() == original
    ops = np.isin(tokens, [meta["caseops"]["operators"][k] for k in ("TITLE", "ALLCAPS", "CAPNEXT")])
    assert ops.sum() > 50_000 and counts[ops].max() == 0  # operators cost 0 bytes


def _lut_bytes(sp, stream: np.ndarray) -> np.ndarray:
    """train_gpt's byte count of every target stream[1:] given stream[:-1]."""
    luts = train_gpt.build_byte_luts(sp, sp.vocab_size())
    t = torch.from_numpy(stream.astype(np.int64))
    return train_gpt.target_bytes(t[:-1], t[1:], luts).numpy()


@needs_wiki
@needs_sp1024
def test_plain_sidecar_equals_lut_bytes_at_every_position(tmp_path):
    """The challenge's sp1024 (nmt_nfkc, and no byte fallback: <unk> tokens): a plain build's sidecar equals
    train_gpt.build_byte_luts/target_bytes position by position (the first 80 val_000 documents)."""
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n"
                           for d in itertools.islice(build_shards.iter_documents([VAL_000]), 80)))
    out = tmp_path / "out"
    build_shards.build([SAMPLE / "sample_train.jsonl.zst"], out, val_input=[val], tokenizer=CHALLENGE_SP1024,
                       byte_sidecar=True, max_train_tokens=1000, threads=1)
    tokens, counts = shard_io.read_byte_sidecars(out, "val")
    sp = spm.SentencePieceProcessor(model_file=str(CHALLENGE_SP1024))
    assert counts[0] == 0 and np.array_equal(counts[1:].astype(np.int64), _lut_bytes(sp, tokens))
    assert (tokens == sp.unk_id()).sum() > 500  # the <unk> rule (0 bytes, no space byte after it) is exercised


def test_plain_sidecar_equals_lut_bytes_on_the_sample(tmp_path):
    """Same on the embedded sample with its committed 1024-piece tokenizer (byte fallback), plus odd text."""
    val = tmp_path / "val.jsonl"
    odd = ["  leading and trailing  ", "\u2581lead \u2581 mid", "tabs\tand\nnewlines\n\n x", "\U0001F600 \ufb01 \uff21",
           "\ue001 operators \ue004 are plain text here", "x"]
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in
                           itertools.chain(build_shards.iter_documents([SAMPLE / "sample_val.jsonl.zst"]), odd)))
    build_shards.build([SAMPLE / "sample_train.jsonl.zst"], tmp_path, val_input=[val],
                       tokenizer=SAMPLE / "sample_1024_bpe.model", byte_sidecar=True, max_train_tokens=1000,
                       shard_tokens=100_000, threads=1)
    assert [p.name for p in shard_io.token_shards(tmp_path, "val")] == [f"fineweb_val_{i:06d}.bin" for i in range(3)]
    tokens, counts = shard_io.read_byte_sidecars(tmp_path, "val")
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE / "sample_1024_bpe.model"))
    assert counts[0] == 0 and np.array_equal(counts[1:].astype(np.int64), _lut_bytes(sp, tokens))


# ----------------------------------------------------------------------------------------------
# CaseOps builds of the embedded sample
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caseops_sample(tmp_path_factory):
    out = tmp_path_factory.mktemp("caseops_sample")
    return out, build_sample.build_caseops_sample(out)


def test_caseops_sample_build(caseops_sample):
    out, meta = caseops_sample
    assert meta["caseops"]["scheme"] == "caseops_v1" and meta["normalization"] == "identity"
    assert meta["caseops"]["operators"] == {"TITLE": 4, "ALLCAPS": 5, "CAPNEXT": 6, "ESC": 7}
    assert meta["val"]["shards"] == [f"fineweb_val_{i:06d}.bin" for i in range(3)]
    assert meta["val"]["byte_sidecars"] == [f"fineweb_val_bytes_{i:06d}.bin" for i in range(3)]
    for name, side in zip(meta["val"]["shards"], meta["val"]["byte_sidecars"]):  # parallel, same header format
        header = np.fromfile(out / side, dtype="<i4", count=256)
        assert np.array_equal(header, np.fromfile(out / name, dtype="<i4", count=256))
        assert header[:3].tolist() == [20240520, 1, shard_io.read_header(out / name)] and not header[3:].any()
        assert (out / side).stat().st_size == 1024 + 2 * int(header[2])
    assert "byte_sidecars" not in meta["train"] and not list(out.glob("fineweb_train_bytes_*"))
    texts = [t for t in build_shards.iter_documents([SAMPLE / "sample_val.jsonl.zst"]) if t.strip()]
    assert meta["val"]["sidecar_bytes"] == meta["val"]["bpb_bytes"] == sum(len(t.encode()) for t in texts)
    assert meta["train"]["tokens"] == 200_000 and meta["train"]["truncated"]
    # the truncated train split's val_bpb bytes are exactly those of the tokens kept
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    train = np.concatenate([shard_io.read_shard(out / n) for n in meta["train"]["shards"]]).astype(np.int64)
    docs = check_bytes.split_documents(train)
    full = sum(len(V1.decode(sp.decode(d.tolist())).encode()) for d in docs[:-1])
    tables = build_shards.SidecarTables(sp)
    train_texts = [t for t in build_shards.iter_documents([SAMPLE / "sample_train.jsonl.zst"]) if t.strip()]
    last = V1.encode(train_texts[len(docs) - 1])
    cut = build_shards.document_byte_counts(sp, tables, last, sp.encode(last), V1)[: len(docs[-1])].sum()
    assert meta["train"]["bpb_bytes"] == full + int(cut)


def test_caseops_tokenizer_layout(caseops_sample):
    out, _ = caseops_sample
    sp = build_shards.load_tokenizer(out / "tokenizer.model")
    build_shards.check_caseops_tokenizer(sp)
    assert sp.vocab_size() == 1024 and (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(co.OPERATORS)
    assert [i for i in range(1024) if sp.is_byte(i)] == list(range(8, 264))
    assert build_shards.normalizer_is_identity(sp)
    for text in EDGE:  # identity normalization: the pieces spell the transformed text exactly
        t = V1.encode(text)
        assert sp.decode(sp.encode(t)) == t.replace("\u2581", " ")
        assert V1.decode(sp.decode(sp.encode(t)), from_sentencepiece=True) == text  # tokens -> text is exact
    # an operator is always its own token, wherever it stands
    ids = sp.encode(V1.encode("the NASA and McDonald's iPhone"))
    assert ids.count(5) == 1 and ids.count(4) == 1 and ids.count(6) == 2
    # a plain (nmt_nfkc) tokenizer cannot be used for CaseOps
    with pytest.raises(ValueError, match="not a user-defined piece"):
        build_shards.check_caseops_tokenizer(build_shards.load_tokenizer(SAMPLE / "sample_1024_bpe.model"))


def test_check_bytes_on_caseops_build(caseops_sample, capsys):
    out, _ = caseops_sample
    assert check_bytes.main([str(out), "--text", str(SAMPLE / "sample_val.jsonl.zst")]) == 0
    text = capsys.readouterr().out
    assert "CaseOps caseops_v1" in text and "0 document(s) differ from the original" in text
    assert "input text: 0 of 222 documents differ" in text and text.rstrip().endswith("every count matches")


def test_caseops_tokenizer_vocab_is_exact(tmp_path, vocab=8192):
    docs = (V1.encode(t) for t in build_shards.iter_documents([SAMPLE / "sample_train.jsonl.zst"]) if t.strip())
    sp = build_shards.train_tokenizer(docs, tmp_path / "tok.model", vocab, max_chars=6_000_000, threads=1,
                                      normalization="identity", user_symbols=co.OPERATORS)
    assert sp.vocab_size() == vocab and [sp.id_to_piece(i) for i in range(4, 8)] == list(co.OPERATORS)
    assert sum(sp.is_byte(i) for i in range(vocab)) == 256
    build_shards.check_caseops_tokenizer(sp)


def test_synthetic_documents_sidecar_exact(caseops_sample, tmp_path):
    """Edge-case documents through the sample's CaseOps tokenizer: exact per-document sums, BOS 0, empty documents
    skipped, operator characters in the text (escaped), a literal U+2581, leading spaces, 4-byte characters."""
    out, _ = caseops_sample
    docs = [d for d in EDGE if d] + ["", "   ", "\u2581", " \u2581 x \u2581"]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    built = tmp_path / "built"
    meta = build_shards.build([SAMPLE / "sample_train.jsonl.zst"], built, val_input=[val],
                              tokenizer=out / "tokenizer.model", caseops_scheme="caseops_v1", max_train_tokens=100)
    kept = [d for d in docs if d.strip()]
    assert meta["val"]["docs"] == len(kept) and meta["val"]["empty_docs_skipped"] == len(docs) - len(kept)
    tokens, counts = shard_io.read_byte_sidecars(built, "val")
    starts = np.flatnonzero(tokens == 1)
    assert np.add.reduceat(counts.astype(np.int64), starts).tolist() == [len(d.encode()) for d in kept]
    assert check_bytes.main([str(built), "--text", str(val)]) == 0


def test_other_schemes_build(caseops_sample, tmp_path):
    """caseops_v1_unicode_opspace end to end (through the sample's CaseOps tokenizer), and what the operator placement
    does to the token count: the records' form makes " Word" three tokens ('▁', TITLE, 'word'), _opspace two."""
    out, _ = caseops_sample
    meta = build_shards.build([SAMPLE / "sample_train.jsonl.zst"], tmp_path, val_input=[SAMPLE / "sample_val.jsonl.zst"],
                              tokenizer=out / "tokenizer.model", caseops_scheme="caseops_v1_unicode_opspace",
                              max_train_tokens=100, threads=1)
    assert meta["caseops"]["scheme"] == "caseops_v1_unicode_opspace" and "unicodedata" in meta["caseops"]
    assert check_bytes.main([str(tmp_path)]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    docs = [t for t in build_shards.iter_documents([SAMPLE / "sample_val.jsonl.zst"]) if t.strip()]
    n_v1, n_opspace = (sum(map(len, sp.encode([s.encode(d) for d in docs]))) for s in (V1, OPSPACE))
    assert n_opspace < 0.99 * n_v1
    assert sp.encode(V1.encode("a Word"), out_type=str) == ["a", "\u2581", T, "word"]
    assert sp.encode(OPSPACE.encode("a Word"), out_type=str) == ["a", T, "\u2581word"]


def test_caseops_refuses_a_normalizing_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="not a user-defined piece"):
        build_shards.build([SAMPLE / "sample_train.jsonl.zst"], tmp_path, val_input=[SAMPLE / "sample_val.jsonl.zst"],
                           tokenizer=SAMPLE / "sample_1024_bpe.model", caseops_scheme="caseops_v1")
    with pytest.raises(ValueError, match="identity normalization"):
        build_shards.build([SAMPLE / "sample_train.jsonl.zst"], tmp_path, val_input=[SAMPLE / "sample_val.jsonl.zst"],
                           caseops_scheme="caseops_v1", normalization="nmt_nfkc")


def test_build_shards_cli_caseops(tmp_path, capsys):
    build_shards.main([str(SAMPLE / "sample_train.jsonl.zst"), "--val-input", str(SAMPLE / "sample_val.jsonl.zst"),
                       "--out", str(tmp_path), "--caseops", "--caseops-scheme", "caseops_v1_opspace",
                       "--tokenizer-chars", "1000000", "--max-train-tokens", "1000", "--threads", "1"])
    text = capsys.readouterr().out
    assert "caseops: caseops_v1_opspace" in text and "val byte sidecar: fineweb_val_bytes_000000.bin" in text
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["caseops"]["scheme"] == "caseops_v1_opspace" and meta["val"]["byte_sidecars"]


# ----------------------------------------------------------------------------------------------
# the sidecar reader
# ----------------------------------------------------------------------------------------------


def test_sidecar_reader_checks(tmp_path):
    shard_io.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 50, 60, 1, 70])
    side = shard_io.sidecar_path(tmp_path / "fineweb_val_000000.bin")
    assert side.name == "fineweb_val_bytes_000000.bin"
    shard_io.write_shard(side, [0, 3, 4, 0, 5])
    assert shard_io.read_byte_sidecar(side, tmp_path / "fineweb_val_000000.bin").tolist() == [0, 3, 4, 0, 5]
    tokens, counts = shard_io.read_byte_sidecars(tmp_path)
    assert tokens.tolist() == [1, 50, 60, 1, 70] and counts.tolist() == [0, 3, 4, 0, 5]
    assert shard_io.token_shards(tmp_path, "val") == [tmp_path / "fineweb_val_000000.bin"]  # the sidecar is not one
    shard_io.write_shard(side, [0, 3, 4, 0])
    with pytest.raises(ValueError, match="4 entries but .* has 5 tokens"):
        shard_io.read_byte_sidecars(tmp_path)
    shard_io.write_shard(side, [0, 3, 4, 2, 5])
    with pytest.raises(ValueError, match="BOS at position 3 has 2 bytes"):
        shard_io.read_byte_sidecars(tmp_path)
    side.write_bytes(side.read_bytes()[:-2])  # truncated file
    with pytest.raises(ValueError, match="header says 5 tokens"):
        shard_io.read_byte_sidecar(side)
    side.unlink()
    with pytest.raises(ValueError, match="no byte sidecar fineweb_val_bytes_000000.bin"):
        shard_io.read_byte_sidecars(tmp_path)
    with pytest.raises(ValueError, match="not a token shard name"):
        shard_io.sidecar_path(tmp_path / "tokens.bin")


# ----------------------------------------------------------------------------------------------
# downloads
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_source_env(monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)


def test_dry_run_caseops_plan(no_source_env, tmp_path, capsys):
    ccf.main(["--variant", "sp8192_caseops", "--train-shards", "2", "--dry-run", "--local-dir", str(tmp_path)])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "would fetch 5 files from hf://datasets/romeerp/parameter-golf-caseops-v1:"
    ds = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
    names = ["fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin", "fineweb_train_000000.bin",
             "fineweb_train_000001.bin"]
    expected = [(f"datasets/datasets/{ds}/{n}", tmp_path / "datasets" / ds / n) for n in names]
    tok = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    expected.append((f"datasets/tokenizers/{tok}", tmp_path / "tokenizers" / tok))
    assert lines[1:] == [f"  {r} -> {p}" for r, p in expected]
    assert "CASEOPS" not in captured.out and "byte sidecar" in captured.err
    assert not list(tmp_path.iterdir())
    assert ccf.vocab_size("sp8192_caseops") == 8192 and ccf.dataset_name("sp8192_caseops") == ds


def test_dry_run_docs_plan(no_source_env, tmp_path, capsys):
    ccf.main(["--variant", "docs", "--dry-run", "--local-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "would fetch 2 files from hf://datasets/willdepueoai/parameter-golf:",
        f"  datasets/docs_selected.jsonl -> {tmp_path / 'docs_selected.jsonl'}",
        f"  datasets/docs_selected.source_manifest.json -> {tmp_path / 'docs_selected.source_manifest.json'}"]
    assert "build_shards.py" in captured.err and "--caseops" in captured.err and "--val-docs 50000" in captured.err
    # the plain sp8192 path is unchanged
    ccf.main(["--variant", "sp8192", "--train-shards", "1", "--dry-run", "--local-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "hf://datasets/kevclark/parameter-golf:" in out and "fineweb_val_bytes" not in out
    assert "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin" in out
