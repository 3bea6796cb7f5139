"""bench/check_record.py, bench/make_submission.py, bench/plot_logs.py and the new log lines of run_bench.parse_log,
on record folders built in tmp_path from fake logs in train_gpt.py's format (no training, no torch)."""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import check_record as cr  # noqa: E402
import make_submission as ms  # noqa: E402
import plot_logs as pl  # noqa: E402
import run_bench as rb  # noqa: E402
import significance as sg  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
FAKE_CODE = "# fake train_gpt.py for the record-tool tests: ünïcödé makes bytes != characters\nprint('hello')\n"
CODE_BYTES = len(FAKE_CODE.encode("utf-8"))
CODE_SHA = hashlib.sha256(FAKE_CODE.encode("utf-8")).hexdigest()
SEEDS = (1337, 42, 2025)
BPBS = (1.1000, 1.1010, 1.0990)
RATIO = 1.688  # val_loss / val_bpb = ln2 * bytes per token
BASE_HP = {"seed": 1337, "run_id": "r", "log_dir": "/tmp/logs", "artifact_path": "/tmp/final_model.ptz",
           "data_path": "/data/fineweb10B_sp1024", "matrix_lr": 0.025, "max_artifact_bytes": 16000000,
           "max_wallclock_seconds": 600.0, "ttt": True, "ttt_mode": "chunked", "val_max_tokens": 0,
           "num_layers": 11, "model_dim": 512}


def fake_log(seed=1337, bpb=1.1, *, sha=CODE_SHA, gpu=H100, world=8, training=588.9, calib=3.2, eval_total=431.5,
             val_max_tokens=0, val_tokens=62021632, bytes_model=1_000_000, bytes_code=CODE_BYTES, bytes_total=None,
             hp=None, provenance=True, finished=True, drop_hp=()) -> str:
    """A log in train_gpt.py's format after the rewrite (provenance / data / clock_train / clock_eval lines)."""
    hparams = {**BASE_HP, "seed": seed, "run_id": f"seed{seed}", "log_dir": f"/runs/{seed}",
               "artifact_path": f"/runs/{seed}/final_model.ptz", "val_max_tokens": val_max_tokens, **(hp or {})}
    for k in drop_hp:
        hparams.pop(k, None)
    loss = round(bpb * RATIO, 8)
    total = bytes_model + bytes_code if bytes_total is None else bytes_total
    gpus = world if gpu != "none" else 0
    lines = [f"run_id:seed{seed} torch:2.13.0 device:cuda:0 world:{world} grad_accum:{8 // world} gpu:{gpu}"]
    if provenance:
        lines.append(f"provenance code_sha256:{sha} torch:2.13.0 cuda:{'12.8' if gpus else 'none'} gpu:{gpu} "
                     f"gpus:{gpus} world:{world}")
    lines += [
        "hyperparameters " + json.dumps(hparams, sort_keys=True),
        f"data train_shards:80 val_shards:1 val_tokens:{val_tokens} val_max_tokens:{val_max_tokens}",
        f"val_tokens:{val_tokens}",
        "step:1/20000 train_loss:6.9312 lr_mul:1.0000 train_time:0.1s step_avg:95.00ms",
        "step:500/20000 train_loss:3.1000 lr_mul:1.0000 train_time:43.0s step_avg:86.00ms",
        "step:1000 val_loss:2.500000 val_bpb:1.480000 train_time:87.0s step_avg:87.00ms",
        "step:6800/20000 train_loss:2.1234 lr_mul:0.0100 train_time:588.0s step_avg:86.47ms",
        f"step:6800 val_loss:1.950000 val_bpb:{bpb + 0.03:.6f} train_time:588.0s step_avg:86.47ms",
        "training stopped step:6800 train_time:588.0s tokens:5347737600 tokens_per_s:9094792",
        f"pre_quant val_loss:1.94000000 val_bpb:{bpb + 0.02:.8f}",
        f"clock_train: training {training}s + calibration {calib}s = {training + calib:.1f}s limit:600s",
    ]
    if finished:
        lines += [
            f"bytes_model:{bytes_model} bytes_code:{bytes_code} bytes_total:{total} limit:16000000",
            f"final_roundtrip val_loss:1.952 val_bpb:{bpb + 0.025:.8f} tokens:{val_tokens} bytes:151000000 "
            "eval_time:3.1s",
            f"final_sliding val_loss:1.915 val_bpb:{bpb + 0.004:.8f} tokens:{val_tokens} bytes:151000000 "
            "eval_time:80.2s",
            f"final_ttt val_loss:{loss:.8f} val_bpb:{bpb:.8f} tokens:{val_tokens} bytes:151000000 eval_time:348.2s",
            f"eval_total_time:{eval_total}s world:{world} (limit 600s)",
            f"clock_eval: total {eval_total}s limit:600s world:{world}"
            + (f" est_8gpu:{eval_total * world / 8:.1f}s (estimate)" if world < 8 else ""),
            f"final val_loss:{loss:.8f} val_bpb:{bpb:.8f} source:ttt",
            f"bytes_model:{bytes_model}", f"bytes_code:{bytes_code}", f"bytes_total:{total}",
        ]
    return "\n".join(lines) + "\n"


