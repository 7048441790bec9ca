"""The one place that writes results, figures and the reproduction report.

Results files share one shape:
    {"notebook": "02_post_training_quantization", "params": {...}, "metrics": {...},
     "claims": [{"claim": ..., "source": ..., "holds": true, "evidence": {...}}],
     "tolerances": {"ppl.*": 0.02, "size_bytes.*": 0, "seconds.*": null}}

`tolerances` says how far each metric may move across CPUs and BLAS builds. A metric's name
is its path in `metrics` joined by "." (`ppl.gptq/4bit`; a list of dicts or lists is indexed,
`layers.0.ms`; a list of plain values is one metric, compared element by element). Keys are
metric names or `fnmatch` patterns; the exact name wins, else the longest matching pattern.
A value is a relative tolerance (`0.02`; `0` = exact), `{"rel": r, "abs": a}` (|new - stored|
<= a + r·|stored|, for values near zero), or `None`: not compared (wall-clock times, speeds).
`compare_results` holds a fresh results file to the stored one: the test suite runs it after
executing each notebook.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import atomic_path, atomic_write_text

FIGSIZE = (7.0, 4.0)  # inches; one size for every figure of the suite
DPI = 110


STORED_RESULTS = Path(__file__).resolve().parent.parent / "outputs" / "results"  # the committed results files


def outputs_dir() -> Path:
    """`$SHRINKLIB_OUTPUTS`, else the repository's `outputs/` folder."""
    env = os.environ.get("SHRINKLIB_OUTPUTS")
    return Path(env) if env else STORED_RESULTS.parent


@dataclass
class Claim:
    """One claim of a paper tested at teaching scale."""

    claim: str
    source: str  # the paper and its table/figure
    holds: bool
    evidence: dict = field(default_factory=dict)
    asserted: bool = True  # False where the notebook reports but does not assert (not robust at this scale)
    timed: bool = False  # the verdict rests on wall-clock times: reported, never asserted nor compared across runs
    reason: str = ""  # a reported claim that does not hold: the scientific reason it fails at this scale


class Results:
    """Collects a notebook's parameters, metrics, claims and tolerances; `save()` writes the JSON.

    Args:
        notebook: the notebook's name, e.g. "02_post_training_quantization".
        params: its parameters (compared exactly between runs).
        tolerances: metric name or pattern -> how far it may move across CPUs (see the module
            docstring); `save()` refuses metrics that no entry covers. Also settable later as
            `results.tolerances`.
        assert_claims: False records every claim without raising (a notebook's `assert_claims`
            parameter: a run on another model records which claims hold there instead of
            stopping at the first that does not).
    """

    def __init__(self, notebook: str, params: dict | None = None, tolerances: dict | None = None,
                 assert_claims: bool = True):
        if not isinstance(assert_claims, bool):
            raise TypeError(f"assert_claims must be True or False, got {assert_claims!r}")
        self.notebook = notebook
        self.assert_claims = assert_claims
        self.params = dict(params or {})
        self.metrics: dict = {}
        self.claims: list[Claim] = []
        self.tolerances = dict(tolerances or {})
        check_tolerances(self.tolerances)

    def claim(self, claim: str, source: str, holds: bool, evidence: dict, assert_it: bool = True,
              timed: bool = False, reason: str = "") -> Claim:
        """Record a claim; with `assert_it` (and the notebook's `assert_claims`), a claim that no longer
        holds raises AssertionError (after it is recorded), so a run that stops reproducing the paper
        fails its test. A `timed` claim (its verdict compares wall-clock times, which depend on the
        machine and its load) is recorded and reported but never asserted, and its verdict is not
        compared with the stored one, as wall-clock metrics are not. `reason`: for a claim reported
        because it does not hold here, why (a finding about the method or the model, not the budget);
        stored with it and listed under the reproduction report."""
        c = Claim(claim, source, bool(holds), _jsonable(evidence), assert_it and not timed, bool(timed), reason)
        self.claims.append(c)
        if c.asserted and self.assert_claims and not c.holds:
            self._write()  # the failing claim is the error to report, covered tolerances or not
            raise AssertionError(f"Claim does not hold: {claim} ({source}); evidence: {c.evidence}")
        return c

    def point(self, label: str, size_bytes: float, ppl: float, baseline_ppl: float, kl: float | None = None,
              latency_s: float | None = None) -> Point:
        """Record one model of this notebook for the suite's frontier (`metrics["points"][label]`;
        declare tolerances for `points.*` like the other metrics, None for `points.*.latency_s`). See `Point`."""
        p = Point(self.notebook, label, size_bytes, ppl, baseline_ppl, kl, latency_s)
        self.metrics.setdefault("points", {})[label] = p.stored()
        return p

    def to_dict(self) -> dict:
        return {
            "notebook": self.notebook,
            "params": _jsonable(self.params),
            "metrics": _jsonable(self.metrics),
            "claims": [{k: v for k, v in asdict(c).items() if k not in ("timed", "reason") or v} for c in self.claims],  # when set
            "tolerances": dict(self.tolerances),
        }

    def save(self, name: str | None = None) -> Path:
        """Write `outputs/results/<name or notebook>.json` atomically and return its path.

        Raises:
            ValueError: a tolerance is malformed, or a metric has no tolerance.
        """
        check_tolerances(self.tolerances)
        missing = [n for n in flatten_metrics(_jsonable(self.metrics)) if tolerance_of(n, self.tolerances) is None]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(f"{self.notebook}: no tolerance covers the metrics {shown}; declare how far each may move "
                             "across CPUs in results.tolerances (name or fnmatch pattern -> relative tolerance, 0 for exact, "
                             '{"rel": r, "abs": a}, or None for wall-clock figures that are not compared)')
        return self._write(name)

    def _write(self, name: str | None = None) -> Path:
        path = outputs_dir() / "results" / f"{name or self.notebook}.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path


def flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """Metric name -> value: dict keys joined by ".", lists of dicts or lists indexed ("layers.0.ms");
    a list of plain values is one metric."""
    flat = {}
    items = metrics.items() if isinstance(metrics, dict) else enumerate(metrics)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            sub = flatten_metrics(value, name + ".")
        else:
            sub = {name: value}
        clash = flat.keys() & sub.keys()
        if clash:
            raise ValueError(f"two metrics flatten to the same name {sorted(clash)[0]!r}")
        flat.update(sub)
    return flat


def check_tolerances(tolerances: dict) -> None:
    """Raise ValueError naming the first malformed entry of a `tolerances` mapping."""
    if not isinstance(tolerances, dict):
        raise ValueError(f"tolerances must be a dict of metric name or pattern -> tolerance, got {type(tolerances).__name__}")
    for key, tol in tolerances.items():
        ok = isinstance(key, str) and (tol is None or _nonneg(tol) or (
            isinstance(tol, dict) and tol and set(tol) <= {"rel", "abs"} and all(_nonneg(v) for v in tol.values())))
        if not ok:
            raise ValueError(f"tolerance {key!r}: {tol!r} is not a relative tolerance >= 0, "
                             '{"rel": r, "abs": a} with r, a >= 0, or None (not compared)')


def tolerance_of(name: str, tolerances: dict) -> tuple[str, float | dict | None] | None:
    """(the entry, its tolerance) covering a metric: the exact name, else the longest matching
    pattern (the first declared among equals); None when nothing covers it."""
    if name in tolerances:
        return name, tolerances[name]
    matches = [p for p in tolerances if fnmatch.fnmatchcase(name, p)]
    if not matches:
        return None
    best = max(matches, key=len)
    return best, tolerances[best]


def within(stored, fresh, tol) -> bool:
    """Whether a fresh metric value is within `tol` of the stored one (lists element by element;
    strings, booleans and None exactly)."""
    if tol is None:
        return True
    rel, abs_ = (tol.get("rel", 0.0), tol.get("abs", 0.0)) if isinstance(tol, dict) else (tol, 0.0)
    if _number(stored) and _number(fresh):
        return abs(fresh - stored) <= abs_ + rel * abs(stored)
    if isinstance(stored, list) and isinstance(fresh, list):
        return len(stored) == len(fresh) and all(within(a, b, tol) for a, b in zip(stored, fresh))
    return type(stored) is type(fresh) and stored == fresh


