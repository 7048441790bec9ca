"""AWQ (Lin et al., 2024, https://arxiv.org/abs/2306.00978): protect the weights that see large
activations by scaling input channel j by s_j = mean|x_j|^α (searched on calibration data)
before quantizing, folding 1/s into the previous operation; then search a clipping ratio
per group of weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .formats import grouped, int_params, n_groups, quantize_codes, dequantize_codes


def fake_quant(W: Tensor, bits: int, group_size: int, symmetric: bool, clip: float | Tensor = 1.0) -> Tensor:
    """RTN quantize-dequantize of W (out, in) on an integer grid."""
    s, z = int_params(W, bits, group_size, symmetric, clip)
    return dequantize_codes(quantize_codes(W, s, z, bits, group_size), s, z, group_size)


@torch.no_grad()
def awq_search_scale(Ws: list[Tensor], X: Tensor, x_mean: Tensor, bits: int, group_size: int, symmetric: bool,
                     n_grid: int = 20) -> tuple[Tensor, float]:
    """The per-input-channel scale s = x_mean^α / norm minimising Σ_W ‖Q(W·s)(X/s)ᵀ - WXᵀ‖² over α.

    Args:
        Ws: weights (out_k, in) sharing the input X.
        X: (n, in) calibration inputs; x_mean: (in,) mean |x| per channel.
        n_grid: α takes the values 0, 1/n_grid, ..., (n_grid-1)/n_grid (α = 0 is plain RTN).

    Returns:
        s (in,) and the best α.
    """
    refs = [X @ W.T for W in Ws]  # (n, out_k) float outputs
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_mean.clamp_min(1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # keep the scales centred around 1
        loss = sum(((X / s) @ fake_quant(W * s, bits, group_size, symmetric).T - ref).pow(2).mean().item()
                   for W, ref in zip(Ws, refs))
        if loss < best[0]:
            best = (loss, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def awq_search_clip(W: Tensor, X: Tensor, bits: int, group_size: int, symmetric: bool,
                    ratios: tuple[float, ...] = tuple(1 - 0.05 * k for k in range(10))) -> Tensor:
    """Per (row, group) clipping ratio minimising the group's output error on X.

    Args:
        W: (out, in); X: (n, in) calibration inputs. Returns ratios (out, n_groups).
    """
    out, d = W.shape
    G, g = n_groups(d, group_size), group_size
    Xg = torch.cat([X, X.new_zeros(X.shape[0], G * g - d)], 1).T.reshape(G, g, -1)  # (G, g, n), zero-padded
    best_err = torch.full((out, G), float("inf"), device=W.device)
    best = torch.ones(out, G, device=W.device)
    for r in ratios:
        diff = grouped(fake_quant(W, bits, group_size, symmetric, r) - W, g)  # (out, G, g)
        if G * g > d:
            diff[:, -1, g - (G * g - d):] = 0  # padded columns of a short last group
        err = torch.einsum("ogk,gkn->ogn", diff, Xg).pow(2).mean(-1)  # (out, G)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, torch.full_like(best, r), best)
    return best
