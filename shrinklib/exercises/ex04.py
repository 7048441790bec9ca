"""Checkers for notebook 04's exercises."""

import torch

from ._check import check, check_function

W = [[0.5, -2.0, 1.0, 0.1], [3.0, -0.2, 0.4, -1.0]]  # the (2, 4) weight of exercises 1 and 2
X_NORM = [4.0, 0.1, 1.0, 30.0]  # ‖X_j‖ of its four inputs


def _as_mask(answer):
    return [[int(bool(v)) for v in row] for row in answer]


def check_magnitude_mask(answer) -> None:
    """Exercise 1: the keep-mask (1 = kept) of magnitude pruning per row at 50% of W."""
    expected = [[0, 1, 1, 0], [1, 0, 0, 1]]
    check("magnitude_mask", answer, lambda a: _as_mask(a) == expected,
          "in each row keep the two entries with the largest |w|; answer a 2×4 list of 0/1")


def check_wanda_mask(answer) -> None:
    """Exercise 2: the keep-mask of Wanda at 50% per row, with the input norms X_NORM."""
    expected = [[1, 0, 0, 1], [1, 0, 0, 1]]
    check("wanda_mask", answer, lambda a: _as_mask(a) == expected,
          "score each weight by |w_ij|·‖X_j‖ (row 0: 2, 0.2, 1, 3) and keep the two largest per row")


def check_two_four_bytes(answer) -> None:
    """Exercise 3: bytes of a 2:4 fp16 4096×4096 matrix (kept values + 2-bit index each) as a fraction of dense."""
    dense = 4096 * 4096 * 2
    sparse = 4096 * 2048 * 2 + 4096 * 2048 * 2 // 8  # half the values in fp16 + a 2-bit position per kept value
    check("two_four_bytes", answer, lambda a: abs(float(a) - sparse / dense) < 1e-3,
          "half of the values stay (2 bytes each) and each kept value carries a 2-bit index into its group of 4")


def check_wanda_layer_mask(fn) -> None:
    """Exercise 4 (code): `wanda_layer_mask(W, x_norm, sparsity)`, Wanda's score |W_ij|·‖X_j‖ with ONE
    threshold for the whole matrix (the comparison group of magnitude pruning) instead of per output row."""
    # scores of W with X_NORM: row 0 (2, 0.2, 1, 3), row 1 (12, 0.02, 0.4, 30)
    cases = [
        ((torch.tensor(W), torch.tensor(X_NORM), 0.75), [[0, 0, 0, 0], [1, 0, 0, 1]]),  # keep the 2 largest of 8: 30 and 12, both in row 1
        ((torch.tensor(W), torch.tensor(X_NORM), 0.25), [[1, 0, 1, 1], [1, 0, 1, 1]]),  # remove the 2 smallest: 0.02 and 0.2
        ((torch.tensor(W), torch.ones(4), 0.5), [[0, 1, 1, 0], [1, 0, 0, 1]]),  # equal norms: magnitude per layer
    ]
    check_function("wanda_layer_mask", fn, cases,
                   "score = |W| * x_norm (x_norm broadcasts over rows); remove the int(numel · sparsity) smallest scores "
                   "of the whole matrix; return a boolean (or 0/1) mask shaped like W, True = kept", tol=0)
