"""Checkers for notebook 02's exercises."""

import torch

from ._check import check, check_function


def check_gptq_update(answer) -> None:
    """Exercise 1: w = [0.3, 0.5], H = [[2, 1], [1, 2]], the first weight rounds to 0: the second weight after GPTQ's update."""
    # H⁻¹ = [[2, -1], [-1, 2]] / 3; δ₂ = -(w₁ - q₁) · H⁻¹₁₂ / H⁻¹₁₁ = -0.3 · (-1/3) / (2/3) = +0.15
    check("gptq_update", answer, lambda a: abs(float(a) - 0.65) < 1e-6,
          "the update is -(w1 - q1) / [H^-1]_11 · [H^-1]_12, with H^-1 = [[2, -1], [-1, 2]] / 3")


def check_smooth_scale(answer) -> None:
    """Exercise 2: SmoothQuant's s for a channel with max|X| = 16 and max|W| = 4 at α = 0.5."""
    check("smooth_scale", answer, lambda a: abs(float(a) - 2.0) < 1e-6,
          "s = max|X|^α / max|W|^(1-α) (SmoothQuant Eq. 4)")


def round_to_integers(column: torch.Tensor) -> torch.Tensor:
    """The grid of the GPTQ exercise: every integer."""
    return torch.round(column)


def check_gptq_columns(fn) -> None:
    """Exercise 3 (code): `gptq_columns(W, H, quantize)`, GPTQ without groups or lazy batches: quantize
    column after column with `quantize` (a function of one column (out,)) and spread each column's
    error over the columns not yet quantized, through the inverse Hessian."""
    H2 = torch.tensor([[2.0, 1.0], [1.0, 2.0]])  # H⁻¹ = [[2, -1], [-1, 2]] / 3: an error e in column 1 adds e / 2 to column 2
    cases = [
        # row 1: 0.3 -> 0 (error 0.3), 0.5 + 0.15 = 0.65 -> 1 (RTN would give 0); row 2: 0.8 -> 1, -0.2 - 0.1 -> 0
        ((torch.tensor([[0.3, 0.5], [0.8, -0.2]]), H2, round_to_integers), [[0.0, 1.0], [1.0, 0.0]]),
        # a diagonal Hessian (uncorrelated inputs): nothing to compensate, GPTQ is RTN
        ((torch.tensor([[0.3, 0.6, -1.2]]), torch.diag(torch.tensor([1.0, 2.0, 3.0])), round_to_integers), [[0.0, 1.0, -1.0]]),
        # three correlated columns, H⁻¹ = [[3, -2, 1], [-2, 4, -2], [1, -2, 3]] / 4: 0.4 -> 0 adds 0.4 · 2/3 to column 2
        # (0.567 -> 1, RTN: 0) and subtracts 0.4 / 3 from column 3 (0.167); column 2's error -0.433 then moves
        # column 3 by -0.433 / 2 (to -0.05 -> 0)
        ((torch.tensor([[0.4, 0.3, 0.3]]), torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 1.0], [0.0, 1.0, 2.0]]), round_to_integers),
         [[0.0, 1.0, 0.0]]),
    ]
    check_function("gptq_columns", fn, cases,
                   "Hinv = the upper Cholesky factor of H⁻¹ (torch.linalg.cholesky(torch.linalg.inv(H), upper=True)); for "
                   "each column i: q = quantize(W[:, i]), err = (W[:, i] - q) / Hinv[i, i], "
                   "W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]")
