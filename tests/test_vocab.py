"""Any vocabulary: 4096/8192-piece tokenizers from the shard builder, exact val_bpb byte counts at vocab 8192,
the sp4096/sp8192 download plan, BigramHash ids at large vocabularies.

Everything here runs on the embedded sample (data/sample), with no network and no shared/ folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import build_shards
import cached_challenge_fineweb as ccf
import check_bytes
import train_gpt
from shard_io import read_shard

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample"
SAMPLE_TRAIN, SAMPLE_VAL = SAMPLE / "sample_train.jsonl.zst", SAMPLE / "sample_val.jsonl.zst"

# Text the sample never shows a tokenizer: byte fallback for 2-, 3- and 4-byte characters (accents, CJK incl.
# extension B, emoji with ZWJ and flags, private use), and text that nmt_nfkc rewrites (ligatures, fullwidth,
# circled digits, whitespace runs and newlines, zero-width and combining characters, a literal U+2581).
SYNTH = [
    "Emoji \U0001F600\U0001F389 family \U0001F468\u200D\U0001F469\u200D\U0001F467 flag \U0001F1FA\U0001F1F8 "
    "and CJK \u6f22\u5b57\u304b\u306a \ud55c\uad6d\uc5b4 \U00020000\U0002A6D6, private \ue000\uf8ff",
    "symbols \u222e \u214b \u2135 \u00bd \u00e9\u00e8 na\u00efve caf\u00e9 cafe\u0301 \u0436\u0443\u043a 42 "
    "\ufb01ne \uff12\uff13 \u2460 items   with    gaps\tand a tab\n\nand newlines \u2014 \u201cquoted\u201d",
    "  leading and trailing spaces, a literal \u2581 piece mark, zero\u200bwidth, \ufffd, 1234567890  ",
]


def _stream_bytes(sp, docs_ids: list[list[int]]):
    """train_gpt's byte count per document of the BOS-separated stream of `docs_ids`."""
    luts = train_gpt.build_byte_luts(sp, sp.vocab_size())
    stream = torch.from_numpy(np.concatenate([np.array([train_gpt.BOS_ID] + ids, dtype=np.int64) for ids in docs_ids]))
    nbytes = train_gpt.target_bytes(stream[:-1], stream[1:], luts)
    assert torch.all(nbytes[stream[1:] == train_gpt.BOS_ID] == 0)
    out, pos = [], 0  # nbytes[i] counts the target stream[i + 1]
    for ids in docs_ids:
        out.append(int(nbytes[pos:pos + len(ids)].sum()))
        pos += len(ids) + 1
    return out


@pytest.fixture(scope="module")
def sp8192_build(tmp_path_factory):
    """The sample built with a fresh 8192-piece tokenizer (about 1 s to train, 3 s to encode on 2 cores)."""
    out = tmp_path_factory.mktemp("sample_sp8192")
    meta = build_shards.build([SAMPLE_TRAIN], out, val_input=[SAMPLE_VAL], vocab_size=8192, shard_tokens=1_000_000)
    return out, meta, spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))


# ----------------------------------------------------------------------------------------------
# tokenizer training at 4096 / 8192
# ----------------------------------------------------------------------------------------------


def test_trained_8192_tokenizer_is_exact_and_challenge_style(sp8192_build):
    out, meta, sp = sp8192_build
    assert sp.vocab_size() == meta["vocab_size"] == 8192
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 8192
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    # byte fallback: the 256 byte pieces right after the specials
    assert [i for i in range(8192) if sp.is_byte(i)] == list(range(4, 260))
    assert [sp.id_to_piece(i) for i in (4, 259)] == ["<0x00>", "<0xFF>"]
    assert sp.encode("\U0001F600") == [4 + b for b in "\U0001F600".encode("utf-8")]
    # '▁' is its own piece; no dummy prefix; digits split; nmt_nfkc normalisation
    assert sp.id_to_piece(sp.piece_to_id("\u2581")) == "\u2581"
    assert not sp.id_to_piece(sp.encode("the")[0]).startswith("\u2581")
    assert all(sum(c.isdigit() for c in sp.id_to_piece(i)) <= 1 for i in range(260, 8192))
    assert len(sp.encode("12345")) == 5
    assert sp.decode(sp.encode("\ufb01ne \uff12\uff13")) == "fine 23"
    assert b"nmt_nfkc" in (out / "tokenizer.model").read_bytes()
    # the top of the vocabulary is really used
    val = read_shard(out / "fineweb_val_000000.bin")
    assert int(val.max()) >= 4096


