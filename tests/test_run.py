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


@pytest.mark.parametrize("text,value", [("3", 3), ("0.5", 0.5), ("true", True), ("cuda", "cuda"), ("null", None), ("[1, 2]", "[1, 2]")])
def test_parse_value(text, value):
    assert run.parse_value(text) == value


def test_discover_finds_numbered_notebooks_in_order():
    found = [p.name for p in run.discover()]
    assert found == sorted(found) and found[0].startswith("00_")
