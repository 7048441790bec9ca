"""Checkers for notebook 13's exercises."""

import torch

from ._check import check, check_function


def check_outlier_after_rotation(answer) -> None:
    """Exercise 1: a 576-channel activation is 0 everywhere except one channel of 120; the largest
    |entry| after the randomized Hadamard H·diag(±1)/√576."""
    # every entry of x·H·diag(s)/√n is ±120/√576 = ±120/24 = ±5
    check("outlier_after_rotation", answer, lambda a: abs(float(a) - 5.0) < 1e-6,
          "every row of a Hadamard matrix has entries ±1, so x·H/√n spreads the one value over all n channels "
          "with magnitude |x_j|/√n")


def check_sylvester_doublings(answer) -> None:
    """Exercise 2: Sylvester doublings from Paley's matrix of order 12 (q = 11) to SmolLM2's MLP width 1536."""
    check("sylvester_doublings", answer, lambda a: int(a) == 7 and float(a) == 7,
          "each Sylvester step doubles the order: 12 · 2^k = 1536")


def check_sylvester_step(fn) -> None:
    """Exercise 3 (code): `sylvester_step(H)` returns [[H, H], [H, −H]]."""
    H1 = torch.tensor([[1.0]])
    H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    H4 = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]])
    # a non-symmetric block (Paley's order-4 matrix from q = 3): the step must not transpose it
    P = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0], [-1.0, 1.0, -1.0, 1.0]])
    cases = [((H1,), H2), ((H2,), H4), ((P,), torch.cat([torch.cat([P, P], 1), torch.cat([P, -P], 1)], 0))]
    check_function("sylvester_step", fn, cases, "torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)")