def compare_results(stored: dict, fresh: dict) -> list[str]:
    """Every difference between a stored results file and a fresh run that its tolerances do not
    allow, one line each naming the notebook, the metric (or parameter, or claim), both values and
    the tolerance; [] when the fresh run reproduces the stored one."""
    nb = stored.get("notebook", "?")
    problems = []

    def problem(msg: str) -> None:
        problems.append(f"{nb}: {msg}")

    if fresh.get("notebook") != nb:
        problem(f"the fresh results are of notebook {fresh.get('notebook')!r}")
    sp, fp = stored.get("params", {}), fresh.get("params", {})
    for key in [k for k in sp if k not in fp] + [k for k in fp if k not in sp]:
        problem(f"parameter {key}: stored {sp.get(key, '(absent)')!r}, new {fp.get(key, '(absent)')!r}")
    for key in [k for k in sp if k in fp and sp[k] != fp[k]]:
        problem(f"parameter {key}: stored {sp[key]!r}, new {fp[key]!r} (parameters are compared exactly)")
    tolerances = stored.get("tolerances")
    if not isinstance(tolerances, dict):
        problem("the stored results file declares no tolerances: re-store it (make notebooks)")
        return problems
    if fresh.get("tolerances") != tolerances:
        problem(f"tolerances: stored {tolerances}, new {fresh.get('tolerances')}: the notebook's declaration changed; "
                "re-store its results deliberately (make notebooks)")
    sm, fm = flatten_metrics(stored.get("metrics", {})), flatten_metrics(fresh.get("metrics", {}))
    for name in [n for n in sm if n not in fm]:
        problem(f"metric {name}: stored {_show(sm[name])}, missing from the new results")
    for name in [n for n in fm if n not in sm]:
        problem(f"metric {name}: new {_show(fm[name])}, not in the stored results")
    for name in [n for n in sm if n in fm]:
        entry = tolerance_of(name, tolerances)
        if entry is None:
            problem(f"metric {name}: no tolerance declared for it")
        elif not within(sm[name], fm[name], entry[1]):
            problem(f"metric {name}: stored {_show(sm[name])}, new {_show(fm[name])}{_change(sm[name], fm[name], entry[1])}, "
                    f"tolerance {_describe(entry[1])} (from {entry[0]!r})")
    problems += [f"{nb}: {msg}" for msg in _compare_claims(stored.get("claims", []), fresh.get("claims", []))]
    return problems


def compare_files(stored: str | Path, fresh: str | Path) -> list[str]:
    """`compare_results` of two results files; a missing file is a problem of its own."""
    stored, fresh = Path(stored), Path(fresh)
    for path, what in ((stored, "stored"), (fresh, "fresh")):
        if not path.is_file():
            return [f"{stored.stem}: no {what} results file {path}"]
    return compare_results(json.loads(stored.read_text()), json.loads(fresh.read_text()))


def _compare_claims(stored: list[dict], fresh: list[dict]) -> list[str]:
    """Claims are matched by their text: the same claims, each with the same verdict."""
    problems = []
    sc, fc = {c["claim"]: c for c in stored}, {c["claim"]: c for c in fresh}
    problems += [f"claim {t!r}: stored, missing from the new results" for t in sc if t not in fc]
    problems += [f"claim {t!r}: new, not in the stored results" for t in fc if t not in sc]
    for text in [t for t in sc if t in fc]:
        s, f = sc[text], fc[text]
        if s.get("timed", False) != f.get("timed", False):
            problems.append(f"claim {text!r}: timed was {s.get('timed', False)}, now {f.get('timed', False)}")
        elif s["holds"] != f["holds"] and not s.get("timed", False):
            problems.append(f"claim {text!r}: holds was {s['holds']}, now {f['holds']} "
                            f"(stored evidence {s.get('evidence')}, new {f.get('evidence')})")
        if s.get("asserted", True) != f.get("asserted", True):
            problems.append(f"claim {text!r}: asserted was {s.get('asserted', True)}, now {f.get('asserted', True)}")
    return problems


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _nonneg(v) -> bool:
    return _number(v) and math.isfinite(v) and v >= 0


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:.8g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_show(x) for x in v[:6]) + f", ... ({len(v)} values)]"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def _change(stored, fresh, tol) -> str:
    """' (relative change 3.1e-02)' for numbers; for lists, the first element out of tolerance."""
    if _number(stored) and _number(fresh) and stored != 0:
        return f" (relative change {abs(fresh - stored) / abs(stored):.1e})"
    if isinstance(stored, list) and isinstance(fresh, list) and len(stored) == len(fresh):
        i = next(i for i, (a, b) in enumerate(zip(stored, fresh)) if not within(a, b, tol))
        return f" (first at index {i}: {_show(stored[i])} -> {_show(fresh[i])}{_change(stored[i], fresh[i], tol)})"
    return ""


