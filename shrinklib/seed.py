"""Determinism: one call fixes every seed and the thread count."""

import os
import random

import numpy as np
import torch

THREADS_ENV = "SHRINKLIB_THREADS"  # the thread count every notebook uses (default 2)


def default_threads() -> int:
    """`$SHRINKLIB_THREADS` if set (the test suite runs two notebooks at once with 1 each), else 2."""
    value = os.environ.get(THREADS_ENV, "2")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
    return int(value)


def seed_everything(seed: int = 0, threads: int | None | str = "auto") -> None:
    """Seed Python, NumPy and PyTorch, and fix the CPU thread count.

    Args:
        seed: the seed for every generator.
        threads: torch intra-op threads (results of float reductions depend on it);
            "auto": `$SHRINKLIB_THREADS`, else 2; None leaves the current setting.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if threads == "auto":
        threads = default_threads()
    if threads is not None:
        torch.set_num_threads(min(threads, os.cpu_count() or threads))
