"""DARE: drop each task-vector entry with probability p and rescale the survivors by
1/(1 − p), then merge (Yu et al., 2024, "Language Models are Super Mario",
https://arxiv.org/abs/2311.03099)."""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_weights
from .task_arithmetic import task_vector
from .ties import disjoint_mean, elect_sign


def drop_and_rescale(tau: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """τ̃ = m ⊙ τ / (1 − p), m ~ Bernoulli(1 − p), with keep rate 1 − p = `density`; the mask is
    drawn on the generator's device (the CPU by default) and moved to τ's."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density (keep rate 1 - p) must be in (0, 1], got {density}")
    if density == 1.0:
        return tau.clone()
    device = generator.device if generator is not None else torch.device("cpu")
    keep = (torch.rand(tau.shape, generator=generator, device=device) < density).to(tau.device)
    return tau * keep / density


def merge_dare(base: Tensor, tensors: list[Tensor], weights: list[float] | None = None, density: float = 0.5,
               scale: float = 1.0, seed: int = 0, sign_consensus: bool = False) -> Tensor:
    """DARE then task arithmetic (`dare_linear`), or then TIES' sign election and disjoint
    mean (`dare_ties`, with `sign_consensus=True`).

    Args:
        density: keep rate 1 − p of each task vector's entries.
        seed: seed of the drop masks (model i uses seed + i), drawn on the CPU so that a merge is
            the same on every device.
        sign_consensus: elect a sign and average the agreeing entries, as in TIES.
    """
    weights = check_weights(weights, len(tensors))
    taus = []
    for i, t in enumerate(tensors):
        g = torch.Generator().manual_seed(seed + i)
        taus.append(drop_and_rescale(task_vector(t, base), density, g))
    taus = torch.stack(taus)  # (M, ...)
    w = torch.tensor(weights, dtype=torch.float32, device=base.device)
    if sign_consensus:
        tau_m = disjoint_mean(taus, elect_sign(taus * w.view(-1, *[1] * base.ndim)), w)
    else:
        tau_m = (taus * w.view(-1, *[1] * base.ndim)).sum(0)
    return (base.float() + scale * tau_m).to(base.dtype)
