import copy
import json

import pytest

from shrinklib import results as R
from shrinklib.run import discover


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKLIB_OUTPUTS", str(tmp_path))
    return tmp_path


def test_results_file_has_the_shared_shape(outputs):
    r = R.Results("99_demo", params={"bits": 3}, tolerances={"gptq/*": 0.02})
    r.metrics[("gptq", 3)] = 41.25
    r.claim("GPTQ beats RTN at 3-bit", "GPTQ, Table 3", True, {"gptq": 41.2, "rtn": 58.9})
    path = r.save()
    assert path == outputs / "results" / "99_demo.json"
    data = json.loads(path.read_text())
    assert list(data) == ["notebook", "params", "metrics", "claims", "tolerances"]
    assert data["metrics"] == {"gptq/3": 41.25} and data["tolerances"] == {"gptq/*": 0.02}
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
    assert lines[3].endswith("NO (reported)") and len(lines) == 4


def test_a_failing_claims_reason_is_stored_and_reported(outputs):
    r = R.Results("99_x", {})
    r.claim("c1", "s1", True, {})
    r.claim("c2", "s2", False, {}, assert_it=False, reason="the method cannot see it")
    stored = r.to_dict()
    assert "reason" not in stored["claims"][0] and stored["claims"][1]["reason"] == "the method cannot see it"
    table = R.claims_table([stored]).splitlines()
    assert table[-2:] == ["Why the reported claims that do not hold fail at this scale:",
                          "- 99_x: c2: the method cannot see it"]


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


# Tolerances and the comparison of a fresh results file with the stored one

def test_save_refuses_a_metric_without_a_tolerance(outputs):
    r = R.Results("99_demo", tolerances={"ppl.*": 0.02})
    r.metrics.update(ppl={"rtn": 15.2}, seconds=0.3)
    with pytest.raises(ValueError, match="99_demo: no tolerance covers the metrics seconds;"):
        r.save()
    assert not (outputs / "results").exists()  # nothing written
    r.tolerances["seconds"] = None  # wall-clock: not compared, but declared
    assert r.save().is_file()


def test_a_failing_claim_is_reported_even_before_tolerances_are_complete(outputs):
    r = R.Results("99_demo")
    r.metrics["x"] = 1.0
    with pytest.raises(AssertionError, match="Claim does not hold"):
        r.claim("X beats Y", "paper", False, {})


@pytest.mark.parametrize("bad", [{"a": -0.1}, {"a": "0.1"}, {"a": True}, {"a": {"rel": 0.1, "atol": 1}}, {"a": {}},
                                 {"a": float("nan")}, {"a": {"abs": -1}}, {3: 0.1}])
def test_malformed_tolerances_are_refused(bad):
    with pytest.raises(ValueError, match="is not a relative tolerance"):
        R.Results("99_demo", tolerances=bad)


def test_tolerance_of_prefers_the_exact_name_then_the_longest_pattern():
    tol = {"ppl.*": 0.02, "ppl.fp32": 0.001, "ppl.*/3bit": 0.05, "*": None}
    assert R.tolerance_of("ppl.fp32", tol) == ("ppl.fp32", 0.001)
    assert R.tolerance_of("ppl.gptq/3bit", tol) == ("ppl.*/3bit", 0.05)
    assert R.tolerance_of("ppl.gptq/4bit", tol) == ("ppl.*", 0.02)
    assert R.tolerance_of("seconds", tol) == ("*", None)
    assert R.tolerance_of("seconds", {"ppl.*": 0}) is None


def test_flatten_metrics_names():
    metrics = {"ppl": {"rtn/4bit": 15.2, "fp32": 11.9}, "layers": [{"ms": 0.2}, {"ms": 0.3}],
               "scores": [0.5, 0.25], "load": [[0.5, 0.5], [1.0, 0.0]], "kept": None, "empty": {}}
    assert R.flatten_metrics(metrics) == {"ppl.rtn/4bit": 15.2, "ppl.fp32": 11.9, "layers.0.ms": 0.2, "layers.1.ms": 0.3,
                                          "scores": [0.5, 0.25], "load.0": [0.5, 0.5], "load.1": [1.0, 0.0], "kept": None}
    with pytest.raises(ValueError, match="same name 'a.b'"):
        R.flatten_metrics({"a.b": 1, "a": {"b": 2}})


