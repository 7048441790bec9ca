"""The committed notebooks are restart-and-run-all clean and follow the suite's opening."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from shrinklib.run import clean, discover

NOTEBOOKS = discover()
MACHINE_PATH = re.compile(r"(/root/|/home/\w+/|/tmp/|/work/|[A-Z]:\\\\Users)")


@pytest.fixture(params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def nb(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_opens_with_title_then_parameters_then_seed(nb):
    path, book = nb
    first = book.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {path.stem[:2]} ·")
    code = [c for c in book.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    for line in code[0].source.splitlines():
        assert not line.strip() or line.lstrip().startswith("#") or "#" in line, f"parameter without a comment: {line}"
    assert any("seed_everything(seed" in c.source for c in code[:3])


def test_executed_in_order_without_errors(nb):
    _, book = nb
    counts = [c.execution_count for c in book.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), "re-run the notebook top to bottom (make notebooks)"
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_no_machine_paths_or_run_metadata(nb):
    _, book = nb
    assert clean(book) == book, "store notebooks with `python -m shrinklib.run --store`"
    text = json.dumps([c.get("outputs", []) for c in book.cells])
    assert not MACHINE_PATH.search(text)


def test_saves_a_figure_and_results(nb):
    path, _ = nb
    prefix = path.stem[:2]
    outputs = Path(__file__).resolve().parent.parent / "outputs"
    assert list((outputs / "figures").glob(f"{prefix}_*.png")) and list((outputs / "results").glob(f"{prefix}_*.json"))


def test_has_checked_cells_and_exercises(nb):
    _, book = nb
    sources = [c.source for c in book.cells if c.cell_type == "code"]
    assert any(s.startswith("# NBVAL_CHECK_OUTPUT") for s in sources)
    assert any("shrinklib.exercises" in s for s in sources)


def test_stored_pages_are_clean(nb):
    """What a student sees is what the notebook means to show: no stderr (warnings, progress bars), no
    widgets (they render as junk outside JupyterLab), no leaked return values of the last line of a
    cell (`PosixPath(...)`, `<All keys matched successfully>`), and tables rendered, not printed as
    Markdown source."""
    _, book = nb
    for i, cell in enumerate(book.cells):
        if cell.cell_type != "code":
            continue
        assert "print(markdown_table(" not in cell.source, f"cell {i}: display tables with show_table(rows)"
        for out in cell.outputs:
            assert not (out.output_type == "stream" and out.name == "stderr"), f"cell {i} writes to stderr: {out.text[:200]}"
            data = out.get("data", {})
            assert not any("widget" in kind for kind in data), f"cell {i} stores a widget"
            if out.output_type == "execute_result":
                shown = data.get("text/plain", "")
                assert shown.startswith("<Figure") or "text/markdown" in data or "image/png" in data, \
                    f"cell {i} leaks its last value: {shown[:100]}"


def test_one_evaluation_protocol(nb):
    """Every notebook that reports perplexity scores the suite's default evaluation tokens
    (shrinklib.evaluate.EVAL_TOKENS in windows of EVAL_SEQ_LEN), so its float model's perplexity is
    the same number in every notebook and the frontier compares points across notebooks as they are."""
    import ast

    from shrinklib.evaluate import EVAL_SEQ_LEN, EVAL_TOKENS

    path, book = nb
    params = next(c for c in book.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", []))
    defaults = {t.id: node.value for node in ast.parse(params.source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    if "eval_tokens" in defaults:
        assert ast.literal_eval(defaults["eval_tokens"]) == EVAL_TOKENS, f"{path.stem}: eval_tokens default is not EVAL_TOKENS"
    window = defaults.get("eval_seq_len", defaults.get("seq_len"))  # where both exist, seq_len is for training
    if "eval_tokens" in defaults and window is not None:
        assert ast.literal_eval(window) == EVAL_SEQ_LEN, f"{path.stem}: perplexity window is not EVAL_SEQ_LEN"


def test_figures_carry_their_notebook_number(nb):
    """A figure saved by notebook NN is named NN_*, so no notebook overwrites another's figure."""
    path, book = nb
    names = re.findall(r"save_figure\([^,]+,\s*f?[\"']([^\"']+)[\"']", "\n".join(c.source for c in book.cells if c.cell_type == "code"))
    assert all(n.startswith(path.stem[:2] + "_") for n in names), names
