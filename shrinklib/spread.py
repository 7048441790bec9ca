"""How far each metric moves across CPU configurations, and the tolerance the suite's rule gives it.

    python -m shrinklib.spread notebooks/02_post_training_quantization.ipynb [...] [--configs native,avx2,...] [--jobs 2]

Executes each notebook once per configuration (below) in a fresh process, each into its own
outputs folder under `--work` (default `build/spread`; results already there, newer than the
notebook, are reused; `--reuse` keeps older ones too, e.g. after an edit of the tolerances alone;
`--force` re-runs everything), then writes `outputs/spread/NN_topic.json` and prints a
table: every metric's value in each configuration (and in the committed results file, which may
come from another CPU), its spread, the tolerance the notebook declares and the one the rule
gives, and every claim whose verdict differs between configurations.

The rule (`suggest`): a metric declared `None` (wall-clock times, speeds) is not compared. A value
identical in every configuration keeps an exact declaration (0) if it has one (integers, sizes,
analytic values), else gets the float floor `FLOOR`. A value that moves gets
    max(FLOOR, K × the largest relative deviation between two configurations),
rounded up to one significant digit; an entry declared absolute ({"abs": a}, for values near
zero) gets K × the largest absolute deviation the same way, at least FLOOR × the largest |value|
(FLOOR itself for zeros). A pattern's suggestion is the largest
of its metrics'. Strings, lists of integers and other discrete values that move cannot be given
a tolerance: they are listed, like flipped claims, as results the experiment must make robust.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import permutations
from pathlib import Path

from .io import atomic_write_text
from .results import STORED_RESULTS, flatten_metrics, tolerance_of

REPO = STORED_RESULTS.parent.parent
K = 3  # tolerance = K × the largest deviation measured between two configurations
FLOOR = 1e-4  # relative: float32 sums reorder with vector width and threads (1e-5 measured here); 10x for CPUs not measured
# name -> (description, environment); every configuration fixes its thread count
CONFIGS = {
    "native": ("this CPU's best paths (AVX-512/VNNI here), 1 thread", {"SHRINKLIB_THREADS": "1"}),
    "native-2t": ("this CPU's best paths, 2 threads (the default run)", {"SHRINKLIB_THREADS": "2"}),
    "avx2": ("torch, MKL, oneDNN and the kernels on AVX2, as on an AVX2-only CPU, 1 thread",
             {"SHRINKLIB_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
              "ONEDNN_MAX_CPU_ISA": "AVX2", "SHRINKLIB_SIMD": "avx2"}),
    "sse": ("torch without AVX, MKL and oneDNN limited to SSE4, scalar kernels, 1 thread",
            {"SHRINKLIB_THREADS": "1", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
             "ONEDNN_MAX_CPU_ISA": "SSE41", "SHRINKLIB_SIMD": "scalar"}),
}
STORED = "stored"  # the committed results file, as one more column


def config_env(name: str) -> dict:
    """The process environment of one configuration (threads also for OpenMP and MKL)."""
    env = {**os.environ, **CONFIGS[name][1]}
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = env["SHRINKLIB_THREADS"]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def execute(notebook: Path, config: str, work: Path, force: bool, reuse: bool = False) -> dict:
    """Run one notebook under one configuration (unless its results are already there: newer than
    the notebook, or any with `reuse`); returns {"results": dict or None, "error": str or None}."""
    out = work / config
    path = out / "results" / f"{notebook.stem}.json"
    stale = path.is_file() and path.stat().st_mtime < notebook.stat().st_mtime and not reuse
    if force or not path.is_file() or stale:
        path.unlink(missing_ok=True)
        env = {**config_env(config), "SHRINKLIB_OUTPUTS": str(out)}
        cmd = [sys.executable, "-m", "shrinklib.run", str(notebook), "--out", str(out / "notebooks")]
        print(f"  {notebook.stem} [{config}] ...", flush=True)
        t0 = time.perf_counter()
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        status = "ok" if run.returncode == 0 else "FAILED"
        print(f"  {notebook.stem} [{config}] {status} in {time.perf_counter() - t0:.0f} s", flush=True)
        error = None if run.returncode == 0 else (run.stderr.strip().splitlines() or ["?"])[-1]
        (out / f"{notebook.stem}.error").unlink(missing_ok=True)
        if error:
            atomic_write_text(out / f"{notebook.stem}.error", error + "\n")
    error_file = out / f"{notebook.stem}.error"
    error = error_file.read_text().strip() if error_file.is_file() else None
    return {"results": json.loads(path.read_text()) if path.is_file() else None, "error": error}


def run_all(notebooks: list[Path], configs: list[str], work: Path, jobs: int, force: bool, reuse: bool = False) -> dict:
    """{notebook stem: {config: execute(...)}}; at most `jobs` threads busy at once."""
    threads = {c: int(CONFIGS[c][1]["SHRINKLIB_THREADS"]) for c in configs}
    free, cond = [jobs], threading.Condition()

    def task(nb, config):
        need = min(threads[config], jobs)
        with cond:
            cond.wait_for(lambda: free[0] >= need)
            free[0] -= need
        try:
            return execute(nb, config, work, force, reuse)
        finally:
            with cond:
                free[0] += need
                cond.notify_all()

    tasks = [(nb, c) for nb in notebooks for c in configs]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        done = list(pool.map(lambda t: task(*t), tasks))
    runs: dict = {}
    for (nb, c), r in zip(tasks, done):
        runs.setdefault(nb.stem, {})[c] = r
    return runs


def round_up(x: float) -> float:
    """x rounded up to one significant digit (0.0123 -> 0.02); 0 stays 0."""
    if x <= 0:
        return 0.0
    unit = 10.0 ** math.floor(math.log10(x))
    return float(f"{math.ceil(x / unit - 1e-9) * unit:.1g}")


def deviations(values: list) -> tuple[float, float] | None:
    """(largest relative, largest absolute) deviation between two of the values (lists element by
    element); None when they differ in something that is not a number."""
    if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
        parts = [deviations(list(col)) for col in zip(*values)]
        if any(p is None for p in parts):
            return None
        return max((p[0] for p in parts), default=0.0), max((p[1] for p in parts), default=0.0)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        rel = max((abs(a - b) / abs(b) if b else (math.inf if a != b else 0.0) for a, b in permutations(values, 2)), default=0.0)
        return rel, max((abs(a - b) for a, b in permutations(values, 2)), default=0.0)
    return (0.0, 0.0) if all(v == values[0] and type(v) is type(values[0]) for v in values) else None


def _integral(v) -> bool:
    return isinstance(v, (int, str, bool)) or v is None or (isinstance(v, list) and all(_integral(x) for x in v))


def _discrete(v) -> bool:
    """A label, a verdict or a selection (a list of indices or names), as opposed to a quantity."""
    if isinstance(v, list):
        return all(_integral(x) for x in v)
    return isinstance(v, (str, bool)) or v is None


def suggest(values: list, declared) -> tuple[object, str]:
    """(the rule's tolerance, a note) for one metric's values across configurations; the
    tolerance is "varies" where no tolerance can hold them (a discrete value that moves)."""
    if declared is None:
        return None, "not compared"
    dev = deviations(values)
    if dev is None or (dev != (0.0, 0.0) and all(_discrete(v) for v in values)):
        return "varies", "a discrete value that differs between configurations"
    rel, abs_ = dev
    if isinstance(declared, dict) and "abs" in declared:
        return {"abs": round_up(max(K * abs_, FLOOR * (_magnitude(values) or 1.0)))}, "absolute"
    if dev == (0.0, 0.0):
        return (0.0, "exact everywhere") if declared == 0 or all(_integral(v) for v in values) else (FLOOR, "float floor")
    if math.isinf(rel):
        return "varies", "moves away from zero: declare an absolute tolerance"
    return round_up(max(FLOOR, K * rel)), f"{K} x spread" if K * rel > FLOOR else "float floor"


def _magnitude(values: list) -> float:
    flat = [x for v in values for x in (v if isinstance(v, list) else [v]) if isinstance(x, (int, float))]
    return max((abs(x) for x in flat), default=0.0)


def _looser(a, b) -> bool:
    """Whether tolerance a allows more than b (for the per-pattern maximum)."""
    key = lambda t: (math.inf if t is None else t if isinstance(t, (int, float)) else t.get("abs", 0) + t.get("rel", 0))
    return key(a) > key(b)


def analyse(notebook: str, runs: dict, extra: dict | None = None) -> dict:
    """The spread record of one notebook: values per configuration (plus the committed results
    file and `extra` {label: results folder}, e.g. runs on other machines, where their parameters
    match), spreads, declared and suggested tolerances per metric and per declared entry, claims
    per configuration. The declared tolerances are the committed file's, else the runs'."""
    columns = {c: r["results"] for c, r in runs.items() if r["results"] is not None and not r["error"]}
    for label, folder in {STORED: STORED_RESULTS, **(extra or {})}.items():
        path = Path(folder) / f"{notebook}.json"
        other = json.loads(path.read_text()) if path.is_file() else None
        if other and all(other.get("params") == res.get("params") for res in columns.values()):
            columns[label] = other
    declared = next((res.get("tolerances") for res in [columns.get(STORED, {}), *columns.values()] if res.get("tolerances")), {})
    flat = {c: flatten_metrics(res.get("metrics", {})) for c, res in columns.items()}
    names = list(dict.fromkeys(n for f in flat.values() for n in f))
    metrics, entries = {}, {}
    for name in names:
        values = {c: f[name] for c, f in flat.items() if name in f}
        entry = tolerance_of(name, declared)
        tol = entry[1] if entry else 0
        dev = deviations(list(values.values()))
        rule, note = suggest(list(values.values()), tol) if len(values) == len(flat) else ("varies", "missing in a configuration")
        metrics[name] = {"values": values, "rel_spread": dev and dev[0], "abs_spread": dev and dev[1],
                         "entry": entry and entry[0], "declared": tol if entry else "undeclared", "suggested": rule, "note": note}
        if entry and rule != "varies":
            e = entries.setdefault(entry[0], {"declared": entry[1], "suggested": rule, "metrics": 0})
            e["metrics"] += 1
            if _looser(rule, e["suggested"]):
                e["suggested"] = rule
    claims = {}
    for c, res in [*columns.items(), *[(c, r["results"]) for c, r in runs.items() if r["error"] and r["results"]]]:
        for cl in res.get("claims", []):
            claims.setdefault(cl["claim"], {})[c] = {"holds": cl["holds"], "evidence": cl.get("evidence")}
    record = {"notebook": notebook, "rule": {"K": K, "floor": FLOOR},
            "configs": {c: CONFIGS[c][0] if c in CONFIGS else "the committed results file" if c == STORED
                        else f"results from {(extra or {})[c]}" for c in columns},
            "failed": {c: r["error"] for c, r in runs.items() if r["error"]},
            "metrics": metrics, "entries": entries,
            "unused_entries": [p for p in declared if p not in entries and not any(m["entry"] == p for m in metrics.values())],
            "claims": claims,
            "flipped_claims": [t for t, by in claims.items() if len({v["holds"] for v in by.values()}) > 1]}
    record["declaration"] = declaration(record)
    return record


def declaration(rec: dict) -> dict:
    """The tolerances to declare: each declared entry at the largest of its metrics' rule values;
    where that is loose (over 100 x FLOOR), also the exact name of each metric whose own rule value
    is at least 3x tighter (not for list positions, which other parameters may shift)."""
    decl = {}
    for entry, e in rec["entries"].items():
        decl[entry] = e["suggested"]
        if not _looser(e["suggested"], 100 * FLOOR):
            continue
        for name, m in rec["metrics"].items():
            if (m["entry"] == entry and name != entry and not re.search(r"\.\d+(\.|$)", name)
                    and _looser(e["suggested"], _times(m["suggested"], 3))):
                decl[name] = m["suggested"]
    return decl


def _times(tol, k: float):
    if isinstance(tol, dict):
        return {key: v * k for key, v in tol.items()}
    return tol * k if isinstance(tol, (int, float)) else tol


def report(rec: dict) -> str:
    """The spread record as text: the metrics table, the suggested declaration, the problems."""
    cols = list(rec["configs"])
    fmt = lambda v: (f"{v:.6g}" if isinstance(v, float) else "[...]" if isinstance(v, list) else str(v))
    lines = [f"## {rec['notebook']}  (rule: max({rec['rule']['floor']:g}, {rec['rule']['K']} x spread), rounded up)", "",
             "| metric | " + " | ".join(cols) + " | rel spread | declared | rule |", "|---" * (len(cols) + 4) + "|"]
    for name, m in rec["metrics"].items():
        vals = [fmt(m["values"].get(c, "-")) for c in cols]
        spread = "-" if m["rel_spread"] is None else f"{m['rel_spread']:.1e}"
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {spread} | {m['declared']} | {m['suggested']} |")
    lines += ["", "tolerances by the rule, to declare in the notebook:", "results.tolerances = {" + ", ".join(
        f"{p!r}: {t!r}" for p, t in rec["declaration"].items()).replace("'", '"') + "}"]
    differ = {p: e for p, e in rec["entries"].items() if e["declared"] != e["suggested"]}
    lines += [f"  {p!r}: declared {e['declared']!r}, rule {e['suggested']!r}" for p, e in differ.items()]
    lines += [f"metric {n}: {m['note']}: {m['values']}" for n, m in rec["metrics"].items() if m["suggested"] == "varies"]
    lines += [f"claim flips: {t!r}: " + ", ".join(f"{c} {v['holds']}" for c, v in rec["claims"][t].items()) for t in rec["flipped_claims"]]
    lines += [f"failed under {c}: {e}" for c, e in rec["failed"].items()]
    lines += [f"entry {p!r} covers no metric" for p in rec["unused_entries"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shrinklib.spread", description=__doc__.split("\n")[0])
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    ap.add_argument("--jobs", type=int, default=1, help="threads in use at once (two 1-thread runs side by side with 2)")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "spread", help="outputs of the runs (reused)")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "spread", help="where the spread records go")
    ap.add_argument("--extra", action="append", default=[], metavar="LABEL=FOLDER",
                    help="results files of another machine (same parameters) as one more column")
    ap.add_argument("--force", action="store_true", help="re-run even where results are already in --work")
    ap.add_argument("--reuse", action="store_true", help="reuse results in --work even if older than the notebook")
    args = ap.parse_args(argv)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if unknown or missing or args.jobs < 1:
        ap.error(f"unknown configuration {unknown}" if unknown else f"no such notebook {missing}" if missing else "--jobs >= 1")
    if args.out.resolve() == STORED_RESULTS.resolve():
        ap.error("outputs/results holds the notebooks' results files only")
    extra = dict(e.split("=", 1) for e in args.extra if "=" in e)
    if len(extra) != len(args.extra):
        ap.error("--extra takes LABEL=FOLDER")
    runs = run_all([p.resolve() for p in args.notebooks], configs, args.work.resolve(), args.jobs, args.force, args.reuse)
    for notebook, by_config in runs.items():
        rec = analyse(notebook, by_config, extra)
        atomic_write_text(args.out / f"{notebook}.json", json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
        print(report(rec) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
