"""Test-session set-up shared by the unit tests and the notebook tests (`make test`).

- A pytest-xdist worker runs single-threaded (torch, OpenMP, and the notebooks it executes,
  through `$SHRINKLIB_THREADS`), so two workers use two cores without oversubscription.
- Executed notebooks write their figures and results under `$SHRINKLIB_OUTPUTS`
  (default `build/test-outputs`), never over the committed `outputs/`.
- After nbval runs a notebook's cells, one more item, `notebooks/NN_topic.ipynb::results`,
  compares the results file that run wrote with the committed one, within the tolerances the
  file declares (`shrinklib.results.compare_results`).
- Notebooks are collected first, the longest first, then the other test files, so that the
  workers of `--dist loadfile --no-loadscope-reorder` finish close together.
"""

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("SHRINKLIB_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
os.environ.setdefault("SHRINKLIB_OUTPUTS", str(ROOT / "build" / "test-outputs"))

import pytest  # noqa: E402
import torch  # noqa: E402

from shrinklib.results import STORED_RESULTS, compare_files, outputs_dir  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Default-run seconds of each notebook on a 2-core x86 machine, one thread (the order matters,
# not the figures); a notebook missing here is scheduled first.
NOTEBOOK_SECONDS = {
    "14_number_formats": 280,
    "16_learned_rounding_and_qat": 240,
    "15_kv_cache_quantization": 200,
    "12_compression_frontier": 170,
    "02_post_training_quantization": 165,
    "08_model_merging": 225,
    "04_unstructured_pruning": 150,
    "03_low_bit_kernels": 140,
    "10_small_llms": 135,
    "07_minitron_prune_and_distill": 130,
    "05_structured_pruning": 125,
    "11_proxy_tuning": 120,
    "06_knowledge_distillation": 115,
    "13_rotations": 110,
    "09_mixture_of_experts": 155,
    "01_quantization_basics": 90,
    "00_baseline": 60,
}
SESSION_START = time.time()


class ResultsMismatch(Exception):
    """A fresh results file differs from the committed one beyond its tolerances."""


class NotebookResults(pytest.Item):
    """The results file of the notebook just executed, held to the committed one."""

    def runtest(self):
        name = self.path.stem
        stored, fresh = STORED_RESULTS / f"{name}.json", outputs_dir() / "results" / f"{name}.json"
        if fresh.resolve() == stored.resolve():
            raise ResultsMismatch(f"{name}: SHRINKLIB_OUTPUTS points at the committed outputs; a test run writes elsewhere")
        if not fresh.is_file() or fresh.stat().st_mtime < SESSION_START:
            raise ResultsMismatch(f"{name}: this run wrote no results file {fresh}")
        problems = compare_files(stored, fresh)
        if problems:
            raise ResultsMismatch(f"{len(problems)} difference(s) beyond the stored tolerances "
                                  "(update the stored results deliberately with `make notebooks`):\n" + "\n".join(problems))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ResultsMismatch):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, None, f"{self.path.stem}: results within the stored tolerances"


def pytest_collection_modifyitems(session, config, items):
    """Append a results item after each suite notebook's cells; those notebooks first, longest first."""
    notebooks: dict = {}  # IPyNbFile of a suite notebook -> its cells, in order
    others = []
    for item in items:
        if type(item).__name__ == "IPyNbCell" and item.path.parent == NOTEBOOKS:
            notebooks.setdefault(item.parent, []).append(item)
        else:
            others.append(item)
    if not notebooks:
        return
    order = sorted(notebooks, key=lambda nb: -NOTEBOOK_SECONDS.get(nb.path.stem, float("inf")))
    items[:] = [i for nb in order for i in (*notebooks[nb], NotebookResults.from_parent(nb, name="results"))] + others
