"""Execute the suite's notebooks with papermill: `python -m shrinklib.run [NOTEBOOK ...] [-p NAME VALUE ...]`.

Every notebook (or those named) runs in order into `outputs/notebooks/`, with a progress
line each; a failure stops the run with a message naming the notebook and the cell; the
run ends with a table of runtimes and the reproduction report (every claim of every
notebook). `--store` writes the executed notebooks back into `notebooks/`, cleaned of
papermill metadata and machine paths, which is how the committed outputs are made.
"""

from __future__ import annotations

import argparse
import copy
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


def parse_value(text: str):
    """A parameter value from the command line: YAML scalars (`3`, `0.5`, `true`, `null`),
    else the string itself."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (int, float, bool, str)) or value is None else text


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
    """Execute notebooks in order, printing a line per notebook; stop at the first failure."""
    records = []
    for i, src in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {src.stem} ...", flush=True)
        dst = out_dir / src.name
        try:
            seconds = execute(src, dst, parameters)
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
    parameters = {name: parse_value(value) for name, value in args.parameter}
    if args.store and parameters:
        ap.error("--store keeps the default run's outputs in notebooks/; run with parameters without --store")
    notebooks = [Path(p).resolve() for p in args.notebooks] or discover()
    missing = [str(p) for p in notebooks if not p.is_file()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
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
