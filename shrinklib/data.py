"""Corpora: the embedded default (CPython's own documentation) and `datasets` corpora.

The default corpus needs nothing outside a Python installation: the reference-manual
topics of `pydoc_data.topics` and the docstrings of standard-library modules (read with
`ast`, never imported). Documents are assigned to the calibration, training and evaluation
parts by a hash of their name, so the parts never overlap and never change between runs.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checks import check_fields
from .io import atomic_write_text

SPLITS = ("calib", "train", "eval")
# Of 20 hash buckets: 2 go to evaluation, 2 to calibration, 16 to training.
EVAL_BUCKETS, CALIB_BUCKETS, N_BUCKETS = 2, 2, 20
DOCSTRING_CHARS = 560_000  # about 130K SmolLM2 tokens of docstrings, beside ~120K of topics
SKIP_STDLIB = ("test", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip", "pydoc_data")


class CorpusNotFoundError(FileNotFoundError):
    """A corpus could not be found locally and could not be downloaded."""


@dataclass(frozen=True)
class Document:
    source: str  # "topics" or "docstrings" for the default corpus; the corpus name otherwise
    name: str
    text: str


@dataclass
class Corpus:
    """Documents by split: `corpus.parts["eval"]` is a list of `Document`."""

    name: str
    parts: dict[str, list[Document]]
    origin: str = ""  # where the documents came from (a text file's path), for messages

    def describe(self, split: str) -> str:
        """"the 'eval' split of corpus 'notes' (notes.txt, 3 documents in all)", for messages."""
        total = sum(len(docs) for docs in self.parts.values())
        return f"the {split!r} split of corpus {self.name!r} ({self.origin + ', ' if self.origin else ''}{total} documents in all)"

    def text(self, split: str, source: str | None = None) -> str:
        """All documents of a split (optionally of one source) joined by blank lines."""
        if split not in self.parts:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        docs = [d for d in self.parts[split] if source is None or d.source == source]
        if not docs:
            of = f" with source {source!r}" if source is not None else ""
            raise ValueError(f"{self.describe(split)} has no documents{of}: documents go to the calib, train and eval "
                             f"splits by a hash of their name (about {CALIB_BUCKETS}/{N_BUCKETS}, 16/{N_BUCKETS} and "
                             f"{EVAL_BUCKETS}/{N_BUCKETS}); use a longer corpus (more paragraphs)")
        return "\n\n".join(d.text for d in docs)

    def tokens(self, tokenizer, split: str, source: str | None = None, max_tokens: int | None = None) -> Tensor:
        """Token ids of a split as one 1-D tensor, truncated to `max_tokens`."""
        ids = tokenizer(self.text(split, source), return_tensors="pt", add_special_tokens=False).input_ids[0]
        return ids[:max_tokens] if max_tokens else ids


def bucket(name: str) -> str:
    """The split of a document, from a stable hash of its name."""
    b = int(hashlib.sha256(name.encode()).hexdigest(), 16) % N_BUCKETS
    return "eval" if b < EVAL_BUCKETS else "calib" if b < EVAL_BUCKETS + CALIB_BUCKETS else "train"


def _split(name: str, docs: list[Document]) -> Corpus:
    parts: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        parts[bucket(f"{d.source}/{d.name}")].append(d)
    return Corpus(name, parts)


def pydoc_topics() -> list[Document]:
    """The reference-manual topics that `help()` shows, one document each."""
    from pydoc_data.topics import topics

    return [Document("topics", k, topics[k].strip()) for k in sorted(topics)]


def module_docstrings(node: ast.AST) -> list[str]:
    """The docstrings of a parsed module: module, classes and functions, in source order."""
    found = []
    for n in ast.walk(node):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(n)
            if doc and len(doc) > 40:
                found.append(doc)
    return found


def stdlib_docstrings(max_chars: int = DOCSTRING_CHARS) -> list[Document]:
    """Docstrings of the standard library's modules (sorted by path), one document per
    module, until `max_chars` characters are collected."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in SKIP_STDLIB or part.startswith("_") for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        text = "\n\n".join(module_docstrings(tree))
        if text:
            docs.append(Document("docstrings", str(rel.with_suffix("")).replace("/", "."), text))
            total += len(text)
        if total >= max_chars:
            break
    return docs


def python_docs_corpus() -> Corpus:
    """The embedded default corpus: pydoc topics plus standard-library docstrings.

    Reading the standard library takes a few seconds, so the documents are cached (per
    Python version, whose documentation they are) as JSON beside the converted models.
    """
    from .models import cache_dir

    path = cache_dir() / f"corpus-pydoc-{sys.version.split()[0]}.json"
    if path.is_file():
        docs = [Document(**d) for d in json.loads(path.read_text())]
    else:
        docs = pydoc_topics() + stdlib_docstrings()
        atomic_write_text(path, json.dumps([d.__dict__ for d in docs]))
    return _split("pydoc", docs)



