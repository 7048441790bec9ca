"""Checkers for notebook 11's exercises (proxy tuning)."""

import math

import torch

from ._check import check, check_function


def check_proxy_logits(answer) -> None:
    """Exercise 1: proxy-tuned logits for large [2, 0, 1], tuned [1, 1, 3], untuned [0, 2, 1], alpha = 1."""
    expected = [3.0, -1.0, 3.0]
    check("proxy_logits", answer,
          lambda a: len(list(a)) == 3 and all(math.isclose(float(x), y) for x, y in zip(a, expected)),
          "add the tuned small model's logits to the large model's and subtract the untuned ones, token by token")


def check_gap_closed(answer) -> None:
    """Exercise 2: fraction of the gap closed for untuned 10%, proxy-tuned 50%, tuned directly 60%."""
    expected = (0.5 - 0.1) / (0.6 - 0.1)
    check("gap_closed", answer, lambda a: math.isclose(float(a), expected, rel_tol=1e-3),
          "(proxy − untuned) / (tuned − untuned), with the accuracies as fractions")


def check_proxy_probs(fn) -> None:
    """Exercise 3 (code): `proxy_probs(large, tuned, untuned, alpha)`, the proxy-tuned next-token
    distribution softmax(large + alpha · (tuned − untuned)) for logits (V,)."""
    ln3, t = math.log(3.0), torch.tensor
    cases = [
        ((t([0.0, 0.0]), t([ln3, 0.0]), t([0.0, 0.0]), 1.0), [0.75, 0.25]),  # softmax(ln 3, 0) = (3/4, 1/4)
        ((t([0.0, 0.0]), t([2 * ln3, 0.0]), t([0.0, 0.0]), 0.5), [0.75, 0.25]),  # alpha scales the offset
        ((t([ln3, 0.0]), t([1.0, 1.0]), t([5.0, 5.0]), 1.0), [0.75, 0.25]),  # a constant offset changes nothing
        ((t([0.0, 0.0, 0.0]), t([1.0, 2.0, 3.0]), t([1.0, 2.0, 3.0]), 2.0), [1 / 3, 1 / 3, 1 / 3]),  # tuned = untuned
    ]
    check_function("proxy_probs", fn, cases,
                   "add alpha times (tuned − untuned) to the large model's logits, then softmax over the vocabulary "
                   "so the probabilities sum to 1")
