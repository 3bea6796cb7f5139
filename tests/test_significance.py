"""bench/significance.py: Student-t p-values and Welch's test against reference values (computed with SciPy)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import significance as sg  # noqa: E402


@pytest.mark.parametrize("t, df, p", [(2.0, 10, 0.07338803477074037), (0.5, 3, 0.651447964848151),
                                      (3.7, 7.3, 0.007104237761352708), (1.2, 40, 0.23719862411461035),
                                      (10.0, 2, 0.00985245702332569), (0.0, 5, 1.0)])
def test_t_two_sided_p(t, df, p):
    assert sg.t_two_sided_p(t, df) == pytest.approx(p, rel=1e-9, abs=1e-15)


def test_welch_matches_reference():
    t, df, p = sg.welch([1.10, 1.12, 1.11, 1.13], [1.14, 1.15, 1.16, 1.15])
    assert t == pytest.approx(-4.582575694955848, rel=1e-12)
    assert df == pytest.approx(5.0689655172413985, rel=1e-12)
    assert p == pytest.approx(0.005736253608400779, rel=1e-9)


def test_grouping_and_table(tmp_path, capsys):
    rows = [{"name": f"full_s{i}", "returncode": 0, "final_bpb": v} for i, v in enumerate([1.10, 1.12, 1.11])]
    rows += [{"name": f"no_smear_s{i}", "returncode": 0, "final_bpb": v} for i, v in enumerate([1.14, 1.15, 1.16])]
    rows.append({"name": "no_smear_s9", "returncode": 1, "final_bpb": None})  # failed runs are left out
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert sg.main([str(path), "--baseline", "full", "--strip-suffix", "_s"]) == 0
    out = capsys.readouterr().out
    assert "| full | 3 | 1.11000 |" in out and "| no_smear | 3 | 1.15000 |" in out and "+0.04000" in out
    assert sg.main([str(path), "--baseline", "missing"]) == 2
