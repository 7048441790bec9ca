"""Checkers for notebook 09's exercises (mixture of experts)."""

import math

from ._check import check


def check_mixtral_skipped(answer) -> None:
    """Exercise 1: expert parameters of Mixtral-8x7B a token does not use, in billions."""
    d, f, layers, E, k = 4096, 14336, 32, 8, 2
    expected = (E - k) * 3 * d * f * layers / 1e9  # gate, up, down per expert
    check("mixtral_skipped", answer, lambda a: abs(float(a) - expected) < 0.05,
          "each expert is three d×f matrices; a token skips E − k experts in each of the 32 layers")


def check_balance_loss(answer) -> None:
    """Exercise 2: E = 2 experts, top-1, every token has router probabilities (0.75, 0.25)."""
    check("balance_loss", answer, lambda a: abs(float(a) - 1.5) < 1e-3,
          "every token goes to expert 0, so f = (1, 0); P = (0.75, 0.25); the loss is E · Σ f_i P_i")


def check_z_loss(answer) -> None:
    """Exercise 3: router z-loss of one token whose 4 router logits are all zero."""
    check("z_loss", answer, lambda a: abs(float(a) - math.log(4) ** 2) < 1e-3,
          "z-loss = (log Σ_j exp z_j)²; with four zeros the sum of exponentials is 4")
