"""Checkers for notebook 08's exercises (model merging)."""

import torch

from ._check import check, check_function


def _close(a, want, tol=1e-3) -> bool:
    a = [float(x) for x in (a if hasattr(a, "__len__") else [a])]
    return len(a) == len(want) and all(abs(x - w) <= tol for x, w in zip(a, want))


def check_task_arithmetic(answer) -> None:
    """Exercise 1: base (1, 1), fine-tunes (3, 1) and (1, 5), λ = 0.5: the merged weights."""
    check("task_arithmetic", answer, lambda a: _close(a, [2.0, 3.0]),
          "τ1 = (2, 0), τ2 = (0, 4); θ = base + λ (τ1 + τ2)")


def check_ties_merge(answer) -> None:
    """Exercise 2: TIES of τ1 = (2, −1, 0.5), τ2 = (−3, −2, 1) on a zero base, density 2/3, λ = 1."""
    check("ties_merge", answer, lambda a: _close(a, [-3.0, -1.5, 0.0]),
          "trim keeps the 2 largest |τ| of each vector, the elected sign is that of the sum, "
          "then average only the kept entries that agree with it (an entry nobody keeps stays 0)")


def check_dare_rescale(answer) -> None:
    """Exercise 3: DARE with drop rate p = 0.75: what does a surviving entry τ = 2.0 become?"""
    check("dare_rescale", answer, lambda a: _close(a, [8.0]), "survivors are divided by the keep rate 1 − p")


def check_elect_and_mean(fn) -> None:
    """Exercise 4 (code): `elect_and_mean(taus)`, TIES's last two steps on task vectors taus (M, n) that
    are already trimmed: elect each entry's sign as the sign of Σ_i τ_i, then average only the nonzero
    entries that have that sign (0 where none has)."""
    cases = [
        # sums (-1, -3, 1.5): signs (-, -, +); entry 1 keeps only -3, entries 2 and 3 average both
        ((torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, 1.0]]),), [-3.0, -1.5, 0.75]),
        # a zero sum elects no sign (0); zeros (trimmed entries) do not count in the mean
        ((torch.tensor([[0.0, 1.0, 2.0], [0.0, -3.0, 0.0], [0.0, 1.0, -1.0]]),), [0.0, -3.0, 2.0]),
        # one model: its own vector
        ((torch.tensor([[0.5, -0.25]]),), [0.5, -0.25]),
    ]
    check_function("elect_and_mean", fn, cases,
                   "gamma = sign(taus.sum(0)); agree = (sign(taus) == gamma) & (taus != 0); "
                   "sum the agreeing entries and divide by how many agree (at least 1)")
