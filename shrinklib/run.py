"""Execute the suite's notebooks with papermill: `python -m shrinklib.run [NOTEBOOK ...] [-p NAME VALUE ...]`.

Every notebook (or those named) runs in order into `outputs/notebooks/`, with a progress
line each. Parameters are checked against each notebook's `parameters` cell before anything
runs: a name no notebook declares, a value of the wrong type or an unavailable device is
refused (each notebook receives the names it declares); a failure stops the run with a message naming the notebook and the cell; the
run ends with a table of runtimes and the reproduction report (every claim of every
notebook). `--store` writes the executed notebooks back into `notebooks/`, cleaned of
papermill metadata and machine paths, which is how the committed outputs are made.
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import yaml

from .io import atomic_path
from .results import claims_table, load_all_results, outputs_dir

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NOTEBOOK_NAME = re.compile(r"^\d\d_.+\.ipynb$")


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


@dataclass
class RunRecord:
    notebook: str
    seconds: float
    ok: bool


def discover(folder: Path = NOTEBOOKS) -> list[Path]:
    """The suite's notebooks (`NN_topic.ipynb`), in order."""
    return sorted(p for p in folder.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name))


class ParameterError(ValueError):
    """A `-p NAME VALUE` that a notebook does not declare, or a value of the wrong type."""


NUMBER = re.compile(r"^[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_value(text: str):
    """A parameter value from the command line: YAML scalars (`3`, `0.5`, `true`, `null`), numbers
    in any notation (`1e5`, `3e-4`, which YAML 1.1 reads as strings), flow lists and mappings
    (`[1, 2]`), else the string itself."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and NUMBER.match(text.strip()):
        return float(text)
    return value if isinstance(value, (int, float, bool, str, list, dict)) or value is None else text


def _default_type(node: ast.expr) -> type | None:
    """The type of a parameter's default value (None: any value, e.g. a `None` default)."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        kinds = {ast.ListComp: list, ast.List: list, ast.Dict: dict, ast.DictComp: dict, ast.Tuple: tuple}
        return kinds.get(type(node))
    return None if value is None else type(value)


def notebook_parameters(path: Path) -> dict[str, type | None]:
    """The names a notebook's `parameters` cell assigns, with their default's type. Read with `ast`
    (papermill's own inspection skips lines it cannot parse, e.g. a comment with a quote)."""
    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])), None)
    found: dict[str, type | None] = {}
    for node in ast.parse(cell.source).body if cell is not None else []:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and node.value is not None:
                found[t.id] = _default_type(node.value)
    return found


def coerce(name: str, value, kind: type | None, where: str):
    """`value` as the parameter's type: an integral float for an int (`1e5`), an int for a float,
    the text itself for a string; else ParameterError."""
    if kind is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    from .checks import type_name

    raise ParameterError(f"parameter {name!r} of {where} takes {type_name(kind)} (as its default in the parameters "
                         f"cell), got {value!r}")


def check_parameters(notebook: Path, parameters: dict, strict: bool = True) -> dict:
    """The parameters this notebook declares, each as its default's type. Unknown names raise
    ParameterError (papermill would only warn and run the whole default); with `strict=False`
    they are left out (a name meant for other notebooks of a run)."""
    declared = notebook_parameters(notebook)
    unknown = [k for k in parameters if k not in declared]
    if unknown and strict:
        raise _unknown(unknown[0], f"{notebook.name} has no parameter", declared)
    return {k: coerce(k, v, declared[k], notebook.name) for k, v in parameters.items() if k in declared}


def _unknown(name: str, where: str, known, listed: bool = True) -> ParameterError:
    close = difflib.get_close_matches(name, list(known), n=1)
    return ParameterError(f"{where} {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}"
                          f"{'; its parameters: ' + ', '.join(known) if listed else ''}")


def cli_parameters(notebooks: list[Path], pairs: list[tuple[str, str]]) -> dict[Path, dict]:
    """`-p NAME VALUE` pairs as each notebook's parameters, checked before anything runs: a name no
    notebook declares, a value of the wrong type, a device this machine lacks are refused."""
    from .checks import check_device

    declared = {nb: notebook_parameters(nb) for nb in notebooks}
    known = list(dict.fromkeys(k for d in declared.values() for k in d))
    for name, _ in pairs:
        if name not in known:
            where = f"{notebooks[0].name} has no parameter" if len(notebooks) == 1 else "no notebook of this run has a parameter"
            raise _unknown(name, where, known, listed=len(notebooks) == 1)
    out = {}
    for nb, kinds in declared.items():
        values = {name: text if kinds.get(name) is str else parse_value(text) for name, text in pairs}
        out[nb] = check_parameters(nb, values, strict=False)
        if "device" in out[nb]:
            check_device(out[nb]["device"])
    return out