@pytest.mark.parametrize("vocab", [4096, 8192])
def test_train_tokenizer_vocab_is_exact(tmp_path, vocab):
    docs = (t for t in build_shards.iter_documents([SAMPLE_TRAIN]) if t.strip())
    sp = build_shards.train_tokenizer(docs, tmp_path / "tok.model", vocab, max_chars=400_000, threads=1)
    assert sp.vocab_size() == vocab
    assert sum(sp.is_byte(i) for i in range(vocab)) == 256
    # byte counting is exact here too, on real sample text and on the synthetic rare/normalised text
    docs = list(build_shards.iter_documents([SAMPLE_VAL]))[:40] + SYNTH
    ids = [sp.encode(d) for d in docs]
    assert _stream_bytes(sp, ids) == [len(sp.decode(i).encode("utf-8")) for i in ids]


def test_too_little_text_for_the_vocab_is_an_error(tmp_path):
    docs = (t for t in build_shards.iter_documents([SAMPLE_TRAIN]) if t.strip())
    # 20k characters hold fewer than 8192 learnable pieces: never silently a smaller vocabulary
    with pytest.raises(ValueError, match=r"too small for 8192 pieces \(at most \d+ can be learned"):
        build_shards.train_tokenizer(docs, tmp_path / "tok.model", 8192, max_chars=20_000, threads=1)
    assert not (tmp_path / "tok.model").exists()
    for bad in (100, 260, 65537):
        with pytest.raises(ValueError, match="outside"):
            build_shards.train_tokenizer(iter(["some text"]), tmp_path / "tok.model", bad)


def test_lone_surrogate_in_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken \\ud800 escape"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: text is not valid Unicode"):
        list(build_shards.iter_documents([path]))


# ----------------------------------------------------------------------------------------------
# shards and exact byte counts at vocab 8192
# ----------------------------------------------------------------------------------------------


def test_shards_ids_below_vocab(sp8192_build):
    out, meta, sp = sp8192_build
    for split in ("train", "val"):
        paths = [out / n for n in meta[split]["shards"]]
        tokens = np.concatenate([read_shard(p) for p in paths])
        assert tokens.size == meta[split]["tokens"]
        assert int(tokens.max()) < 8192
        assert int((tokens == train_gpt.BOS_ID).sum()) == meta[split]["docs"] and tokens[0] == train_gpt.BOS_ID
        train_gpt.check_token_range(tokens, 8192, split)  # the trainer's own check passes
        with pytest.raises(ValueError, match="VOCAB_SIZE"):
            train_gpt.check_token_range(tokens, 1024, split)
    assert len(meta["train"]["shards"]) == 2  # 1.58M tokens in 1M-token shards


@pytest.mark.parametrize("split", ["train", "val"])
def test_byte_count_8192_equals_direct_utf8_count(sp8192_build, split):
    """Every document of the real sample shards: train_gpt's byte tables == len(decode(ids).encode('utf-8'))."""
    out, meta, sp = sp8192_build
    stream = np.concatenate([read_shard(out / n) for n in meta[split]["shards"]]).astype(np.int64)
    docs = [d.tolist() for d in check_bytes.split_documents(stream)]
    decoded = [sp.decode(ids) for ids in docs]
    direct = [len(t.encode("utf-8")) for t in decoded]
    assert _stream_bytes(sp, docs) == direct
    assert meta[split]["bpb_bytes"] == sum(direct)  # the builder's own (numpy) tables agree

    # the real text exercises byte fallback, for 2-byte characters (both splits) and 3-/4-byte ones (train:
    # CJK, Telugu, emoji), and ASCII characters below the 0.999 character coverage
    byte_ids = np.array([i for i in range(sp.vocab_size()) if sp.is_byte(i)])
    lead = {int(sp.id_to_piece(int(t))[3:5], 16) for t in np.unique(stream[np.isin(stream, byte_ids)])}
    assert any(0xC2 <= b <= 0xDF for b in lead)
    if split == "train":
        assert any(0xE0 <= b <= 0xEF for b in lead) and any(0xF0 <= b <= 0xF4 for b in lead)
    assert any(b < 0x80 for b in lead)

    # normalisation: val_bpb charges the bytes of the normalised text, not the raw input bytes
    raw = [t for t in build_shards.iter_documents([SAMPLE_TRAIN if split == "train" else SAMPLE_VAL]) if t.strip()]
    assert len(raw) == len(docs)
    assert sum(len(t.encode("utf-8")) for t in raw) == meta[split]["text_bytes"]
    changed = [k for k in range(len(docs)) if raw[k] != decoded[k]]
    assert changed and sum(direct) < meta[split]["text_bytes"]  # newlines and whitespace runs collapse
    for k in changed[:100]:  # decode(encode(x)) is a fixed point: the count does not depend on where it is taken
        assert sp.decode(sp.encode(decoded[k])) == decoded[k]
    if split == "train":  # e.g. '™' -> 'TM', 'ſ' -> 's', '𝑥' -> 'x', 'Ⅷ' -> 'VIII' (nmt_nfkc)
        assert any("\u017f" in raw[k] for k in changed)


