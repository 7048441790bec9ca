"""Task arithmetic: add scaled task vectors τ_i = θ_i − θ_base to the base model
(Ilharco et al., 2023, https://arxiv.org/abs/2212.04089): `merge_task_vectors` without
sparsification or consensus."""

from __future__ import annotations

from torch import Tensor

from .task_vectors import merge_task_vectors, task_vector  # noqa: F401 (task_vector re-exported)


def merge_task_arithmetic(base: Tensor, tensors: list[Tensor], weights: list[float] | None = None,
                          scale: float = 1.0) -> Tensor:
    """θ = θ_base + λ Σ_i w_i τ_i.

    Args:
        base: the tensor of the shared starting model.
        tensors: the same tensor from each fine-tuned model.
        weights: one weight w_i per model (default 1 each).
        scale: λ, the scaling of the summed task vector (0 returns the base).
    """
    return merge_task_vectors(base, tensors, weights, scale=scale)