def _logged(text: str):
    p = rb.parse_log(text)
    return p.get("final_bpb"), p.get("final_loss"), p.get("bytes_total"), (p.get("hparams") or {}).get("seed")


def build_record(folder: Path, seeds=SEEDS, bpbs=BPBS, *, log_kw=None, artifact_bytes="first", sub=None,
                 write_sub=True) -> Path:
    """A record folder that passes every check; log_kw = {index: fake_log overrides} makes one log differ."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text("# fake record\n")
    (folder / "train_gpt.py").write_text(FAKE_CODE, encoding="utf-8")
    (folder / "requirements.txt").write_text("torch\n")  # a .txt that is not a log
    facts = []
    for i, (seed, bpb) in enumerate(zip(seeds, bpbs)):
        kw = {"bytes_model": 1_000_000 + 1000 * i, **((log_kw or {}).get(i, {}))}
        if i == 0:
            first_model = kw["bytes_model"]  # the artifact in the folder is the first seed's
        text = fake_log(seed, bpb, **kw)
        name = f"train_seed{seed}.log" if seeds.count(seed) == 1 else f"train_seed{seed}_{i}.log"
        (folder / name).write_text(text)
        facts.append(_logged(text))
    if artifact_bytes == "first":
        artifact_bytes = first_model
    if artifact_bytes is not None:
        with open(folder / "final_model.ptz", "wb") as f:
            f.truncate(artifact_bytes)  # sparse: only its size matters
    if write_sub:
        scored = [f for f in facts if f[0] is not None]
        submission = {
            "name": "fake record", "author": "tester", "github_id": "tester", "date": "2026-12-01",
            "blurb": "a fake record for the tests", "track": "10min_16mb",
            "val_bpb": sum(f[0] for f in scored) / len(scored), "val_loss": sum(f[1] for f in scored) / len(scored),
            "bytes_total": max(f[2] for f in facts if f[2] is not None), "seeds": sorted(f[3] for f in facts),
            **(sub or {})}
        (folder / "submission.json").write_text(json.dumps(submission, indent=2))
    return folder


def by_status(results, status, check=None):
    return [r for r in results if r.status == status and (check is None or r.check == check)]


def only_failure(results, check, text):
    """Exactly the failures of one check, every one naming the problem."""
    fails = cr.failures(results)
    assert fails, "expected a FAIL"
    assert {f.check for f in fails} == {check}, [f.line() for f in fails]
    for f in fails:
        assert text in f.message, f.line()
    return fails


# ----------------------------------------------------------------------------------------------
# parse_log: the new lines
# ----------------------------------------------------------------------------------------------


def test_parse_new_log_lines():
    p = rb.parse_log(fake_log(42, 1.1, world=8))
    assert p["provenance"] == {"code_sha256": CODE_SHA, "torch": "2.13.0", "cuda": "12.8", "gpu": H100, "gpus": 8,
                               "world": 8}
    assert p["data"] == {"train_shards": 80, "val_shards": 1, "val_tokens": 62021632, "val_max_tokens": 0}
    assert p["clock_train"] == {"training": 588.9, "calibration": 3.2, "total": 592.1, "limit": 600}
    assert p["clock_eval"] == {"total": 431.5, "limit": 600, "world": 8, "est_8gpu": None}
    assert p["final_loss"] == round(1.1 * RATIO, 8) and p["final_bpb"] == 1.1
    assert p["val_points"][0] == {"step": 1000, "val_loss": 2.5, "val_bpb": 1.48, "train_time": 87.0}
    assert [t["train_time"] for t in p["train_points"]] == [0.1, 43.0, 588.0]
    cpu = rb.parse_log(fake_log(1, 2.0, gpu="none", world=1, eval_total=114.5))
    assert cpu["provenance"]["gpu"] is None and cpu["provenance"]["cuda"] is None and cpu["provenance"]["gpus"] == 0
    assert cpu["clock_eval"] == {"total": 114.5, "limit": 600, "world": 1, "est_8gpu": 14.3}
    s = rb.summarize(rb.parse_log(fake_log(42, 1.1)))
    assert (s["seed"], s["code_sha256"], s["val_max_tokens"], s["train_clock_seconds"], s["eval_clock_seconds"]) == \
        (42, CODE_SHA, 0, 592.1, 431.5)
    # the provenance line alone gives gpu and world when the run_id line is missing
    bare = rb.parse_log("\n".join(l for l in fake_log().splitlines() if not l.startswith("run_id:")))
    assert bare["gpu"] == H100 and bare["world"] == 8


# ----------------------------------------------------------------------------------------------
# significance.py: one-sided helpers
# ----------------------------------------------------------------------------------------------


def test_one_sided_t():
    assert sg.t_one_sided_p(2.0, 10) == pytest.approx(0.07338803477074037 / 2, rel=1e-9)
    assert sg.t_one_sided_p(-2.0, 10) == pytest.approx(1 - 0.07338803477074037 / 2, rel=1e-9)
    for t in (0.3, 1.8, 4.0):  # df = 2 has a closed form: P(T > t) = 1/2 - t / (2 sqrt(t^2 + 2))
        assert sg.t_one_sided_p(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), rel=1e-9)
    t, df, p = sg.one_sample_greater([1.0, 2.0, 3.0, 4.0], 1.0)
    assert t == pytest.approx(1.5 / (statistics.stdev([1, 2, 3, 4]) / 2)) and df == 3
    assert p == pytest.approx(sg.t_two_sided_p(t, 3) / 2)
    assert sg.one_sample_greater([0.25, 0.25, 0.25], 0.005) == (math.inf, 2.0, 0.0)
    assert sg.one_sample_greater([0.001, 0.001], 0.005)[2] == 1.0
    with pytest.raises(ValueError):
        sg.one_sample_greater([1.0])


# ----------------------------------------------------------------------------------------------
# check_record.py
# ----------------------------------------------------------------------------------------------


def test_good_record_passes_everything(tmp_path, capsys):
    folder = build_record(tmp_path / "rec")
    results = cr.run_checks(str(folder), prior_bpb=1.12)
    assert cr.failures(results) == []
    assert by_status(results, "NOTE") == []
    logs = [r.log for r in results if r.check == "finished"]
    assert sorted(logs) == sorted(f"train_seed{s}.log" for s in SEEDS)  # requirements.txt is not a log
    for check in ("hardware", "train_time", "eval_time", "full_val", "ttt", "code_sha256", "bytes_total",
                  "bytes_code"):
        assert len(by_status(results, "PASS", check)) == 3, check
    assert by_status(results, "PASS", "artifact")[0].message.startswith(f"bytes_total {1_000_000 + CODE_BYTES:,}")
    assert "62,021,632 tokens" in by_status(results, "PASS", "full_val")[0].message
    assert cr.main([str(folder), "--prior-bpb", "1.12"]) == 0
    out = capsys.readouterr().out
    assert not any(line.startswith("FAIL") for line in out.splitlines()) and "0 FAIL" in out and "-> ready" in out and "improvement" in out


def test_missing_files(tmp_path):
    folder = build_record(tmp_path / "rec")
    (folder / "README.md").unlink()
    only_failure(cr.run_checks(str(folder)), "files", "missing required file(s): README.md")
    folder = build_record(tmp_path / "rec2")
    for log in folder.glob("*.log"):
        log.unlink()
    fails = cr.failures(cr.run_checks(str(folder)))
    assert any(f.check == "files" and "no training log" in f.message for f in fails)
    folder = build_record(tmp_path / "rec3", write_sub=False)
    fails = cr.failures(cr.run_checks(str(folder)))
    assert [(f.check, f.message) for f in fails] == [("files", "missing required file(s): submission.json"),
                                                     ("submission", "submission.json missing")]
    assert cr.run_checks(str(tmp_path / "nowhere"))[0].status == "FAIL"


def test_code_sha_mismatch_and_missing_provenance(tmp_path):
    folder = build_record(tmp_path / "rec", log_kw={1: {"sha": "0" * 64}})
    fails = only_failure(cr.run_checks(str(folder)), "code_sha256", "code_sha256 mismatch")
    assert [f.log for f in fails] == [f"train_seed{SEEDS[1]}.log"] and CODE_SHA in fails[0].message
    folder = build_record(tmp_path / "rec2", log_kw={2: {"provenance": False}})
    fails = cr.failures(cr.run_checks(str(folder)))
    assert [(f.check, f.message) for f in fails if f.check == "code_sha256"] == \
        [("code_sha256", "log has no provenance line")]
    # editing train_gpt.py after the runs breaks the hash of every log (and the code bytes)
    folder = build_record(tmp_path / "rec3")
    (folder / "train_gpt.py").write_text(FAKE_CODE + "x = 1\n", encoding="utf-8")
    fails = cr.failures(cr.run_checks(str(folder)))
    assert len([f for f in fails if f.check == "code_sha256"]) == 3
    assert any(f.check == "bytes_code" and "bytes_code mismatch" in f.message for f in fails)


def test_compile_failure(tmp_path):
    folder = build_record(tmp_path / "rec")
    (folder / "train_gpt.py").write_text("def broken(:\n")
    fails = cr.failures(cr.run_checks(str(folder)))
    assert any(f.check == "compile" and "does not compile" in f.message for f in fails)


def test_bytes_total_mismatch(tmp_path):
    folder = build_record(tmp_path / "rec", log_kw={1: {"bytes_model": 1_001_000, "bytes_total": 1_001_000 + CODE_BYTES + 7}})
    fails = only_failure(cr.run_checks(str(folder)), "bytes_total", "bytes_total mismatch")
    assert fails[0].log == f"train_seed{SEEDS[1]}.log" and f"{1_001_000 + CODE_BYTES + 7:,}" in fails[0].message
    # an artifact whose size matches no log
    folder = build_record(tmp_path / "rec2", artifact_bytes=1_000_005)
    fails = only_failure(cr.run_checks(str(folder)), "artifact", "bytes_total mismatch")
    assert f"{1_000_005 + CODE_BYTES:,}" in fails[0].message
    # --artifact pointing elsewhere: the folder's own file is not used
    other = tmp_path / "elsewhere.ptz"
    other.write_bytes(b"\0" * 10)
    only_failure(cr.run_checks(str(build_record(tmp_path / "rec3")), artifact=str(other)), "artifact",
                 "bytes_total mismatch")
    only_failure(cr.run_checks(str(build_record(tmp_path / "rec4")), artifact=str(tmp_path / "none.ptz")),
                 "artifact", "not found")
    # no artifact at all: a NOTE, the logs' figures stand
    results = cr.run_checks(str(build_record(tmp_path / "rec5", artifact_bytes=None)))
    assert cr.failures(results) == [] and by_status(results, "NOTE", "artifact")


def test_bytes_total_over_limit(tmp_path):
    model = 16_000_000 - CODE_BYTES + 1
    kw = {i: {"bytes_model": model} for i in range(3)}
    folder = build_record(tmp_path / "rec", log_kw=kw, artifact_bytes=model)
    fails = cr.failures(cr.run_checks(str(folder)))
    assert {f.check for f in fails} == {"bytes_total", "artifact"}
    assert all("16,000,001" in f.message and "over the limit 16,000,000" in f.message for f in fails)


def test_training_over_600s_counts_calibration(tmp_path):
    folder = build_record(tmp_path / "rec", log_kw={0: {"training": 598.0, "calib": 3.5}})
    fails = only_failure(cr.run_checks(str(folder)), "train_time", "training over 600s")
    assert "calibration 3.5s = 601.5s" in fails[0].message and fails[0].log == f"train_seed{SEEDS[0]}.log"


def test_eval_over_600s(tmp_path):
    folder = build_record(tmp_path / "rec", log_kw={2: {"eval_total": 600.4}})
    fails = only_failure(cr.run_checks(str(folder)), "eval_time", "evaluation over 600s")
    assert "600.4s" in fails[0].message


def test_partial_validation(tmp_path):
    folder = build_record(tmp_path / "rec", log_kw={1: {"val_max_tokens": 131072, "val_tokens": 131072}})
    fails = only_failure(cr.run_checks(str(folder)), "full_val", "partial validation")
    assert "val_max_tokens:131072" in fails[0].message and "131,072 tokens" in fails[0].message


@pytest.mark.parametrize("mode", ["adaptive", "full_eval_train", ""])
def test_illegal_ttt_mode(tmp_path, mode):
    folder = build_record(tmp_path / "rec", log_kw={0: {"hp": {"ttt_mode": mode}}})
    fails = only_failure(cr.run_checks(str(folder)), "ttt", "illegal/unknown TTT mode")
    assert repr(mode) in fails[0].message


def test_ttt_modes_that_pass(tmp_path):
    kw = {0: {"hp": {"ttt_mode": "lora"}}, 1: {"drop_hp": ("ttt_mode",)}, 2: {"hp": {"ttt": False, "ttt_mode": "x"}}}
    results = cr.run_checks(str(build_record(tmp_path / "rec", log_kw=kw)))
    assert cr.failures(results) == []
    msgs = {r.log: r.message for r in by_status(results, "PASS", "ttt")}
    assert msgs == {f"train_seed{SEEDS[0]}.log": "ttt on, ttt_mode lora",
                    f"train_seed{SEEDS[1]}.log": "ttt on, ttt_mode chunked (ttt_mode absent: chunked)",
                    f"train_seed{SEEDS[2]}.log": "ttt off"}


def test_unfinished_log(tmp_path):
    folder = build_record(tmp_path / "rec", log_kw={1: {"finished": False}})
    fails = cr.failures(cr.run_checks(str(folder)))
    assert any(f.check == "finished" and "did not finish" in f.message for f in fails)


def test_submission_field_missing(tmp_path):
    folder = build_record(tmp_path / "rec")
    sub = json.loads((folder / "submission.json").read_text())
    del sub["blurb"]
    sub["github_id"] = ""
    (folder / "submission.json").write_text(json.dumps(sub))
    only_failure(cr.run_checks(str(folder)), "submission", "field(s) missing or empty: github_id, blurb")
    (folder / "submission.json").write_text("{not json")
    only_failure(cr.run_checks(str(folder)), "submission", "not valid JSON")


def test_submission_mean_mismatch(tmp_path):
    mean = sum(BPBS) / 3
    folder = build_record(tmp_path / "rec", sub={"val_bpb": BPBS[1]})  # one seed's score, not the mean
    fails = only_failure(cr.run_checks(str(folder)), "submission", "mean mismatch")
    assert "val_bpb" in fails[0].message and f"{mean:.10f}" in fails[0].message
    # rounding to the logs' 8 decimals is within tolerance; 1e-8 off is not
    folder = build_record(tmp_path / "rec2", sub={"val_bpb": round(mean, 8)})
    assert cr.failures(cr.run_checks(str(folder))) == []
    folder = build_record(tmp_path / "rec3", sub={"val_loss": sum(round(b * RATIO, 8) for b in BPBS) / 3 + 1e-8})
    only_failure(cr.run_checks(str(folder)), "submission", "val_loss")


def test_submission_bytes_and_seeds_mismatch(tmp_path):
    folder = build_record(tmp_path / "rec", sub={"bytes_total": 1_000_000 + CODE_BYTES})  # seed 0's, not the max
    only_failure(cr.run_checks(str(folder)), "submission", f"max over the logs {1_002_000 + CODE_BYTES:,}")
    folder = build_record(tmp_path / "rec2", sub={"seeds": [1337, 42, 2025]})  # unsorted
    only_failure(cr.run_checks(str(folder)), "submission", "the logs' seeds [42, 1337, 2025]")
    folder = build_record(tmp_path / "rec3", seeds=(7, 7, 8))
    fails = only_failure(cr.run_checks(str(folder)), "submission", "seed")
    assert any("duplicate seed(s) among the logs: [7]" in f.message for f in fails)


def _gains(prior, bpbs=BPBS):
    return [(prior - b) * round(b * RATIO, 8) / b for b in bpbs]


def test_significant_improvement_figures(tmp_path):
    folder = build_record(tmp_path / "rec")
    r = cr.significance(cr.find_logs(str(folder)), 1.12)
    want = _gains(1.12)
    assert r["n"] == 3 and sorted(r["improvements"]) == pytest.approx(sorted(want))
    assert r["mean"] == pytest.approx(statistics.mean(want)) and r["std"] == pytest.approx(statistics.stdev(want))
    t = (statistics.mean(want) - 0.005) / (statistics.stdev(want) / math.sqrt(3))
    assert r["t"] == pytest.approx(t) and r["df"] == 2
    assert r["p"] == pytest.approx(0.5 - t / (2 * math.sqrt(t * t + 2)), rel=1e-6) and r["p"] < 0.01
    passed = by_status(cr.run_checks(str(folder), prior_bpb=1.12), "PASS", "significance")[0]
    assert f"t={t:.3f}" in passed.message and "n=3" in passed.message


def test_insignificant_improvement(tmp_path):
    folder = build_record(tmp_path / "rec")
    # improvements ~0.0068 +- 0.0017 nats: above 0.005 on average, but not at p < 0.01 with 3 seeds
    fails = only_failure(cr.run_checks(str(folder), prior_bpb=1.104), "significance", "not significant")
    want = _gains(1.104)
    t = (statistics.mean(want) - 0.005) / (statistics.stdev(want) / math.sqrt(3))
    p = 0.5 - t / (2 * math.sqrt(t * t + 2))
    assert 0.01 < p < 0.5 and f"p={p:.3g}" in fails[0].message
    # worse than the prior record: p near 1
    r = cr.significance(cr.find_logs(str(folder)), 1.09)
    assert r["mean"] < 0 and r["p"] > 0.99


def test_too_few_seeds(tmp_path):
    folder = build_record(tmp_path / "rec", seeds=SEEDS[:2], bpbs=BPBS[:2])
    results = cr.run_checks(str(folder), prior_bpb=1.2)
    fails = only_failure(results, "seeds", "too few seeds")
    assert "2 distinct seed(s)" in fails[0].message and "need at least 3" in fails[0].message
    assert by_status(results, "PASS", "significance")  # the test itself passes; the seed count does not
    one = build_record(tmp_path / "one", seeds=SEEDS[:1], bpbs=BPBS[:1])
    fails = cr.failures(cr.run_checks(str(one), prior_bpb=1.2))
    assert {f.check for f in fails} == {"seeds", "significance"}
    # without --prior-bpb there is only a NOTE
    assert by_status(cr.run_checks(str(one)), "NOTE", "significance")


@pytest.mark.parametrize("gpu, world", [("none", 1), (H100, 1), (H100, 4), ("NVIDIA H200", 8)])
def test_not_8xh100_gives_notes(tmp_path, gpu, world):
    kw = {i: {"gpu": gpu, "world": world, "eval_total": 700.0, "training": 650.0, "val_max_tokens": 131072,
              "val_tokens": 131072} for i in range(3)}
    results = cr.run_checks(str(build_record(tmp_path / "rec", log_kw=kw)))
    assert cr.failures(results) == []  # over 600 s and partial validation, but not judged off 8xH100
    for check in ("hardware", "train_time", "eval_time", "full_val"):
        rows = [r for r in results if r.check == check]
        assert len(rows) == 3 and all(r.status == "NOTE" for r in rows), check
        assert all("not an 8xH100 run" in r.message for r in rows), check
    if world < 8:
        eval_note = by_status(results, "NOTE", "eval_time")[0].message
        assert f"est_8gpu {700.0 * world / 8:g}s (estimate)" in eval_note
    # the checks that do not depend on the hardware still pass
    for check in ("ttt", "finished", "code_sha256"):
        assert len(by_status(results, "PASS", check)) == 3


def test_cli_exit_code_and_lines(tmp_path, capsys):
    folder = build_record(tmp_path / "rec", log_kw={0: {"eval_total": 612.0}})
    assert cr.main([str(folder)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL  eval_time     [train_seed{SEEDS[0]}.log] evaluation over 600s: 612s" in out
    assert "NOT ready" in out


# ----------------------------------------------------------------------------------------------
# make_submission.py
# ----------------------------------------------------------------------------------------------


def _ms_args(logs, out, *extra):
    return [*map(str, logs), "--name", "fake", "--author", "tester", "--github-id", "tester", "--hardware", "8xH100",
            "--data", "FineWeb sp1024", "--blurb", "blurb text", "--out", str(out), *extra]


def test_make_submission_means_and_check_record_agree(tmp_path, capsys):
    folder = build_record(tmp_path / "rec", write_sub=False)
    logs = sorted(folder.glob("*.log"))
    assert ms.main(_ms_args(logs, folder / "submission.json")) == 0
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["val_bpb"] == pytest.approx(sum(BPBS) / 3, abs=1e-10)
    assert sub["val_loss"] == pytest.approx(sum(round(b * RATIO, 8) for b in BPBS) / 3, abs=1e-10)
    assert sub["val_bpb_std"] == pytest.approx(statistics.stdev(BPBS), abs=1e-9)
    assert sub["seeds"] == sorted(SEEDS) and sub["bytes_total"] == 1_002_000 + CODE_BYTES
    assert sub["bytes_model"] == 1_002_000 and sub["bytes_code"] == CODE_BYTES
    assert [r["seed"] for r in sub["seed_results"]] == sorted(SEEDS)
    assert {r["seed"]: r["val_bpb"] for r in sub["seed_results"]} == dict(zip(SEEDS, BPBS))
    assert sub["code_sha256"] == CODE_SHA and sub["blurb"] == "blurb text" and sub["train_seconds"] == 592.1
    assert sub["val_max_tokens"] == 0 and sub["val_tokens"] == 62021632
    # the folder it completes passes every check
    assert cr.failures(cr.run_checks(str(folder), prior_bpb=1.12)) == []


def test_make_submission_table(tmp_path, capsys):
    folder = build_record(tmp_path / "rec", write_sub=False)
    assert ms.main(_ms_args(sorted(folder.glob("*.log")), tmp_path / "s.json", "--table")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| seed | steps | pre-quant | roundtrip | sliding | ttt | final val_bpb | val_loss |")
    assert len(lines) == 2 + 3 + 2
    assert lines[2].startswith("| 42 | 6800 |") and "| 1.10100000 |" in lines[2]
    assert lines[-2].startswith("| **mean** |") and f"| {sum(BPBS) / 3:.8f} |" in lines[-2]
    assert lines[-1].startswith("| **std** |") and f"| {statistics.stdev(BPBS):.8f} |" in lines[-1]
    assert "| 592.1 | 431.5 |" in lines[2]


def test_make_submission_refuses_differing_knob(tmp_path, capsys):
    folder = build_record(tmp_path / "rec", log_kw={2: {"hp": {"matrix_lr": 0.03}}}, write_sub=False)
    out = tmp_path / "s.json"
    assert ms.main(_ms_args(sorted(folder.glob("*.log")), out)) == 1
    err = capsys.readouterr().err
    assert "hyperparameter 'matrix_lr' differs" in err and "0.025" in err and "0.03" in err
    assert not out.exists()
    # a knob present in one log only
    folder = build_record(tmp_path / "rec2", log_kw={0: {"hp": {"new_knob": 1}}}, write_sub=False)
    assert ms.main(_ms_args(sorted(folder.glob("*.log")), out)) == 1
    assert "'new_knob'" in capsys.readouterr().err


def test_make_submission_refuses_differing_hash(tmp_path, capsys):
    folder = build_record(tmp_path / "rec", log_kw={1: {"sha": "f" * 64}}, write_sub=False)
    assert ms.main(_ms_args(sorted(folder.glob("*.log")), tmp_path / "s.json")) == 1
    err = capsys.readouterr().err
    assert "code_sha256 differs" in err and "f" * 64 in err
    folder = build_record(tmp_path / "rec2", log_kw={1: {"provenance": False}}, write_sub=False)
    assert ms.main(_ms_args(sorted(folder.glob("*.log")), tmp_path / "s.json")) == 1
    assert "no provenance line" in capsys.readouterr().err


def test_make_submission_refuses_over_16mb(tmp_path, capsys):
    model = 16_000_000 - CODE_BYTES + 1
    kw = {i: {"bytes_model": model, "hp": {"max_artifact_bytes": 20_000_000}} for i in range(3)}
    folder = build_record(tmp_path / "rec", log_kw=kw, write_sub=False)
    assert ms.main(_ms_args(sorted(folder.glob("*.log")), tmp_path / "s.json")) == 1
    err = capsys.readouterr().err
    assert "16,000,001" in err and "over the 16,000,000-byte limit" in err


def test_make_submission_refuses_duplicate_seed_and_unfinished(tmp_path, capsys):
    folder = build_record(tmp_path / "rec", seeds=(5, 5, 6), write_sub=False)
    assert ms.main(_ms_args(sorted(folder.glob("*.log")), tmp_path / "s.json")) == 1
    assert "same seed 5" in capsys.readouterr().err
    folder = build_record(tmp_path / "rec2", log_kw={0: {"finished": False}}, write_sub=False)
    assert ms.main(_ms_args(sorted(folder.glob("*.log")), tmp_path / "s.json")) == 1
    assert "did the run finish?" in capsys.readouterr().err


def test_make_submission_single_old_format_log(tmp_path):
    """One log without the new lines (like train.log before the rewrite) still makes a submission.json."""
    old = "\n".join(l for l in fake_log(1337, 2.12867662).splitlines()
                    if not l.startswith(("provenance ", "data ", "clock_train:", "clock_eval:")))
    log = tmp_path / "train.log"
    log.write_text(old + "\n")
    out = tmp_path / "submission.json"
    assert ms.main([str(log), "--name", "n", "--author", "a", "--hardware", "cpu", "--data", "d", "--note", "nt",
                    "--out", str(out)]) == 0
    sub = json.loads(out.read_text())
    assert sub["val_bpb"] == 2.12867662 and sub["seeds"] == [1337] and sub["bytes_total"] == 1_000_000 + CODE_BYTES
    assert sub["blurb"] == "nt" and sub["note"] == "nt" and sub["code_sha256"] is None
    assert sub["train_seconds"] == 588.0 and sub["eval_seconds"] == 431.5  # the older lines' figures


# ----------------------------------------------------------------------------------------------
# plot_logs.py
# ----------------------------------------------------------------------------------------------


def test_plot_logs_curves_parse(tmp_path):
    log = tmp_path / "a.log"
    log.write_text(fake_log(1, 1.1))
    c = pl.load_curves(str(log))
    assert c["label"] == "seed1" and c["val"] == [(87.0, 1.48), (588.0, 1.13)]
    assert c["train"] == [(0.1, 6.9312), (43.0, 3.1), (588.0, 2.1234)]
    curves = [pl.load_curves(str(log)), pl.load_curves(str(log))]
    pl.unique_labels(curves)
    assert curves[0]["label"] == "seed1 (a.log)"


def test_plot_logs_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    logs = []
    for seed in (1, 2):
        logs.append(tmp_path / f"s{seed}.log")
        logs[-1].write_text(fake_log(seed, 1.1 + 0.01 * seed))
    out = tmp_path / "curves.png"
    assert pl.main([*map(str, logs), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    assert pl.main([str(empty), "--out", str(tmp_path / "none.png")]) == 1
    assert not (tmp_path / "none.png").exists()


def test_plot_logs_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    log = tmp_path / "a.log"
    log.write_text(fake_log())
    assert pl.main([str(log), "--out", str(tmp_path / "c.png")]) == 3
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_this_project_folder_passes_check_record(tmp_path):
    """CI checks the project's own folder as a record folder: train.log was made by this train_gpt.py (code hash,
    bytes), submission.json matches it, and every check that needs an 8xH100 log says so instead of passing. (The
    record files are copied, so a final_model.ptz left by a local smoke run does not enter the check.)"""
    import shutil
    import subprocess
    for name in ("README.md", "submission.json", "train_gpt.py", "train.log"):
        shutil.copy(ROOT / name, tmp_path / name)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "check_record.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0 and not any(line.startswith("FAIL") for line in out.splitlines()), out + proc.stderr
    for check in ("code_sha256", "bytes_code", "bytes_total", "finished", "submission"):
        assert any(line.startswith("PASS") and line.split()[1] == check for line in out.splitlines()), (check, out)
    notes = [line for line in out.splitlines() if line.startswith("NOTE")]
    for check in ("hardware", "train_time", "eval_time"):
        assert any(line.split()[1] == check and "not an 8xH100 run" in line for line in notes), (check, out)
