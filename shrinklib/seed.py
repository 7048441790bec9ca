"""Determinism: one call fixes every seed and the thread count."""

import os
import random

import numpy as np
import torch


def seed_everything(seed: int = 0, threads: int | None = 2) -> None:
    """Seed Python, NumPy and PyTorch, and fix the CPU thread count.

    Args:
        seed: the seed for every generator.
        threads: torch intra-op threads (results of float reductions depend on it);
            None leaves the current setting.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    if threads is not None:
        torch.set_num_threads(min(threads, os.cpu_count() or threads))
