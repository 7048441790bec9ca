"""Checkers for notebook 09's exercises (mixture of experts)."""

import math

import torch

from ._check import check, check_function


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


def check_top_k_gates(fn) -> None:
    """Exercise 4 (code): `top_k_gates(logits, k)`, the (T, k) gates of each token's k most probable
    experts, largest first, renormalized to sum to one."""
    e = math.e
    cases = [
        # probabilities ∝ (e², e, 1, e⁻¹): the top two renormalize to e² / (e² + e) and e / (e² + e)
        ((torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 2), [[e / (e + 1), 1 / (e + 1)]]),
        # probabilities ∝ (1, 3, 1, 1): 3/4 and 1/4 whichever of the tied experts comes second
        ((torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]]), 2), [[0.75, 0.25]]),
        # top-1: the one gate is always 1, whatever the logits (so it carries no gradient)
        ((torch.tensor([[0.0, 0.0, 3.0, 0.0], [5.0, -1.0, 0.0, 2.0]]), 1), [[1.0], [1.0]]),
        # three experts of equal probability out of three: thirds
        ((torch.zeros(1, 3), 3), [[1 / 3, 1 / 3, 1 / 3]]),
    ]
    check_function("top_k_gates", fn, cases,
                   "probs = logits.softmax(-1); gates = probs.topk(k, dim=-1).values; return gates / gates.sum(-1, keepdim=True)")
