"""Checkers for notebook 04's exercises."""

from ._check import check

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
