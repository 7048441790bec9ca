"""Merging task vectors, written once: every method that adds task vectors τ_i = θ_i − θ_base to the
base is one function with a sparsification choice and a consensus choice, as in mergekit's
generalized task arithmetic:

    method            sparsify     consensus   paper
    task_arithmetic   -            -           Ilharco et al., 2023, https://arxiv.org/abs/2212.04089
    ties              magnitude    sign        Yadav et al., 2023, https://arxiv.org/abs/2306.01708
    dare_linear       random       -           Yu et al., 2024, https://arxiv.org/abs/2311.03099
    dare_ties         random       sign        Yu et al., 2024

Sparsify: "magnitude" keeps the fraction `density` of each τ_i with the largest |τ| (TIES'
trim); "random" keeps each entry with probability `density` and rescales it by 1/density
(DARE's drop and rescale). Consensus: "sign" elects a sign per entry and averages only the
entries that agree with it (TIES' elect and disjoint mean); none sums the weighted τ_i.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_weights

SPARSIFY = ("magnitude", "random")
CONSENSUS = ("sign",)


def task_vector(tensor: Tensor, base: Tensor) -> Tensor:
    """τ = θ_ft − θ_base, in float32."""
    return tensor.float() - base.float()


def trim_magnitude(tau: Tensor, density: float) -> Tensor:
    """Keep the round(density · numel) entries of largest |τ| and zero the rest (TIES step 1, "trim")."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    k = int(round(density * tau.numel()))
    if k >= tau.numel():
        return tau.clone()
    if k == 0:
        return torch.zeros_like(tau)
    mag = tau.abs()
    keep = mag >= mag.flatten().kthvalue(tau.numel() - k + 1).values  # |τ| at least the k-th largest
    if keep.sum() != k:  # ties at the threshold: keep exactly k by index
        keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
        keep[mag.flatten().topk(k).indices] = True
        keep = keep.view_as(tau)
    return tau * keep


def drop_and_rescale(tau: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """τ̃ = m ⊙ τ / (1 − p), m ~ Bernoulli(1 − p), with keep rate 1 − p = `density` (DARE); the mask is
    drawn on the generator's device (the CPU by default) and moved to τ's."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density (keep rate 1 - p) must be in (0, 1], got {density}")
    if density == 1.0:
        return tau.clone()
    device = generator.device if generator is not None else torch.device("cpu")
    keep = (torch.rand(tau.shape, generator=generator, device=device) < density).to(tau.device)
    return tau * keep / density


def elect_sign(taus: Tensor) -> Tensor:
    """γ = sgn(Σ_i τ̂_i): the sign with the larger total mass per entry (TIES step 2, "elect")."""
    return torch.sign(taus.sum(0))  # taus: (M, ...) -> (...)


def disjoint_mean(taus: Tensor, gamma: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean over the models whose τ̂_i agrees with γ, per entry (TIES step 3)."""
    agree = (torch.sign(taus) == gamma) & (taus != 0)  # (M, ...)
    w = weights.view(-1, *[1] * gamma.ndim)  # (M, 1, ...)
    num = (w * taus * agree).sum(0)
    den = (w * agree).sum(0)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def merge_task_vectors(base: Tensor, tensors: list[Tensor], weights: list[float] | None = None,
                       density: float | list[float] = 1.0, scale: float = 1.0, sparsify: str | None = None,
                       consensus: str | None = None, seed: int = 0) -> Tensor:
    """θ = θ_base + λ · combine_i(w_i, sparsify(τ_i)), τ_i = θ_i − θ_base.

    Args:
        base: the tensor of the shared starting model.
        tensors: the same tensor from each fine-tuned model.
        weights: one weight w_i per model (default 1 each).
        density: the fraction of each τ_i kept by `sparsify` (one for all models, or one per model).
        scale: λ applied to the merged task vector (0 returns the base).
        sparsify: None, "magnitude" (TIES' trim) or "random" (DARE's drop and rescale).
        consensus: None (Σ_i w_i τ_i) or "sign" (TIES' sign election and disjoint mean).
        seed: seed of the random masks (model i uses seed + i), drawn on the CPU so that a merge is
            the same on every device.
    """
    weights = check_weights(weights, len(tensors))
    densities = [density] * len(tensors) if isinstance(density, (int, float)) else check_weights(density, len(tensors), "densities")
    if sparsify not in (None, *SPARSIFY) or consensus not in (None, *CONSENSUS):
        raise ValueError(f"sparsify must be None or one of {SPARSIFY}, consensus None or one of {CONSENSUS}; got "
                         f"{sparsify!r}, {consensus!r}")
    taus = [task_vector(t, base) for t in tensors]
    if sparsify == "magnitude":
        taus = [trim_magnitude(tau, d) for tau, d in zip(taus, densities)]
    elif sparsify == "random":
        taus = [drop_and_rescale(tau, d, torch.Generator().manual_seed(seed + i)) for i, (tau, d) in enumerate(zip(taus, densities))]
    if consensus == "sign":
        stacked = torch.stack(taus)  # (M, ...)
        w = torch.tensor(weights, dtype=torch.float32, device=base.device)
        tau_m = disjoint_mean(stacked, elect_sign(stacked * w.view(-1, *[1] * base.ndim)), w)
    else:
        tau_m = sum(w * tau for w, tau in zip(weights, taus))
    return (base.float() + scale * tau_m).to(base.dtype)
