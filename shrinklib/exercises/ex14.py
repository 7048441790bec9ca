"""Checkers for notebook 14's exercises."""

import torch

from ._check import check, check_function


def check_mx_scale(answer) -> None:
    """Exercise 1: the E8M0 scale of an MXFP4 block whose largest magnitude is 20."""
    # floor(log2 20) = 4, minus E2M1's emax 2: X = 2^2 = 4 (20 / 4 = 5 rounds to 4 or 6: ties to even give 4)
    check("mx_scale", answer, lambda a: abs(float(a) - 4.0) < 1e-9,
          "X = 2^(floor(log2(max|V|)) - emax), and E2M1's largest normal is 1.5 · 2^2 (emax = 2)")


def check_nvfp4_bits(answer) -> None:
    """Exercise 2: bits stored per weight by NVFP4 (blocks of 16, an 8-bit E4M3 scale each), the
    per-tensor FP32 scale neglected."""
    check("nvfp4_bits", answer, lambda a: abs(float(a) - 4.5) < 1e-9,
          "4 bits per element plus 8 scale bits shared by 16 elements")


def check_encode_mxfp4_block(fn) -> None:
    """Exercise 3 (code): `encode_mxfp4_block(v)` -> (scale, codes): the E8M0 scale (a float power of two)
    and the 4-bit E2M1 codes (sign bit 3, then 2 exponent bits and 1 mantissa bit; ints) of one block."""
    cases = [
        # max 6 -> floor(log2 6) = 2 -> X = 2^0; 6 = 0b0111, -0.5 = 0b1001, 1.25 ties to 1.0 (even) = 0b0010,
        # 2.5 ties to 2 = 0b0100, 0 = 0
        ((torch.tensor([6.0, -0.5, 1.25, 2.5, 0.0]),), (1.0, [7, 9, 2, 4, 0])),
        # max 20 -> X = 4: 20/4 = 5 ties to 4 (0b0110), 3/4 = 0.75 ties to 1.0 (0b0010), -7/4 = -1.75 ties to -2 (0b1100)
        ((torch.tensor([20.0, 3.0, -7.0, 1.0]),), (4.0, [6, 2, 12, 0])),
        # max 0.1 -> floor(log2 0.1) = -4 -> X = 2^-6 = 0.015625: 0.1/X = 6.4 saturates to 6 (0b0111), -0.05/X = -3.2 -> -3 (0b1101)
        ((torch.tensor([0.1, -0.05]),), (2.0**-6, [7, 13])),
    ]
    check_function("encode_mxfp4_block", fn, cases,
                   "X = 2^(floor(log2(max|v|)) - 2); round each v / X to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 "
                   "(ties to the even code), saturate at 6; the code is sign << 3 | the magnitude's index")