def test_byte_count_8192_synthetic_rare_and_normalised(sp8192_build):
    _, _, sp = sp8192_build
    ids = [sp.encode(d) for d in SYNTH]
    assert all(sp.unk_id() not in i for i in ids)
    assert sum(sp.is_byte(t) for i in ids for t in i) > 40
    assert _stream_bytes(sp, ids) == [len(sp.decode(i).encode("utf-8")) for i in ids]
    # what normalisation did to these documents, exactly
    norm = [sp.decode(i) for i in ids]
    assert norm[1].count("\n") == 0 and "  " not in norm[1] and "fine 23 1" in norm[1]
    assert not norm[2].startswith(" ") and not norm[2].endswith(" ")
    assert "\u2581" not in norm[2]  # a literal U+2581 decodes as a space (1 byte), like any '▁'


def test_builder_tables_match_train_gpt(sp8192_build):
    _, _, sp = sp8192_build
    base, space, boundary = build_shards.byte_tables(sp)
    tb, ts, tbd = train_gpt.build_byte_luts(sp, 8192)
    assert np.array_equal(base, tb.numpy()) and np.array_equal(space, ts.numpy())
    assert np.array_equal(boundary, tbd.numpy())


def test_check_bytes_script(sp8192_build, capsys):
    out, _, _ = sp8192_build
    assert check_bytes.main([str(out), "--text", str(SAMPLE_VAL)]) == 0
    text = capsys.readouterr().out
    assert "vocab 8192" in text and "0 document(s) differ" in text and text.rstrip().endswith(
        "OK: every count matches the direct one")


