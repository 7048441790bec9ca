"""The spread tool's rule and its record, on hand-made runs (no notebook is executed)."""

import json

import pytest

from shrinklib import spread as S


def test_round_up_to_one_significant_digit():
    assert [S.round_up(x) for x in (0.0123, 0.07, 0.3, 1.7, 2e-6, 0.0)] == [0.02, 0.07, 0.3, 2.0, 2e-6, 0.0]


def test_deviations():
    assert S.deviations([10.0, 10.5, 9.5]) == pytest.approx((1.0 / 9.5, 1.0))
    assert S.deviations([[1.0, 2.0], [1.0, 2.2]]) == pytest.approx((0.2 / 2.0, 0.2))
    assert S.deviations([0.0, 0.1])[0] == float("inf")
    assert S.deviations(["a", "a"]) == (0.0, 0.0) and S.deviations(["a", "b"]) is None
    assert S.deviations([[1, 2], [1, 2, 3]]) is None


def test_the_rule():
    assert S.suggest([10.0, 10.1], 0.5) == (0.03, "3 x spread")  # 3 × 1%
    assert S.suggest([10.0, 10.0], 0.5) == (S.FLOOR, "float floor")
    assert S.suggest([10.0, 10.0], 0) == (0.0, "exact everywhere")
    assert S.suggest([7, 7], 0.5) == (0.0, "exact everywhere")
    assert S.suggest([1.0, 99.0], None) == (None, "not compared")
    assert S.suggest([2e-5, 5e-5], {"abs": 1}) == ({"abs": 9e-5}, "absolute")
    assert S.suggest([[1, 2], [2, 1]], 0)[0] == "varies"  # a selection that differs
    assert S.suggest([166387077, 166387105], 0)[0] == S.FLOOR  # a byte count is a quantity
    assert S.suggest([0.0, 0.03], 0.5)[0] == "varies"  # relative spread undefined at zero


def test_analyse_and_report(monkeypatch, tmp_path):
    monkeypatch.setattr(S, "STORED_RESULTS", tmp_path)  # no committed file for this notebook
    tol = {"ppl.*": 0.5, "n": 0, "t": None}

    def run(ppl, holds, t):
        return {"results": {"notebook": "99_demo", "params": {}, "metrics": {"ppl": {"a": ppl, "b": 5.0}, "n": 3, "t": t},
                            "claims": [{"claim": "A beats B", "holds": holds, "evidence": {"a": ppl}}], "tolerances": tol},
                "error": None}

    other = tmp_path / "other-cpu"
    other.mkdir()
    (other / "99_demo.json").write_text(json.dumps(run(10.1, True, 2.0)["results"]))
    rec = S.analyse("99_demo", {"native": run(10.0, True, 1.0), "avx2": run(10.2, False, 3.0)}, {"other": other})
    assert list(rec["configs"]) == ["native", "avx2", "other"] and rec["metrics"]["ppl.a"]["values"]["other"] == 10.1
    assert rec["metrics"]["ppl.a"]["suggested"] == 0.06 and rec["metrics"]["ppl.b"]["suggested"] == S.FLOOR
    assert rec["entries"] == {"ppl.*": {"declared": 0.5, "suggested": 0.06, "metrics": 2},
                              "n": {"declared": 0, "suggested": 0.0, "metrics": 1},
                              "t": {"declared": None, "suggested": None, "metrics": 1}}
    assert rec["flipped_claims"] == ["A beats B"]
    assert rec["declaration"] == {"ppl.*": 0.06, "ppl.b": S.FLOOR, "n": 0.0, "t": None}  # ppl.b: >= 3x tighter, 0.06 loose
    text = S.report(rec)
    assert 'results.tolerances = {"ppl.*": 0.06, "ppl.b": 0.0001, "n": 0.0, "t": None}' in text and "claim flips: 'A beats B': native True, avx2 False, other True" in text
    json.dumps(rec)  # the record is plain JSON
