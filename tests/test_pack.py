"""bench/pack_code.py: the packed (self-extracting) train_gpt.py a record submits.

The packed file's inner source is the readable train_gpt.py byte for byte (each codec), it runs as the readable file
does (module namespace, __file__, pickling, tracebacks), an EVAL_ONLY run of it reproduces the readable file's scores
in one process and in two (torchrun, gloo) while logging the packed size as bytes_code and the inner source's
sha256 as code_sha256, and make_submission.py / check_record.py build and check a record folder holding it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import linecache
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import check_record as cr  # noqa: E402
import make_submission as ms  # noqa: E402
import pack_code as pc  # noqa: E402
from run_bench import parse_log  # noqa: E402
from test_foundation import subprocess_env  # noqa: E402

SCRIPT = ROOT / "train_gpt.py"
SOURCE = SCRIPT.read_bytes()
FINAL_LINES = re.compile(r"^final(?:_\w+)? val_loss:.*?val_bpb:\S+(?: tokens:\d+ bytes:\d+| source:\w+)", re.M)


# ----------------------------------------------------------------------------------------------
# the format
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", pc.CODECS)
def test_inner_source_is_the_readable_file_byte_for_byte(codec):
    packed = pc.pack(SOURCE, codec)
    assert pc.is_packed(packed) and not pc.is_packed(SOURCE)
    info = pc.parse_packed(packed)
    assert info["source"] == SOURCE and info["codec"] == codec
    assert info["sha256"] == hashlib.sha256(SOURCE).hexdigest() and info["source_bytes"] == len(SOURCE)
    assert len(packed) < 0.45 * len(SOURCE)  # measured: 0.37 (bz2, lzma) to 0.41 (zlib)
    packed.decode("ascii")  # plain ASCII: its UTF-8 bytes are its bytes
    compile(packed, "train_gpt.py", "exec", dont_inherit=True)


def test_auto_codec_is_the_smallest():
    assert len(pc.pack(SOURCE)) == min(len(pc.pack(SOURCE, c)) for c in pc.CODECS)


def test_malformed_packed_files_are_refused():
    packed = pc.pack(SOURCE, "lzma")
    sha = hashlib.sha256(SOURCE).hexdigest()
    with pytest.raises(pc.PackError, match="does not match the header"):
        pc.parse_packed(packed.replace(sha.encode(), b"0" * 64))
    with pytest.raises(pc.PackError, match="not a well-formed"):
        pc.parse_packed(packed + b"print('extra code')\n")  # nothing may run besides the template
    with pytest.raises(pc.PackError, match="not a well-formed"):
        pc.parse_packed(packed.replace(b"import base64,linecache,lzma", b"import base64,linecache,lzma,os"))
    with pytest.raises(pc.PackError, match="does not compile"):
        pc.pack(b"def broken(:\n")


def test_minify_keeps_the_program():
    small = pc.minify(SOURCE)
    assert len(small) < 0.9 * len(SOURCE)
    compile(small, "train_gpt.py", "exec", dont_inherit=True)
    assert b'"""' not in small.split(b"\n", 1)[0]  # the module docstring is gone
    toy = b'"""doc"""\nfrom __future__ import annotations\n# c\ndef f(x):\n    """only a docstring"""\n'
    assert pc.minify(toy) == b"from __future__ import annotations\n\ndef f(x):\n    pass\n"
    assert pc.unpack(pc.pack(small)) == small


def test_size_table_rows():
    rows = pc.size_rows(SOURCE)
    assert [(r["form"], r["codec"]) for r in rows] == [(f, c) for f in ("readable", "minified")
                                                       for c in ("none", *pc.CODECS)]
    assert rows[0]["packed_bytes"] == len(SOURCE)
    for r in rows:
        if r["compressed_bytes"] is not None:  # base85 (5 chars per 4 bytes) plus the wrapper's ~420 bytes
            assert 0 < r["packed_bytes"] - r["compressed_bytes"] * 5 / 4 < 600, r


def test_packed_module_runs_like_the_readable_file(tmp_path):
    """Imported under a module name: its namespace holds train_gpt's names, __file__ is the packed file (so
    code_bytes() counts it), classes pickle, and linecache / inspect show the readable source."""
    path = tmp_path / "train_gpt.py"
    path.write_bytes(pc.pack(SOURCE, "bz2"))
    spec = importlib.util.spec_from_file_location("packed_train_gpt", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        assert mod._PACKED_SOURCE == SOURCE and mod.__file__ == str(path)
        assert mod.code_bytes() == path.stat().st_size
        h = mod.Hyperparameters.from_env({})
        assert pickle.loads(pickle.dumps(h)) == h and type(h).__module__ == "packed_train_gpt"
        assert inspect.getsource(mod.code_bytes).startswith("def code_bytes() -> int:")
        lines = SOURCE.decode().splitlines(True)
        line = mod.code_bytes.__code__.co_firstlineno
        assert linecache.getline(str(path), line) == lines[line - 1]
    finally:
        del sys.modules[spec.name]


# ----------------------------------------------------------------------------------------------
# runs of the packed file
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(sample_data, tmp_path_factory):
    """A short training run of the readable file (its in-run scores are the artifact's), then EVAL_ONLY of its
    artifact from the packed file in one process and in two, and from a minified packed file."""
    work = tmp_path_factory.mktemp("pack_runs")
    packed = work / "packed" / "train_gpt.py"
    packed.parent.mkdir()
    packed.write_bytes(pc.pack(SOURCE))
    minified = work / "minified" / "train_gpt.py"
    minified.parent.mkdir()
    minified.write_bytes(pc.pack(pc.minify(SOURCE)))
    out = {"work": work, "packed": packed}
    cmds = {"train": ([sys.executable, str(SCRIPT)], {"ITERATIONS": "3"}),
            "eval1": ([sys.executable, str(packed)], {"EVAL_ONLY": "1"}),
            "eval_min": ([sys.executable, str(minified)], {"EVAL_ONLY": "1"}),
            "eval2": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(packed)], {"EVAL_ONLY": "1"})}
    for name, (cmd, extra) in cmds.items():
        env = subprocess_env(sample_data, work, RUN_ID=name, **extra)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        proc = subprocess.run(cmd, env=env, cwd=str(work), capture_output=True, text=True, timeout=420)
        log = work / "logs" / f"{name}.txt"
        out[name] = {"rc": proc.returncode, "err": proc.stderr[-4000:], "path": log,
                     "log": log.read_text() if log.is_file() else ""}
    return out