def _describe(tol) -> str:
    if isinstance(tol, dict):
        return " + ".join(f"{k} {v:g}" for k, v in sorted(tol.items(), key=lambda kv: kv[0] != "rel"))
    return "exact" if tol == 0 else f"rel {tol:g}"


def _jsonable(obj):
    """Plain JSON types: tuples-as-keys joined, tensors and numpy scalars as floats, NaN as None."""
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else "/".join(map(str, k)) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    return str(obj)


def style() -> None:
    """The suite's one matplotlib style."""
    import matplotlib as mpl

    mpl.rcParams.update(
        {
            "figure.figsize": FIGSIZE,
            "figure.dpi": DPI,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
            "legend.frameon": False,
            "svg.hashsalt": "shrinklib",
        }
    )


def new_figure(ncols: int = 1, nrows: int = 1, **kw):
    """A figure in the suite's style: `fig, ax = new_figure()` (width scales with columns)."""
    import matplotlib.pyplot as plt

    style()
    w, h = FIGSIZE
    return plt.subplots(nrows, ncols, figsize=(w * max(1, ncols * 0.6), h * max(1, nrows * 0.8)), **kw)


def save_figure(fig, name: str) -> Path:
    """Save `outputs/figures/<name>.png` atomically (fixed metadata so reruns are byte-stable)."""
    path = outputs_dir() / "figures" / f"{name}.png"
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def load_all_results(folder: str | Path | None = None) -> list[dict]:
    """Every results JSON in `outputs/results`, sorted by file name."""
    folder = Path(folder) if folder else outputs_dir() / "results"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def claims_table(results: list[dict]) -> str:
    """The suite's reproduction report: one row per claim of every notebook."""
    rows = [("notebook", "claim", "source", "holds")]
    for r in results:
        for c in r.get("claims", []):
            mark = "yes" if c["holds"] else "NO"
            if c.get("timed", False):
                mark += " (timed, this machine)"
            elif not c.get("asserted", True):
                mark += " (reported)"
            rows.append((r["notebook"], c["claim"], c["source"], mark))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    why = [f"- {r['notebook']}: {c['claim']}: {c['reason']}" for r in results for c in r.get("claims", [])
           if c.get("reason") and not c["holds"]]
    return "\n".join(lines + (["", "Why the reported claims that do not hold fail at this scale:", *why] if why else []))


def markdown_table(rows: list[dict], floatfmt: str = ".3g") -> str:
    """A list of dicts as a Markdown table string, for "paper vs ours" cells: one column per key, in
    the order keys first appear; a row without a key leaves its cell empty."""
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "\n".join("| " + " | ".join(fmt(r[k]) if k in r else "" for k in keys) + " |" for r in rows)


