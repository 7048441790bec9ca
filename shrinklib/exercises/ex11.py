"""Checkers for notebook 11's exercises (proxy tuning)."""

import math

from ._check import check


def check_proxy_logits(answer) -> None:
    """Exercise 1: proxy-tuned logits for large [1, 2, 0], tuned [0, 3, 1], untuned [0, 1, 2], alpha = 1."""
    expected = [1.0, 4.0, -1.0]
    check("proxy_logits", answer,
          lambda a: len(list(a)) == 3 and all(math.isclose(float(x), y) for x, y in zip(a, expected)),
          "add the tuned small model's logits to the large model's and subtract the untuned ones, token by token")


def check_gap_closed(answer) -> None:
    """Exercise 2: fraction of the gap closed for untuned 10%, proxy-tuned 50%, tuned directly 60%."""
    expected = (0.5 - 0.1) / (0.6 - 0.1)
    check("gap_closed", answer, lambda a: math.isclose(float(a), expected, rel_tol=1e-3),
          "(proxy − untuned) / (tuned − untuned), with the accuracies as fractions")
