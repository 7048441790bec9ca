"""Checkers for notebook 16's exercises."""

import math

import torch

from ._check import check, check_function


def check_autoround_reach(answer) -> None:
    """Exercise 1: the most an AutoRound offset V can change a weight's rounding, in grid steps."""
    # V is clipped to [-0.5, 0.5] and added to w/s before rounding: round(w/s + V) is round-up or round-down
    check("autoround_reach", answer, lambda a: abs(float(a) - 1.0) < 1e-9,
          "V lives in [-0.5, 0.5] and is added before rounding: the code can only go to the grid point just below "
          "or just above w/s, never further")


def check_recovered_share(answer) -> None:
    """Exercise 2: the share of RTN's loss that QAT recovers, in log perplexity, for fp32 13.4,
    RTN 1000 and QAT 100."""
    share = 1 - math.log(100 / 13.4) / math.log(1000 / 13.4)  # 0.534
    check("recovered_share", answer, lambda a: abs(float(a) - share) < 5e-3,
          "share = 1 - log(ppl_QAT / ppl_fp32) / log(ppl_RTN / ppl_fp32)")


def _values_and_grad(fn):
    """Call the student's fake quantizer on a leaf tensor; return its values and d(sum)/dw."""

    def run(w, scale):
        w = torch.tensor(w, requires_grad=True)
        y = fn(w, scale)
        y.sum().backward()
        return [y.detach().tolist(), w.grad.tolist() if w.grad is not None else [0.0] * len(w)]

    return run


def check_fake_quant(fn) -> None:
    """Exercise 3 (code): `fake_quant(w, scale)`: forward round(w / scale) · scale, backward the
    straight-through estimator (the gradient passes unchanged to w)."""
    cases = [
        # 0.26/0.5 = 0.52 -> 1 -> 0.5; -0.74/0.5 = -1.48 -> -1 -> -0.5; 1.5/0.5 = 3 -> 1.5; gradient 1 everywhere
        (([0.26, -0.74, 1.5], 0.5), [[0.5, -0.5, 1.5], [1.0, 1.0, 1.0]]),
        # -0.1 -> 0, 2.2 -> 2: the gradient is still 1, though round() has zero derivative almost everywhere
        (([-0.1, 2.2], 1.0), [[0.0, 2.0], [1.0, 1.0]]),
    ]
    check_function("fake_quant", None if fn is None else _values_and_grad(fn), cases,
                   "forward: torch.round(w / scale) * scale; backward: make the rounding invisible to autograd, "
                   "e.g. w + (q - w).detach()")
