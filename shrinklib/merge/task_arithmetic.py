"""Task arithmetic: add scaled task vectors τ_i = θ_i − θ_base to the base model
(Ilharco et al., 2023, https://arxiv.org/abs/2212.04089)."""

from __future__ import annotations

from torch import Tensor

from .checks import check_weights


def task_vector(tensor: Tensor, base: Tensor) -> Tensor:
    """τ = θ_ft − θ_base, in float32."""
    return tensor.float() - base.float()


def merge_task_arithmetic(base: Tensor, tensors: list[Tensor], weights: list[float] | None = None,
                          scale: float = 1.0) -> Tensor:
    """θ = θ_base + λ Σ_i w_i τ_i.

    Args:
        base: the tensor of the shared starting model.
        tensors: the same tensor from each fine-tuned model.
        weights: one weight w_i per model (default 1 each).
        scale: λ, the scaling of the summed task vector (0 returns the base).
    """
    weights = check_weights(weights, len(tensors))
    tau = sum(w * task_vector(t, base) for w, t in zip(weights, tensors))
    return (base.float() + scale * tau).to(base.dtype)
