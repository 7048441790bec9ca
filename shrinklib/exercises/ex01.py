"""Checkers for notebook 01's exercises."""

import torch

from ._check import check, check_function


def check_absmax_scale(answer) -> None:
    """Exercise 1: the 4-bit symmetric (absmax) scale of the row [0.7, -1.4, 0.35]."""
    check("absmax_scale", answer, lambda a: abs(float(a) - 1.4 / 7) < 1e-6,
          "symmetric 4-bit codes go from -7 to 7: s = max|w| / (2^(b-1) - 1)")


def check_bits_per_weight(answer) -> None:
    """Exercise 2: storage bits per weight of 4-bit g64 with a float16 scale and a float16 zero per group."""
    check("bits_per_weight", answer, lambda a: abs(float(a) - (4 + 2 * 16 / 64)) < 1e-9,
          "each weight has its 4 bits, and each group of 64 shares 16 + 16 bits of scale and zero")


def check_q4_1_distinct(answer) -> None:
    """Exercise 3: at most how many distinct values a group of 64 of a Q4_1 model can hold."""
    check("q4_1_distinct", answer, lambda a: int(a) == 32 and float(a) == int(a),
          "a group of 64 is two Q4_1 blocks of 32, each with its own 16-value grid")


def check_zero_point_rtn(fn) -> None:
    """Exercise 4 (code): `zero_point_rtn(W, bits, group_size)`, W (out, in) rounded to a zero-point
    (min-max) grid fitted to each group of `group_size` consecutive columns of a row, read back as floats."""
    cases = [
        # one group: s = 1/3, z = 0, codes 0, 1 (0.6), 2 (2.1), 3 -> multiples of 1/3
        ((torch.tensor([[0.0, 0.2, 0.7, 1.0]]), 2, 4), [[0.0, 1 / 3, 2 / 3, 1.0]]),
        # the grid spans [min, max] exactly: s = (2 - (-1)) / 3 = 1, z = 1; 0.4 -> code 1 -> 0.0
        ((torch.tensor([[-1.0, 0.4, 1.2, 2.0]]), 2, 4), [[-1.0, 0.0, 1.0, 2.0]]),
        # two groups of 2 per row, each with its own grid: a group's min and max are always exact
        ((torch.tensor([[0.0, 3.0, -2.0, 2.0], [1.0, 1.5, 5.0, -5.0]]), 2, 2), [[0.0, 3.0, -2.0, 2.0], [1.0, 1.5, 5.0, -5.0]]),
        # groups of 3: (0, 0.9, 3) has s = 1 (0.9 -> 1), (6, 4.4, 0) has s = 2 (4.4 -> 4)
        ((torch.tensor([[0.0, 0.9, 3.0, 6.0, 4.4, 0.0]]), 2, 3), [[0.0, 1.0, 3.0, 6.0, 4.0, 0.0]]),
    ]
    check_function("zero_point_rtn", fn, cases,
                   "for each row and each group of group_size columns: s = (max - min) / (2^bits - 1), "
                   "z = -min / s, q = clamp(round(w / s + z), 0, 2^bits - 1), and read back s · (q - z)", tol=1e-3)
