"""Checkers for notebook 02's exercises."""

from ._check import check


def check_gptq_update(answer) -> None:
    """Exercise 1: w = [0.3, 0.5], H = [[2, 1], [1, 2]], the first weight rounds to 0: the second weight after GPTQ's update."""
    # H⁻¹ = [[2, -1], [-1, 2]] / 3; δ₂ = -(w₁ - q₁) · H⁻¹₁₂ / H⁻¹₁₁ = -0.3 · (-1/3) / (2/3) = +0.15
    check("gptq_update", answer, lambda a: abs(float(a) - 0.65) < 1e-6,
          "the update is -(w1 - q1) / [H^-1]_11 · [H^-1]_12, with H^-1 = [[2, -1], [-1, 2]] / 3")


def check_smooth_scale(answer) -> None:
    """Exercise 2: SmoothQuant's s for a channel with max|X| = 16 and max|W| = 4 at α = 0.5."""
    check("smooth_scale", answer, lambda a: abs(float(a) - 2.0) < 1e-6,
          "s = max|X|^α / max|W|^(1-α) (SmoothQuant Eq. 4)")
