"""Checks shared by the merge methods: one finite weight per model, tensors of one shape, a
finite result. A merge that cannot be right is refused before anything is written."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_weights(weights, n: int, what: str = "weights", normalize: bool = False) -> list[float]:
    """One finite number per model (default 1.0 each); with `normalize` their sum must not be 0."""
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"{len(weights)} {what} for {n} models; give exactly one per model")
    if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"{what} must be finite numbers, got {weights}")
    if normalize and sum(weights) == 0:
        raise ValueError(f"{what} {weights} sum to 0, and a normalized merge divides by their sum; give weights "
                         "with a nonzero sum, or normalize=False")
    return [float(w) for w in weights]


def check_shapes(name: str, tensors: list[Tensor], base: Tensor | None = None, labels: list[str] | None = None,
                 base_label: str = "the base") -> None:
    """Every model's tensor `name` has the reference's shape (the base's, else the first model's)."""
    labels = labels or [f"model {i}" for i in range(len(tensors))]
    ref, ref_label = (base, base_label) if base is not None else (tensors[0], labels[0])
    for t, label in zip(tensors, labels):
        if t.shape != ref.shape:
            raise ValueError(f"tensor {name!r}: {label} has shape {tuple(t.shape)}, {ref_label} {tuple(ref.shape)}; "
                             "merging needs models of one architecture and one vocabulary")


def check_finite(name: str, merged: Tensor) -> Tensor:
    """The merged tensor, or ValueError if it holds inf/NaN (a model would come out broken)."""
    if merged.is_floating_point() and not torch.isfinite(merged).all():
        bad = (~torch.isfinite(merged)).sum().item()
        raise ValueError(f"merged tensor {name!r} has {bad} non-finite value(s) (inf/NaN): check the inputs for "
                         "non-finite weights and the merge weights; nothing is written")
    return merged