def _ok(run) -> str:
    assert run["rc"] == 0, run["err"]
    return run["log"]


def _finals(log: str) -> list[str]:
    lines = [re.sub(r" eval_time:\S+", "", m.group(0)) for m in FINAL_LINES.finditer(log)]
    assert len(lines) == 4, log[-2000:]  # roundtrip, sliding, ttt and the final line
    return lines


def test_packed_eval_only_reproduces_the_readable_scores(runs):
    readable, packed = _ok(runs["train"]), _ok(runs["eval1"])
    assert _finals(packed) == _finals(readable)  # every printed digit


def test_minified_packed_eval_only_reproduces_the_readable_scores(runs):
    """--minify is a separate option: the minified source runs to the same scores, under its own hash."""
    readable, minified = _ok(runs["train"]), _ok(runs["eval_min"])
    assert _finals(minified) == _finals(readable)
    prov = parse_log(minified)["provenance"]
    assert prov["code_sha256"] == hashlib.sha256(pc.minify(SOURCE)).hexdigest() != hashlib.sha256(SOURCE).hexdigest()


def test_packed_run_logs_its_bytes_and_the_inner_hash(runs):
    readable, packed = parse_log(_ok(runs["train"])), parse_log(_ok(runs["eval1"]))
    size = runs["packed"].stat().st_size
    sha = hashlib.sha256(SOURCE).hexdigest()
    assert readable["provenance"]["code_sha256"] == packed["provenance"]["code_sha256"] == sha
    assert packed["provenance"]["packed_bytes"] == size and packed["provenance"]["source_bytes"] == len(SOURCE)
    assert "packed_bytes" not in readable["provenance"]
    assert packed["bytes_code"] == size and readable["bytes_code"] == len(SOURCE)
    assert packed["bytes_total"] == packed["bytes_model"] + size == readable["bytes_total"] - len(SOURCE) + size


def test_packed_file_under_torchrun_two_ranks(runs):
    one, two = _finals(_ok(runs["eval1"])), _finals(_ok(runs["eval2"]))
    assert "world:2 packed_bytes:" in runs["eval2"]["log"]
    for a, b in zip(one, two):  # the same tokens and bytes; TTT's all-reduced gradients may move the 8th decimal
        head_a, head_b = a.split(" val_loss:")[0], b.split(" val_loss:")[0]
        nums_a, nums_b = re.findall(r":([0-9.]+)", a), re.findall(r":([0-9.]+)", b)
        assert head_a == head_b and len(nums_a) == len(nums_b), (a, b)
        assert all(abs(float(x) - float(y)) <= 1e-6 * float(x) for x, y in zip(nums_a, nums_b)), (a, b)


def _sub_args(logs, folder, *extra):
    return [*map(str, logs), "--name", "packed", "--author", "tester", "--github-id", "tester", "--hardware", "cpu",
            "--data", "sample", "--blurb", "b", "--record-dir", str(folder), *extra]


def test_record_folder_with_the_packed_file(runs, tmp_path, capsys):
    _ok(runs["eval1"])
    folder = tmp_path / "rec"
    assert ms.main(_sub_args([runs["eval1"]["path"]], folder)) == 0
    assert "train_gpt.py = train_gpt.py packed (bz2, readable)" in capsys.readouterr().err
    assert (folder / "train_gpt.py").read_bytes() == runs["packed"].read_bytes()
    assert {p.name for p in folder.iterdir()} == {"train_gpt.py", "eval1.txt", "submission.json", "README.md"}
    readme = (folder / "README.md").read_text()
    assert f"| {len(SOURCE):,} |" in readme and f"| {runs['packed'].stat().st_size:,} |" in readme
    results = cr.run_checks(str(folder))
    assert cr.failures(results) == []
    for check in ("code_sha256", "bytes_code", "bytes_total", "compile"):
        assert [r.status for r in results if r.check == check] == ["PASS"], check
    assert "is packed" in next(r.message for r in results if r.check == "compile")
    assert "inner source" in next(r.message for r in results if r.check == "code_sha256")


def test_record_folder_refuses_logs_of_another_file(runs, tmp_path, capsys):
    """The readable file's log with the packed file: make_submission refuses; check_record fails bytes_code."""
    _ok(runs["train"])
    assert ms.main(_sub_args([runs["train"]["path"]], tmp_path / "rec", "--code", str(runs["packed"]))) == 1
    assert "no code matches the logs" in capsys.readouterr().err
    folder = tmp_path / "rec2"  # the readable log picks the readable file; then swap in the packed one
    assert ms.main(_sub_args([runs["train"]["path"]], folder)) == 0
    assert (folder / "train_gpt.py").read_bytes() == SOURCE
    (folder / "train_gpt.py").write_bytes(runs["packed"].read_bytes())
    fails = cr.failures(cr.run_checks(str(folder)))
    assert {f.check for f in fails} == {"bytes_code", "bytes_total"}
    assert "the log's run was not: run the packed file" in next(f.message for f in fails if f.check == "bytes_code")