def test_within():
    assert R.within(100.0, 101.9, 0.02) and not R.within(100.0, 102.1, 0.02)
    assert R.within(-100.0, -101.9, 0.02)  # relative to |stored|
    assert R.within(7, 7, 0) and not R.within(7, 8, 0) and not R.within(0.1, 0.1 + 1e-12, 0)
    assert R.within(1e-6, 3e-5, {"abs": 1e-4}) and not R.within(1e-6, 2e-4, {"abs": 1e-4})
    assert R.within(10.0, 10.6, {"rel": 0.05, "abs": 0.1}) and not R.within(10.0, 10.7, {"rel": 0.05, "abs": 0.1})
    assert R.within(3.0, 1e9, None)  # not compared
    assert R.within([1.0, 2.0], [1.01, 1.99], 0.02) and not R.within([1.0, 2.0], [1.0], 0.5)
    assert not R.within([1.0, 2.0], [1.0, 2.1], 0.02)
    assert R.within("RM 2", "RM 2", 0.5) and not R.within("RM 2", "RM 3", 0.5)
    assert R.within(None, None, 0.1) and not R.within(None, 1.0, 0.1) and not R.within(True, 1, 0.1)


def stored_file(name="02_post_training_quantization"):
    return json.loads((R.STORED_RESULTS / f"{name}.json").read_text())


def test_every_stored_results_file_declares_tolerances_covering_its_metrics():
    names = [p.stem for p in discover()]
    assert sorted(p.stem for p in R.STORED_RESULTS.glob("*.json")) == names
    for name in names:
        data = stored_file(name)
        R.check_tolerances(data.get("tolerances"))
        missing = [m for m in R.flatten_metrics(data["metrics"]) if R.tolerance_of(m, data["tolerances"]) is None]
        assert not missing, f"{name}: no tolerance for {missing}"
        assert R.compare_results(data, copy.deepcopy(data)) == []


def test_a_wrong_stored_metric_fails_the_comparison_with_a_clear_message():
    """Edit one value of a copy of a real results file: the comparison names the notebook, the
    metric, the stored and new values and the tolerance."""
    fresh = stored_file()
    stored = copy.deepcopy(fresh)
    name, tol = "ppl.rtn/3bit", R.tolerance_of("ppl.rtn/3bit", stored["tolerances"])
    assert tol is not None and isinstance(tol[1], float) and tol[1] < 0.01
    stored["metrics"]["ppl"]["rtn/3bit"] *= 1.01  # a wrong stored value
    problems = R.compare_results(stored, fresh)
    assert len(problems) == 1
    msg = problems[0]
    new = fresh["metrics"]["ppl"]["rtn/3bit"]
    assert msg.startswith(f"02_post_training_quantization: metric {name}: stored {new * 1.01:.8g}, new {new:.8g}")
    assert f"tolerance rel {tol[1]:g} (from {tol[0]!r})" in msg
    # within its tolerance, the same edit passes
    stored["metrics"]["ppl"]["rtn/3bit"] = new * (1 + tol[1] / 2)
    assert R.compare_results(stored, fresh) == []


def test_the_comparison_covers_params_metric_sets_claims_and_tolerances(tmp_path):
    base = {"notebook": "99_demo", "params": {"bits": 3}, "metrics": {"ppl": 10.0, "t": 1.0, "n": 5},
            "claims": [{"claim": "A beats B", "source": "s", "holds": True, "evidence": {"a": 1}, "asserted": True}],
            "tolerances": {"ppl": 0.01, "t": None, "n": 0}}
    fresh = copy.deepcopy(base)
    fresh["metrics"]["t"] = 99.0  # not compared
    assert R.compare_results(base, fresh) == []
    fresh["params"]["bits"] = 4
    fresh["metrics"]["n"] = 6
    fresh["metrics"]["extra"] = 1
    del fresh["metrics"]["ppl"]
    fresh["claims"][0]["holds"] = False
    fresh["claims"].append({"claim": "C beats D", "source": "s", "holds": True, "evidence": {}})
    fresh["tolerances"]["ppl"] = 0.5
    problems = R.compare_results(base, fresh)
    assert problems == [
        "99_demo: parameter bits: stored 3, new 4 (parameters are compared exactly)",
        "99_demo: tolerances: stored {'ppl': 0.01, 't': None, 'n': 0}, new {'ppl': 0.5, 't': None, 'n': 0}: "
        "the notebook's declaration changed; re-store its results deliberately (make notebooks)",
        "99_demo: metric ppl: stored 10, missing from the new results",
        "99_demo: metric extra: new 1, not in the stored results",
        "99_demo: metric n: stored 5, new 6 (relative change 2.0e-01), tolerance exact (from 'n')",
        "99_demo: claim 'C beats D': new, not in the stored results",
        "99_demo: claim 'A beats B': holds was True, now False (stored evidence {'a': 1}, new {'a': 1})",
    ]
    (tmp_path / "stored.json").write_text(json.dumps(base))
    assert R.compare_files(tmp_path / "stored.json", tmp_path / "nothing.json") == [
        f"stored: no fresh results file {tmp_path / 'nothing.json'}"]
    del base["tolerances"]
    assert R.compare_results(base, base) == ["99_demo: the stored results file declares no tolerances: re-store it (make notebooks)"]