def _failed_cell(nb_path: Path, err) -> str:
    """Describe the cell that raised: its execution count and first source line."""
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    nb = nbformat.read(nb_path, as_version=4)
    for cell in nb.cells:
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            first = next((line for line in cell.source.splitlines() if line.strip()), "")[:80]
            return f"cell In [{cell.get('execution_count')}] `{first}`: {ename}: {evalue}"
    return f"cell {getattr(err, 'exec_count', '?')}: {ename}: {evalue}"


def execute(src: Path, dst: Path, parameters: dict | None = None, kernel: str = "python3", timeout: int | None = None) -> float:
    """Run one notebook with papermill from `src` into `dst` (atomically); returns seconds.

    Raises:
        NotebookFailed: naming the notebook, the failing cell and its error.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    parameters = check_parameters(src, parameters or {})
    t0 = time.perf_counter()
    with atomic_path(dst) as tmp:
        try:
            pm.execute_notebook(
                str(src), str(tmp), parameters=parameters or {}, kernel_name=kernel, cwd=str(src.parent),
                progress_bar=False, log_output=False, execution_timeout=timeout,
            )
        except PapermillExecutionError as err:
            # papermill wrote the partial notebook to tmp: keep it beside dst for inspection
            failed = dst.with_suffix(".failed.ipynb")
            Path(tmp).replace(failed)
            raise NotebookFailed(f"{src.name} failed at {_failed_cell(failed, err)} (partial output: {failed})") from err
    return time.perf_counter() - t0


def clean(nb, repo: Path = REPO):
    """A copy of an executed notebook fit to commit: no papermill or timing metadata, no
    injected-parameters cell, no machine paths in outputs."""
    nb = copy.deepcopy(nb)
    nb.metadata.pop("papermill", None)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    home = str(Path.home())
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = out["text"].replace(str(repo), ".").replace(home, "~")
            for key, val in out.get("data", {}).items():
                if key.startswith("text/") and isinstance(val, str):
                    out["data"][key] = val.replace(str(repo), ".").replace(home, "~")
    return nb


def store(executed: Path, target: Path) -> None:
    """Write the cleaned executed notebook over the source notebook (atomically)."""
    nb = clean(nbformat.read(executed, as_version=4))
    with atomic_path(target) as tmp:
        nbformat.write(nb, tmp)


def run_all(notebooks: list[Path], parameters: dict, out_dir: Path, store_back: bool = False) -> list[RunRecord]:
    """Execute notebooks in order, printing a line per notebook; stop at the first failure.

    Args:
        parameters: {name: value} for every notebook (each gets the names it declares), or
            {notebook path: {name: value}} as `cli_parameters` returns.
    """
    records = []
    for i, src in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {src.stem} ...", flush=True)
        dst = out_dir / src.name
        mine = parameters[src] if src in parameters else check_parameters(src, parameters, strict=False)
        try:
            seconds = execute(src, dst, mine)
        except NotebookFailed as err:
            records.append(RunRecord(src.stem, float("nan"), False))
            print(runtime_table(records))
            raise
        if store_back:
            store(dst, src)
        records.append(RunRecord(src.stem, seconds, True))
        print(f"[{i}/{len(notebooks)}] {src.stem} ok in {seconds:.1f} s", flush=True)
    return records


def runtime_table(records: list[RunRecord]) -> str:
    rows = [f"{'notebook':<40} {'seconds':>8}  status"]
    rows += [f"{r.notebook:<40} {r.seconds:>8.1f}  {'ok' if r.ok else 'FAILED'}" for r in records]
    rows.append(f"{'total':<40} {sum(r.seconds for r in records if r.ok):>8.1f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shrinklib.run", description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: every notebooks/NN_*.ipynb)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="papermill parameter, e.g. -p model_id tinyllama-1.1b -p device cuda")
    ap.add_argument("--out", type=Path, default=None, help="folder for executed notebooks (default outputs/notebooks)")
    ap.add_argument("--store", action="store_true", help="write executed notebooks back into notebooks/ (default parameters only)")
    args = ap.parse_args(argv)
    if args.store and args.parameter:
        ap.error("--store keeps the default run's outputs in notebooks/; run with parameters without --store")
    notebooks = [Path(p).resolve() for p in args.notebooks] or discover()
    missing = [str(p) for p in notebooks if not p.is_file()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
    try:
        parameters = cli_parameters(notebooks, args.parameter)
    except ValueError as err:  # ParameterError, DeviceError: refused before anything runs
        ap.error(str(err))
    out_dir = args.out or outputs_dir() / "notebooks"
    try:
        records = run_all(notebooks, parameters, out_dir, store_back=args.store)
    except NotebookFailed as err:
        print(f"\nFAILED: {err}", file=sys.stderr)
        return 1
    print("\n" + runtime_table(records))
    print("\nReproduction report: every claim tested by the suite\n")
    print(claims_table(load_all_results()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
