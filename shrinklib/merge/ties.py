"""TIES-merging: trim each task vector to its largest entries, elect a sign per entry, and
average only the entries that agree with it (Yadav et al., 2023,
https://arxiv.org/abs/2306.01708). TIES = task arithmetic + magnitude trim + sign consensus:
`merge_task_vectors(sparsify="magnitude", consensus="sign")`."""

from __future__ import annotations

from torch import Tensor

from .task_vectors import disjoint_mean, elect_sign, merge_task_vectors, trim_magnitude  # noqa: F401 (re-exported)


def merge_ties(base: Tensor, tensors: list[Tensor], weights: list[float] | None = None, density: float = 0.2,
               scale: float = 1.0) -> Tensor:
    """θ = θ_base + λ · disjoint_mean(trim(τ_i), elect(trim(τ_i))).

    Args:
        base: the tensor of the shared starting model.
        tensors: the same tensor from each fine-tuned model.
        weights: per-model weights of the disjoint mean (default 1 each, as in the paper).
        density: fraction k of each task vector kept by the trim (the paper's default 0.2).
        scale: λ applied to the merged task vector (the paper uses 1 without validation).
    """
    return merge_task_vectors(base, tensors, weights, density, scale, sparsify="magnitude", consensus="sign")