def test_assert_claims_false_records_a_failing_claim_without_raising(outputs):
    r = R.Results("99_demo", assert_claims=False)
    c = r.claim("X beats Y", "paper", False, {"x": 2, "y": 1})
    assert not c.holds and c.asserted  # the default run would assert it; this run records it
    with pytest.raises(TypeError, match="assert_claims"):
        R.Results("99_demo", assert_claims="false")


def test_table_renders_as_markdown_and_reads_as_text():
    t = R.Table([{"m": "rtn", "ppl": 12.3456}])
    assert t._repr_markdown_() == repr(t) == "| m | ppl |\n|---|---|\n| rtn | 12.3 |"


def test_a_timed_claim_is_reported_never_asserted_and_its_verdict_not_compared(outputs):
    r = R.Results("99_demo", tolerances={"ms": None})
    c = r.claim("the kernel is faster than torch", "paper", False, {"ms": 2.0}, timed=True)  # does not raise
    assert not c.holds and not c.asserted and c.timed
    r.claim("A beats B", "paper", True, {})
    r.metrics["ms"] = 2.0
    stored = json.loads(r.save().read_text())
    assert stored["claims"][0]["timed"] is True and "timed" not in stored["claims"][1]
    fresh = copy.deepcopy(stored)
    fresh["claims"][0]["holds"] = True  # another machine, or the same one under load
    assert R.compare_results(stored, fresh) == []
    fresh["claims"][1]["holds"] = False  # a verdict on quality must not move
    assert R.compare_results(stored, fresh) == ["99_demo: claim 'A beats B': holds was True, now False (stored evidence {}, new {})"]
    del fresh["claims"][0]["timed"]
    fresh["claims"][1]["holds"] = True
    assert R.compare_results(stored, fresh) == ["99_demo: claim 'the kernel is faster than torch': timed was True, now False"]
    assert "NO (timed, this machine)" in R.claims_table([stored])


# ----------------------------------------------------------------------------- the frontier


def test_points_are_typed_written_through_results_and_read_back(outputs):
    r = R.Results("98_demo", tolerances={"points.*": 0.02})
    r.point("fp32", 400.0, 10.0, 10.0)
    r.point("gptq 4-bit", 100.0, 12.0, 10.0, kl=0.05, latency_s=0.02)
    r.save()
    other = {"notebook": "97_other", "metrics": {"ppl": {"x": 3.0}}}  # a file without points contributes none
    points = R.frontier_points([json.loads((outputs / "results" / "98_demo.json").read_text()), other])
    assert [(p.notebook, p.label) for p in points] == [("98_demo", "fp32"), ("98_demo", "gptq 4-bit")]
    q = points[1]
    assert (q.size_bytes, q.ppl, q.baseline_ppl, q.kl) == (100.0, 12.0, 10.0, 0.05) and q.ppl_ratio == 1.2
    assert q.latency_s == 0.02 and points[0].latency_s is None
    assert points[0].kl is None and set(r.metrics["points"]["fp32"]) == {"size_bytes", "ppl", "baseline_ppl"}


@pytest.mark.parametrize("bad", [dict(size_bytes=0.0), dict(ppl=float("nan")), dict(baseline_ppl=-1.0), dict(kl=-0.1),
                                 dict(ppl="12"), dict(latency_s=0.0)])
def test_a_point_refuses_what_is_not_a_size_or_a_perplexity(bad):
    kw = dict(size_bytes=100.0, ppl=12.0, baseline_ppl=10.0) | bad
    with pytest.raises(ValueError, match=f"point 'x' of 98_demo: {next(iter(bad))} must be"):
        R.Results("98_demo").point("x", **kw)


def test_pareto_front_by_hand():
    # (MiB, perplexity): C is dominated by B (smaller and better), E by D; ties in one coordinate count
    pts = {"A": (100, 12.0), "B": (50, 12.5), "C": (60, 13.0), "D": (30, 15.0), "E": (30, 16.0), "F": (100, 12.0)}
    assert R.pareto_front(pts) == ["D", "B", "A", "F"]


def test_labels_of_crowded_points_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    fig, ax = R.new_figure()
    xy = {f"technique number {i}": (100.0 + (i % 3), 2.0 + 0.001 * i) for i in range(12)}  # nearly one spot
    ax.scatter([x for x, _ in xy.values()], [y for _, y in xy.values()])
    ax.set(xscale="log", yscale="log")
    R.label_points(ax, xy)
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 12
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_a_table_of_rows_with_different_keys_leaves_the_missing_cells_empty():
    # a benchmark row of another engine has other columns (llama.cpp's one decode speed)
    rows = [{"format": "lut4", "decode (eager)": 40.0, "decode (compiled)": 53.0}, {"format": "llama.cpp", "decode": 126.0}]
    assert R.markdown_table(rows) == ("| format | decode (eager) | decode (compiled) | decode |\n|---|---|---|---|\n"
                                      "| lut4 | 40 | 53 |  |\n| llama.cpp |  |  | 126 |")
