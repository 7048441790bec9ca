import json

import pytest

from shrinklib import results as R


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKLIB_OUTPUTS", str(tmp_path))
    return tmp_path


def test_results_file_has_the_shared_shape(outputs):
    r = R.Results("99_demo", params={"bits": 3})
    r.metrics[("gptq", 3)] = 41.25
    r.claim("GPTQ beats RTN at 3-bit", "GPTQ, Table 3", True, {"gptq": 41.2, "rtn": 58.9})
    path = r.save()
    assert path == outputs / "results" / "99_demo.json"
    data = json.loads(path.read_text())
    assert set(data) == {"notebook", "params", "metrics", "claims"}
    assert data["metrics"] == {"gptq/3": 41.25}
    assert data["claims"][0] == {"claim": "GPTQ beats RTN at 3-bit", "source": "GPTQ, Table 3", "holds": True,
                                 "evidence": {"gptq": 41.2, "rtn": 58.9}, "asserted": True}


def test_a_failing_claim_raises_after_being_recorded(outputs):
    r = R.Results("99_demo")
    with pytest.raises(AssertionError, match="Claim does not hold: X beats Y"):
        r.claim("X beats Y", "paper", False, {"x": 2, "y": 1})
    saved = json.loads((outputs / "results" / "99_demo.json").read_text())
    assert saved["claims"][0]["holds"] is False


def test_a_reported_claim_does_not_raise(outputs):
    c = R.Results("99_demo").claim("does not reproduce here", "paper", False, {}, assert_it=False)
    assert not c.holds and not c.asserted


def test_claims_table_lists_every_claim():
    table = R.claims_table([
        {"notebook": "01_a", "claims": [{"claim": "c1", "source": "s1", "holds": True}]},
        {"notebook": "02_b", "claims": [{"claim": "c2", "source": "s2", "holds": False, "asserted": False}]},
    ])
    lines = table.splitlines()
    assert lines[0].split() == ["notebook", "claim", "source", "holds"]
    assert "01_a" in lines[2] and lines[2].endswith("yes")
    assert lines[3].endswith("NO (reported)")


def test_save_figure_writes_a_png(outputs):
    fig, ax = R.new_figure()
    ax.plot([0, 1], [1, 0])
    path = R.save_figure(fig, "99_line")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["99_line.png"]


def test_jsonable_handles_tensors_and_nan():
    import torch

    assert R._jsonable({"a": torch.tensor(2.5), "b": float("nan"), (1, 2): [torch.tensor([1, 2])]}) == {"a": 2.5, "b": None, "1/2": [[1, 2]]}


def test_markdown_table():
    assert R.markdown_table([{"m": "rtn", "ppl": 12.3456}]) == "| m | ppl |\n|---|---|\n| rtn | 12.3 |"
