"""Linear merge (a weighted average of weights): the model soup of Wortsman et al., 2022,
https://arxiv.org/abs/2203.05482, and WARM's weight average of reward models
(Ramé et al., 2024, https://arxiv.org/abs/2401.12187)."""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_weights


def merge_linear(tensors: list[Tensor], weights: list[float] | None = None, normalize: bool = True) -> Tensor:
    """θ = Σ_i w_i θ_i (divided by Σ_i w_i when `normalize`).

    Args:
        tensors: the same tensor from each model, all one shape.
        weights: one weight per model (default: equal).
        normalize: divide by the sum of weights, so equal weights give the plain mean.
    """
    weights = check_weights(weights, len(tensors), normalize=normalize)
    w = torch.tensor(weights, dtype=torch.float32, device=tensors[0].device)
    w = w.view(-1, *[1] * tensors[0].ndim)  # (M, 1, ...)
    stacked = torch.stack([t.float() for t in tensors])  # (M, ...)
    out = (w * stacked).sum(0)
    if normalize:
        out = out / w.sum()
    return out.to(tensors[0].dtype)
