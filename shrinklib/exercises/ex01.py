"""Checkers for notebook 01's exercises."""

from ._check import check


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
