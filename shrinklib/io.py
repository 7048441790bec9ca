"""Files: atomic writes (nothing the suite saves is ever left half-written) and the one lazy
safetensors reader."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    Use it for any writer that takes a file name (torch.save, safetensors, savefig):
    `with atomic_path(out) as tmp: save_file(tensors, tmp)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


INDEX = "model.safetensors.index.json"


def safetensors_files(source: str | Path) -> dict[str, Path]:
    """{tensor name: file} of a safetensors file or of a folder (single or sharded)."""
    from safetensors import safe_open

    p = Path(source)
    if p.is_file():
        with safe_open(p, "pt") as f:
            return {k: p for k in f.keys()}
    index = p / INDEX
    if index.is_file():
        return {k: p / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {p} (looked for model.safetensors and its index)")
    out = {}
    for f in files:
        with safe_open(f, "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


class SafetensorsReader:
    """The tensors of a safetensors file or folder (single or sharded), read on demand: memory
    holds only what the caller keeps. `get` keeps each file open for the next tensor."""

    def __init__(self, source: str | Path):
        self.where = safetensors_files(source)
        self.handles: dict[Path, object] = {}

    def get(self, name: str):
        from safetensors import safe_open

        f = self.where[name]
        if f not in self.handles:
            self.handles[f] = safe_open(f, "pt")
        return self.handles[f].get_tensor(name)

    def load(self, prefix: str = "") -> dict:
        """Every tensor whose name starts with `prefix`, keyed by the rest of its name. The files are
        closed afterwards, so their mapped pages leave this process's resident memory."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name, f in self.where.items():
            if name.startswith(prefix):
                by_file.setdefault(f, []).append(name)
        out = {}
        for f, names in by_file.items():
            with safe_open(f, "pt") as h:
                out.update({name[len(prefix):]: h.get_tensor(name) for name in names})
        return out
