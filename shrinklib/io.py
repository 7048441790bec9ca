"""Safe writes: nothing the suite saves is ever left half-written, and nothing of the user's is
replaced without being asked.

- `atomic_path(path)`: a temporary file beside `path`, renamed onto it when the writer is done.
- `staged_folder(folder)`: the same for a folder. An existing `folder` is replaced only when
  it is empty, when it carries the suite's marker file (`MARKER`, written into every folder
  the suite completes), or when the caller passes `overwrite=True`.
- Temporaries are named `.<name>.tmp-<host>-<pid>-<random>` (`.old-` for a folder being
  replaced); one whose process has died (a crash, SIGKILL) is removed by the next write into
  that folder. Files and folders are created with the user's umask.
- `SafetensorsReader`: the one lazy reader of safetensors files and folders (single or sharded).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".shrinklib-export"  # in every folder the suite wrote completely; such a folder may be replaced
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TEMP = re.compile(r"^\..+\.(tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-[0-9a-f]{8}(\.[^.]*)?$")


class TargetExistsError(FileExistsError):
    """The output path holds something the suite did not write; it is left untouched."""


def cache_dir() -> Path:
    """Where the suite keeps converted models, compiled kernels and compiled graphs
    (`$SHRINKLIB_CACHE` or ~/.cache/shrinklib)."""
    return Path(os.environ.get("SHRINKLIB_CACHE", Path.home() / ".cache" / "shrinklib"))


def _temp_name(target: Path, kind: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def umask() -> int:
    """The process's file-mode creation mask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the modes the user's umask gives new files:
    some writers (safetensors) create 0600 files whatever the umask."""
    mask = umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporaries of this naming in `folder` left by a dead process on this host
    (files and folders); returns what was removed. Those of live processes are left alone."""
    folder = Path(folder)
    if os.name == "nt" or not folder.is_dir():  # no portable liveness check there
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`.

    Use it for any writer that takes a file name (torch.save, safetensors, savefig):
    `with atomic_path(out) as tmp: save_file(tensors, tmp)`. The temporary keeps `path`'s
    suffix (writers that pick a format by it still work) and the user's umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    while True:
        tmp = _temp_name(path)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        apply_umask(tmp)  # the writer may have replaced the file with a 0600 one
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _listing(folder: Path, n: int = 4) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_folder_target(folder: str | Path, overwrite: bool = False, what: str = "output folder") -> None:
    """Raise TargetExistsError unless `folder` may be (re)written: absent, empty, marked as the
    suite's own (`MARKER`), or `overwrite`. A file of that name is never replaced."""
    folder = Path(os.path.abspath(folder))  # "." and ".." resolved: the folder's own name
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise TargetExistsError(f"{what} {folder} is a file or a link, not a folder; choose another path")
    if folder == Path.cwd() or folder in Path.cwd().parents:
        raise TargetExistsError(f"{what} {folder} is the current folder or holds it; choose a new folder")
    if not folder.exists() or overwrite or (folder / MARKER).is_file() or not any(folder.iterdir()):
        return
    raise TargetExistsError(f"{what} {folder} already exists and was not written by the suite (it holds "
                            f"{_listing(folder)}); choose a new path, or pass overwrite=True to replace it")


def check_file_target(path: str | Path, overwrite: bool = False, ours: bool = False, what: str = "output file") -> None:
    """Raise TargetExistsError unless the file `path` may be (re)written: absent, written by the suite
    (`ours`, which the caller reads from the file), or `overwrite`. A folder is never replaced."""
    path = Path(path)
    if path.is_dir():
        raise TargetExistsError(f"{what} {path} is a folder; give a file path")
    if path.exists() and not (overwrite or ours):
        raise TargetExistsError(f"{what} {path} already exists and was not written by the suite; choose a new "
                                "path, or pass overwrite=True to replace it")


def write_marker(folder: Path, **info) -> None:
    """Mark `folder` as written completely by the suite (what wrote it goes in the file)."""
    (folder / MARKER).write_text(json.dumps({"written_by": "shrinklib", **info}) + "\n", encoding="utf-8")


def temp_folder(target: str | Path) -> Path:
    """A new empty folder beside `target` with the temporaries' naming (removed by the next write
    into that folder if its process dies), after removing the stale ones there."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    tmp = _temp_name(target)
    tmp.mkdir(0o777)
    return tmp


def _replace(tmp: Path, folder: Path) -> None:
    """Move the finished `tmp` onto `folder` (an existing one goes away only after the swap)."""
    old = None
    if folder.exists():
        old = _temp_name(folder, "old")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(folder: str | Path, overwrite: bool = False, keep_failed: bool = False,
                  what: str = "output folder", **marker) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; when the block ends without error it is
    marked (`MARKER`, with `marker` as its content) and moved onto `folder`.

    The target is checked first (`check_folder_target`). On an error the temporary is removed,
    or with `keep_failed` moved to `<folder>.failed` (when that name is free or the suite's own)
    with the error in `FAILED.txt`, so a failed run is never mistaken for a finished one.
    """
    folder = Path(os.path.abspath(folder))
    check_folder_target(folder, overwrite, what)
    tmp = temp_folder(folder)
    try:
        yield tmp
        check_folder_target(folder, overwrite, what)  # nothing appeared there meanwhile
        write_marker(tmp, **marker)
        apply_umask(tmp)
        _replace(tmp, folder)
    except BaseException as err:
        failed = folder.with_name(folder.name + ".failed")
        if keep_failed and tmp.exists() and not failed.is_symlink() and (
                not failed.exists() or (failed / MARKER).is_file()):
            (tmp / "FAILED.txt").write_text(f"{type(err).__name__}: {err}\n", encoding="utf-8")
            write_marker(tmp, failed=True, **marker)
            _replace(tmp, failed)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        self.source = str(source)
        self.where = safetensors_files(source)
        self.handles: dict[Path, object] = {}

    def get(self, name: str):
        from safetensors import safe_open

        if name not in self.where:
            raise ValueError(f"{self.source} has no tensor {name!r}: merging and loading need models of one architecture")
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