def _hf_dataset(path: str, name: str | None = None, progress: bool = True, **kw):
    import datasets

    quiet = not progress and not datasets.utils.are_progress_bars_disabled()
    if quiet:
        datasets.utils.disable_progress_bars()
    try:
        return datasets.load_dataset(path, name, **kw)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
        raise CorpusNotFoundError(
            f"Could not load the dataset '{path}'{f' ({name})' if name else ''} through `datasets` "
            "(looked in the local Hugging Face cache and on the hub). Download it where the hub is "
            f"reachable with `datasets.load_dataset({path!r}{f', {name!r}' if name else ''})` "
            "(it is cached under ~/.cache/huggingface), or pass a local text file as the corpus. "
            f"Cause: {err}"
        ) from err
    finally:
        if quiet:
            datasets.utils.enable_progress_bars()


def _docs(rows, source: str, prefix: str, field: str = "text") -> list[Document]:
    return [Document(source, f"{prefix}/{i}", r[field]) for i, r in enumerate(rows) if r[field].strip()]


def wikitext2_corpus() -> Corpus:
    """WikiText-2 (raw): calibration from validation, training from train, evaluation from
    test, as in the GPTQ and Wanda papers' evaluation."""
    ds = _hf_dataset("wikitext", "wikitext-2-raw-v1")
    return Corpus(
        "wikitext2",
        {
            "calib": _docs(ds["validation"], "wikitext2", "validation"),
            "train": _docs(ds["train"], "wikitext2", "train"),
            "eval": _docs(ds["test"], "wikitext2", "test"),
        },
    )


def c4_corpus() -> Corpus:
    """C4 (en): the first training shard for training and calibration (hash split), the
    first validation shard for evaluation."""
    files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
    ds = _hf_dataset("allenai/c4", data_files=files)
    train = _docs(ds["train"], "c4", "train")
    return Corpus(
        "c4",
        {
            "calib": [d for d in train if bucket(d.name) == "calib"],
            "train": [d for d in train if bucket(d.name) != "calib"],
            "eval": _docs(ds["validation"], "c4", "validation")[:2000],
        },
    )


def text_file_corpus(path: str | Path) -> Corpus:
    """A local text file read through `datasets`; paragraphs (blank-line separated) are the
    documents, split by hash."""
    path = Path(path)
    if not path.is_file():
        raise CorpusNotFoundError(f"No text file at {path}")
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise ValueError(f"corpus file {path} is empty; give a text file of paragraphs separated by blank lines")
    ds = _hf_dataset("text", data_files=str(path), progress=False, sample_by="paragraph")  # a local file: no bar
    corpus = _split(path.stem, _docs(ds["train"], path.stem, path.stem))
    corpus.origin = str(path)
    return corpus


CORPORA = {"pydoc": python_docs_corpus, "wikitext2": wikitext2_corpus, "c4": c4_corpus}


def load_corpus(name: str = "pydoc") -> Corpus:
    """Load a corpus: "pydoc" (embedded default), "wikitext2", "c4", or a path to a text file."""
    if name in CORPORA:
        return CORPORA[name]()
    if Path(name).suffix or Path(name).exists():
        return text_file_corpus(name)
    close = difflib.get_close_matches(name, CORPORA, n=1)
    raise CorpusNotFoundError(f"Unknown corpus {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}: use one of "
                              f"{sorted(CORPORA)} or a path to a text file")


def sample_windows(ids: Tensor, n: int, seq_len: int, seed: int = 0, what: str = "the text") -> Tensor:
    """`n` windows of `seq_len` tokens at reproducible random offsets of a 1-D id tensor.

    Args:
        what: names the text in errors (e.g. `corpus.describe("calib")`).

    Returns:
        (n, seq_len) token ids (the GPTQ paper's calibration: random segments).
    """
    if ids.numel() <= seq_len:
        raise ValueError(f"Need more than seq_len={seq_len} tokens, {what} has {ids.numel()}; use a longer "
                         "corpus or a shorter seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_batch(corpus: Corpus, tokenizer, n: int = 32, seq_len: int = 256, seed: int = 0, source=None) -> Tensor:
    """`n` calibration sequences of `seq_len` tokens drawn from the calibration part. (n, seq_len)."""
    return sample_windows(corpus.tokens(tokenizer, "calib", source), n, seq_len, seed, corpus.describe("calib"))


@dataclass(frozen=True)
class WindowConfig:
    """Training batches of `batch_size` random windows of `seq_len` tokens (distillation, pretraining)."""

    batch_size: int = 4  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence

    def __post_init__(self):
        check_fields(self)
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"batch_size ≥ 1 and seq_len ≥ 2 needed, got {self.batch_size}, {self.seq_len}")


def window_batches(ids: Tensor, config: WindowConfig, n_batches: int, seed: int = 0,
                   what: str = "the text") -> Callable[[int], dict]:
    """`batch(i)` for `shrinklib.train.train`: the i-th of `n_batches` fixed batches of random windows of
    a 1-D id tensor, {"input_ids": (batch_size, seq_len)}, drawn once with `seed`."""
    b = config.batch_size
    windows = sample_windows(ids, n_batches * b, config.seq_len, seed, what)  # (n_batches·b, L)
    return lambda i: {"input_ids": windows[i * b : (i + 1) * b]}
