"""The solutions of notebook 14's exercises pass their checkers; wrong answers fail with a hint."""

import pytest
import torch

from shrinklib.exercises.ex14 import check_encode_mxfp4_block, check_mx_scale, check_nvfp4_bits
from shrinklib.quant.mx import E2M1, bits_per_weight, encode_float, mx_block_scales


def encode_mxfp4_block(v):
    """The solution, through the library: the spec's scale rule, then E2M1 codes of v / X."""
    X = mx_block_scales(v.abs().max(), 2)
    return X.item(), encode_float(v / X, E2M1).tolist()


def encode_without_ties_to_even(v):
    X = mx_block_scales(v.abs().max(), 2)
    mags = E2M1[:8]
    idx = [int(torch.argmin((mags - abs(x)).abs() - 1e-6 * mags)) for x in (v / X).tolist()]  # ties go up
    return X.item(), [i | (8 if x < 0 else 0) for i, x in zip(idx, v.tolist())]


def encode_with_ceil_scale(v):  # a common mistake: X = 2^ceil(log2(max / 6)), so nothing clips
    X = 2.0 ** torch.ceil(torch.log2(v.abs().max() / 6)).item()
    return X, encode_float(v / X, E2M1).tolist()


def test_solutions(capsys):
    check_mx_scale(mx_block_scales(torch.tensor(20.0), 2).item())
    check_nvfp4_bits(bits_per_weight("nvfp4", 16))
    check_encode_mxfp4_block(encode_mxfp4_block)
    assert "correct on all 3 cases" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [encode_without_ties_to_even, encode_with_ceil_scale])
def test_wrong_solutions_fail_with_a_hint(wrong):
    with pytest.raises(AssertionError, match="hint"):
        check_encode_mxfp4_block(wrong)


def test_wrong_and_missing_answers(capsys):
    with pytest.raises(AssertionError, match="hint"):
        check_mx_scale(20 / 6)
    with pytest.raises(AssertionError, match="hint"):
        check_nvfp4_bits(4.25)
    check_mx_scale(None)
    assert "not attempted" in capsys.readouterr().out
