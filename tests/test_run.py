from pathlib import Path

import nbformat
import pytest

from shrinklib import run

FIXTURE = Path(__file__).parent / "fixtures" / "runner_fixture.ipynb"


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_parameters_are_injected(tmp_path):
    out = tmp_path / "out.ipynb"
    seconds = run.execute(FIXTURE, out, {"greeting": "hi", "repeats": 3})
    assert seconds > 0
    assert "hi hi hi" in _stream_text(nbformat.read(out, as_version=4))


def test_a_failing_cell_is_reported_by_name(tmp_path):
    out = tmp_path / "out.ipynb"
    with pytest.raises(run.NotebookFailed) as err:
        run.execute(FIXTURE, out, {"greeting": "fail"})
    msg = str(err.value)
    assert "runner_fixture.ipynb" in msg and "if greeting == 'fail':" in msg and "ValueError: asked to fail" in msg
    assert not out.exists() and out.with_suffix(".failed.ipynb").exists()


def test_main_exits_nonzero_and_stops_at_the_failure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHRINKLIB_OUTPUTS", str(tmp_path))
    code = run.main([str(FIXTURE), str(FIXTURE), "-p", "greeting", "fail", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 1
    assert "[1/2] runner_fixture ..." in captured.out and "[2/2]" not in captured.out
    assert "FAILED: runner_fixture.ipynb failed at cell" in captured.err


def test_main_prints_the_runtime_table_and_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHRINKLIB_OUTPUTS", str(tmp_path))
    assert run.main([str(FIXTURE), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "runner_fixture" in out and "total" in out and "Reproduction report" in out


def test_store_refuses_parameters():
    with pytest.raises(SystemExit):
        run.main(["--store", "-p", "repeats", "2"])


def test_clean_strips_papermill_metadata_and_paths(tmp_path):
    out = tmp_path / "out.ipynb"
    run.execute(FIXTURE, out, {"greeting": f"{run.REPO}/secret"})
    nb = run.clean(nbformat.read(out, as_version=4))
    assert "papermill" not in nb.metadata
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert all("papermill" not in c.metadata and "execution" not in c.metadata for c in nb.cells)
    assert str(run.REPO) not in _stream_text(nb) and "./secret" in _stream_text(nb)


@pytest.mark.parametrize("text,value", [("3", 3), ("0.5", 0.5), ("true", True), ("cuda", "cuda"), ("null", None), ("[1, 2]", [1, 2]), ("1e5", 1e5), ("3e-4", 3e-4), ("-2.5E+3", -2500.0)])
def test_parse_value(text, value):
    assert run.parse_value(text) == value


def test_discover_finds_numbered_notebooks_in_order():
    found = [p.name for p in run.discover()]
    assert found == sorted(found) and found[0].startswith("00_")


def test_unknown_parameter_names_are_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHRINKLIB_OUTPUTS", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        run.main([str(FIXTURE), "-p", "greting", "hi", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert ("runner_fixture.ipynb has no parameter 'greting' (did you mean 'greeting'?); its parameters: greeting, "
            "repeats") in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing executed
    with pytest.raises(run.ParameterError, match="has no parameter 'nope'"):
        run.execute(FIXTURE, tmp_path / "out.ipynb", {"nope": 1})


def test_numbers_in_any_notation_take_the_parameters_type(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SHRINKLIB_OUTPUTS", str(tmp_path))
    assert run.main([str(FIXTURE), "-p", "repeats", "3e0", "-p", "greeting", "1e5", "--out", str(tmp_path)]) == 0
    assert "1e5 1e5 1e5" in _stream_text(nbformat.read(tmp_path / FIXTURE.name, as_version=4))
    with pytest.raises(SystemExit):
        run.main([str(FIXTURE), "-p", "repeats", "3e-4", "--out", str(tmp_path)])
    assert "parameter 'repeats' of runner_fixture.ipynb takes an integer" in capsys.readouterr().err


def test_each_notebook_gets_the_parameters_it_declares():
    nb00, nb05, nb08 = (run.NOTEBOOKS / n for n in ("00_baseline.ipynb", "05_structured_pruning.ipynb", "08_model_merging.ipynb"))
    assert "slicing" in run.notebook_parameters(nb05)  # a line papermill's own inspection skips
    got = run.cli_parameters([nb00, nb05, nb08], [("eval_tokens", "1e5"), ("lora_lr", "3e-4"), ("slicing", "0.3"),
                                                  ("model_id", "1e5")])
    assert got[nb00] == {"eval_tokens": 100000, "model_id": "1e5"}
    assert got[nb05] == {"eval_tokens": 100000, "lora_lr": 3e-4, "slicing": 0.3, "model_id": "1e5"}
    assert got[nb08] == {"model_id": "1e5"}  # 08 evaluates no perplexity
    with pytest.raises(run.ParameterError, match="no notebook of this run has a parameter 'eval_token'"):
        run.cli_parameters([nb00, nb08], [("eval_token", "5")])


def test_a_device_this_machine_lacks_is_refused_before_running():
    import torch

    from shrinklib.checks import DeviceError

    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match=f"device '{missing}'"):
        run.cli_parameters([run.NOTEBOOKS / "00_baseline.ipynb"], [("device", missing)])
