"""Checkers for notebook 12's exercises."""

from ._check import check


def check_q4_1_bits_per_weight(answer) -> None:
    """Exercise 1: storage cost of llama.cpp's Q4_1, in bits per weight."""
    expected = (2 + 2 + 32 * 4 / 8) * 8 / 32  # float16 d and m, 32 four-bit codes: 20 bytes per 32 weights
    check("q4_1_bits_per_weight", answer, lambda a: abs(float(a) - expected) < 1e-9,
          "a block of 32 weights stores a float16 scale d, a float16 minimum m and 32 four-bit codes")


def check_gguf_size_mib(answer) -> None:
    """Exercise 2: a 576×1536 matrix stored as Q8_0, in KiB."""
    expected = 576 * 1536 / 32 * 34 / 1024  # blocks of 32 int8 codes plus a float16 scale: 34 bytes
    check("gguf_size_kib", answer, lambda a: abs(float(a) - expected) < 0.05,
          "count the blocks of 32 weights; each takes 32 one-byte codes plus a 2-byte scale")


POINTS = {"A": (100, 12.0), "B": (50, 12.5), "C": (60, 13.0), "D": (30, 15.0), "E": (40, 16.0)}  # (MiB, perplexity)


def check_pareto_points(answer) -> None:
    """Exercise 3: which of POINTS lie on the size/perplexity Pareto frontier?"""
    check("pareto_points", answer, lambda a: set(a) == {"A", "B", "D"},
          "a point is dominated when another is no larger and no worse, and better in one of the two")