class Table:
    """A list of dicts shown as a table (`markdown_table`'s columns): rendered from Markdown in
    JupyterLab and on a repository page, as the Markdown text in a console."""

    def __init__(self, rows: list[dict], floatfmt: str = ".3g"):
        self.text = markdown_table(rows, floatfmt)

    def _repr_markdown_(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


def show_table(rows: list[dict], floatfmt: str = ".3g") -> None:
    """Display rows as a rendered table in a notebook (print it where there is no notebook)."""
    from IPython.display import display

    display(Table(rows, floatfmt))


# ----------------------------------------------------------------------------- the frontier


@dataclass(frozen=True)
class Point:
    """One model on the suite's size/quality frontier, as a notebook recorded it (`Results.point`).

    Notebooks evaluate on their own number of tokens, so `ppl` alone does not compare across
    notebooks: `baseline_ppl` is the uncompressed model's perplexity on the same tokens, and
    `ppl_ratio`, the ratio the frontier plots, compares (it also compares runs of other models).
    """

    notebook: str
    label: str
    size_bytes: float  # bytes as stored (a sparse model: its best sparse format)
    ppl: float  # perplexity on the evaluation tokens
    baseline_ppl: float  # the uncompressed model's perplexity on the same tokens
    kl: float | None = None  # mean KL(base ‖ this model) per token, where measured
    latency_s: float | None = None  # seconds per decoded token at batch 1, where measured (wall-clock)

    def __post_init__(self):
        optional = tuple(n for n in ("kl", "latency_s") if getattr(self, n) is not None)
        for name in ("size_bytes", "ppl", "baseline_ppl") + optional:
            v = getattr(self, name)
            if not (_number(v) and math.isfinite(v) and v >= 0) or (name != "kl" and v == 0):
                raise ValueError(f"point {self.label!r} of {self.notebook}: {name} must be a finite positive number, "
                                 f"got {v!r}")

    @property
    def ppl_ratio(self) -> float:
        return self.ppl / self.baseline_ppl

    def stored(self) -> dict:
        """What a results file holds for the point (without notebook and label, its keys)."""
        d = {"size_bytes": self.size_bytes, "ppl": self.ppl, "baseline_ppl": self.baseline_ppl}
        return d | {k: getattr(self, k) for k in ("kl", "latency_s") if getattr(self, k) is not None}


def frontier_points(results: list[dict]) -> list[Point]:
    """Every point recorded in results files (`metrics["points"]`), in file order; files without
    points contribute none."""
    return [Point(r["notebook"], label, **p) for r in results
            for label, p in r.get("metrics", {}).get("points", {}).items()]


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Labels of the points no other point dominates (smaller-or-equal in both coordinates and
    strictly smaller in one), sorted by the first coordinate. points: {label: (cost, error)}."""
    front = []
    for k, (x, y) in points.items():
        dominated = any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for k2, (x2, y2) in points.items() if k2 != k)
        if not dominated:
            front.append(k)
    return sorted(front, key=lambda k: points[k])


def label_points(ax, xy: dict[str, tuple[float, float]], fontsize: int = 7) -> None:
    """Write each key of `xy` beside its point (x, y), moving a label up or down, in steps of its
    height, until it overlaps no label placed before it and stays inside the figure (a thin line then
    joins it to its point; where no such place exists, it stays beside its point). Call it after the
    axes' scales and limits are set."""
    fig = ax.figure
    fig.tight_layout()
    fig.canvas.draw()  # label sizes in pixels need a drawn figure
    placed = []
    for label, (x, y) in sorted(xy.items(), key=lambda kv: (kv[1][1], kv[1][0])):
        text = ax.annotate(label, (x, y), xytext=(4, 2), textcoords="offset points", fontsize=fontsize,
                           arrowprops=dict(arrowstyle="-", lw=0.4, color="0.6", shrinkA=0, shrinkB=2))
        text.set_in_layout(False)  # a later tight_layout must not shrink the axes around far-moved labels
        dx = 4
        if text.get_window_extent().x1 > fig.bbox.x1:  # no room on the right: write it on the left of its point
            dx = -4
            text.set_horizontalalignment("right")
            text.set_position((dx, 2))
        free = None
        for k in range(60):
            box = text.get_window_extent()
            inside = fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
            if inside and not any(box.overlaps(b) for b in placed):
                free = text.get_position()
                break
            step = (k // 2 + 1) * (box.height + 1) * (1 if k % 2 == 0 else -1) * 72 / fig.dpi  # points
            text.set_position((dx, 2 + step))
        text.set_position(free or (dx, 2))  # no free place inside the figure: beside its point, overlapping
        placed.append(text.get_window_extent())