# ----------------------------------------------------------------------------------------------
# cached_challenge_fineweb.py: the records' sp4096 / sp8192 downloads
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_source_env(monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    monkeypatch.delenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", raising=False)


@pytest.mark.parametrize("variant,repo,vocab", [
    ("sp8192", "kevclark/parameter-golf", 8192),
    ("sp4096", "kevclark/parameter-golf", 4096),
    ("sp1024", "willdepueoai/parameter-golf", 1024),
])
def test_dry_run_plans_the_records_files(no_source_env, tmp_path, capsys, variant, repo, vocab):
    ccf.main(["--variant", variant, "--train-shards", "2", "--dry-run", "--local-dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"would fetch 5 files from hf://datasets/{repo}:"
    ds = f"fineweb10B_{variant}"
    expected = [(f"datasets/datasets/{ds}/fineweb_val_000000.bin", tmp_path / "datasets" / ds / "fineweb_val_000000.bin")]
    expected += [(f"datasets/datasets/{ds}/fineweb_train_{i:06d}.bin",
                  tmp_path / "datasets" / ds / f"fineweb_train_{i:06d}.bin") for i in range(2)]
    expected += [(f"datasets/tokenizers/fineweb_{vocab}_bpe.{ext}", tmp_path / "tokenizers" / f"fineweb_{vocab}_bpe.{ext}")
                 for ext in ("model", "vocab")]
    assert lines[1:] == [f"  {r} -> {p}" for r, p in expected]
    assert not list(tmp_path.iterdir())  # a dry run touches nothing
    assert ccf.vocab_size(variant) == vocab and ccf.default_repo(variant) == repo


def test_dry_run_source_overrides(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/mirror")
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "")
    ccf.main(["--variant", "sp8192", "--train-shards", "0", "--dry-run", "--local-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "hf://datasets/someone/mirror:" in out and "\n  datasets/fineweb10B_sp8192/fineweb_val_000000.bin" in out
    ccf.main(["--variant", "sp8192", "--train-shards", "0", "--dry-run", "--repo-id", "other/repo",
              "--remote-root", "exports", "--local-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "hf://datasets/other/repo:" in out and "exports/tokenizers/fineweb_8192_bpe.model" in out


def test_manifest_cache_is_per_repo(monkeypatch, tmp_path):
    assert ccf.manifest_name("willdepueoai/parameter-golf") == "manifest.json"
    assert ccf.manifest_name("kevclark/parameter-golf") == "manifest.kevclark--parameter-golf.json"
    calls = []

    def fake_fetch(repo_id, remote, dest):  # what each repo's manifest lists
        calls.append((repo_id, remote))
        names = ["fineweb10B_sp4096", "fineweb10B_sp8192"] if repo_id.startswith("kevclark") else ["fineweb10B_sp1024"]
        dest.write_text(json.dumps({"datasets": [{"name": n, "stats": {"files_val": 1, "files_train": 128}}
                                                 for n in names]}))

    monkeypatch.setattr(ccf, "fetch", fake_fetch)
    # an sp1024 manifest already cached as data/manifest.json does not hide the sp8192 repo's manifest
    assert ccf.read_manifest("willdepueoai/parameter-golf", "datasets", tmp_path, "sp1024")["files_train"] == 128
    assert ccf.read_manifest("kevclark/parameter-golf", "datasets", tmp_path, "sp8192")["files_val"] == 1
    assert calls == [("willdepueoai/parameter-golf", "datasets/manifest.json"),
                     ("kevclark/parameter-golf", "datasets/manifest.json")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "manifest.kevclark--parameter-golf.json"]
    # a cached manifest without the variant is fetched once more
    (tmp_path / "manifest.kevclark--parameter-golf.json").write_text('{"datasets": []}')
    assert ccf.read_manifest("kevclark/parameter-golf", "datasets", tmp_path, "sp4096") is not None
    assert len(calls) == 3


@pytest.mark.parametrize("variant", ["sp2048", "sp8193", "fineweb10B_sp8192", "SP8192", ""])
def test_unknown_variant_errors(no_source_env, capsys, variant):
    with pytest.raises(SystemExit) as e:
        ccf.main(["--variant", variant, "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"unknown variant {variant!r}; known variants: sp1024, byte260, sp4096, sp8192" in err
    with pytest.raises(ValueError, match="known variants"):
        ccf.plan(variant, 1, 1, "datasets", Path("/tmp"))


# ----------------------------------------------------------------------------------------------
# BigramHash at vocab 8192
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buckets", [10_240, 4096])
def test_bigram_bucket_ids_vocab_8192(buckets):
    gen = torch.Generator().manual_seed(0)
    prevs = torch.cat((torch.tensor([0, 1, 2, 8190, 8191]), torch.randint(0, 8192, (27,), generator=gen)))
    cur = torch.arange(8192)
    ids = torch.stack((prevs.repeat_interleave(8192), cur.repeat(len(prevs))), dim=1)  # every (prev, cur) pair
    h = train_gpt.bigram_bucket_ids(ids, buckets)
    assert h.dtype == torch.int64 and torch.all(h[:, 0] == buckets - 1)  # no previous token
    pair = h[:, 1]
    is_bos = ids[:, 1] == train_gpt.BOS_ID
    assert torch.all(pair[is_bos] == buckets - 1)
    assert torch.all((pair[~is_bos] >= 0) & (pair[~is_bos] < buckets - 1))
    # no pathology: the pairs spread over (almost) all buckets, each fixed previous token over many of them
    load = torch.bincount(pair[~is_bos], minlength=buckets)[: buckets - 1].double()
    assert (load > 0).float().mean() > 0.99 and load.max() < 3 * load.mean()
    per_prev = [len(torch.unique(row)) for row in pair.view(len(prevs), 8192)]
    assert min(per_prev) > 0.35 * min(buckets - 1, 8192)
