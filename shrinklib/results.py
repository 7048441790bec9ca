"""The one place that writes results, figures and the reproduction report.

Results files share one shape:
    {"notebook": "02_post_training_quantization", "params": {...}, "metrics": {...},
     "claims": [{"claim": ..., "source": ..., "holds": true, "evidence": {...}}]}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import atomic_path, atomic_write_text

FIGSIZE = (7.0, 4.0)  # inches; one size for every figure of the suite
DPI = 110


def outputs_dir() -> Path:
    """`$SHRINKLIB_OUTPUTS`, else the repository's `outputs/` folder."""
    env = os.environ.get("SHRINKLIB_OUTPUTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "outputs"


@dataclass
class Claim:
    """One claim of a paper tested at teaching scale."""

    claim: str
    source: str  # the paper and its table/figure
    holds: bool
    evidence: dict = field(default_factory=dict)
    asserted: bool = True  # False where the notebook reports but does not assert (not robust at this scale)


class Results:
    """Collects a notebook's parameters, metrics and claims; `save()` writes the JSON."""

    def __init__(self, notebook: str, params: dict | None = None):
        self.notebook = notebook
        self.params = dict(params or {})
        self.metrics: dict = {}
        self.claims: list[Claim] = []

    def claim(self, claim: str, source: str, holds: bool, evidence: dict, assert_it: bool = True) -> Claim:
        """Record a claim; with `assert_it`, a claim that no longer holds raises AssertionError
        (after it is recorded), so a run that stops reproducing the paper fails its test."""
        c = Claim(claim, source, bool(holds), _jsonable(evidence), assert_it)
        self.claims.append(c)
        if assert_it and not c.holds:
            self.save()
            raise AssertionError(f"Claim does not hold: {claim} ({source}); evidence: {c.evidence}")
        return c

    def to_dict(self) -> dict:
        return {
            "notebook": self.notebook,
            "params": _jsonable(self.params),
            "metrics": _jsonable(self.metrics),
            "claims": [asdict(c) for c in self.claims],
        }

    def save(self, name: str | None = None) -> Path:
        """Write `outputs/results/<name or notebook>.json` atomically and return its path."""
        path = outputs_dir() / "results" / f"{name or self.notebook}.json"
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path


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
            if not c.get("asserted", True):
                mark += " (reported)"
            rows.append((r["notebook"], c["claim"], c["source"], mark))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict], floatfmt: str = ".3g") -> str:
    """A list of dicts (same keys) as a Markdown table string, for "paper vs ours" cells."""
    if not rows:
        return ""
    keys = list(rows[0])

    def fmt(v):
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    head = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n"
    return head + "\n".join("| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows)
