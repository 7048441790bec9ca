"""The solutions of notebooks 01 and 02's exercises pass their checkers; wrong answers fail."""

import pytest
import torch

from shrinklib.exercises.ex01 import check_absmax_scale, check_bits_per_weight, check_q4_1_distinct
from shrinklib.exercises.ex02 import check_gptq_update, check_smooth_scale
from shrinklib.quant import quantize, smooth_scales


def test_solutions_01():
    check_absmax_scale(1.4 / 7)
    # the library fits the same scale and stores it as float16, as every backend does
    stored = quantize(torch.tensor([[0.7, -1.4, 0.35]]), "int", 4, None, symmetric=True).scales
    assert stored.item() == torch.tensor(1.4 / 7).half().item()
    check_bits_per_weight(4.5)
    check_q4_1_distinct(32)


def test_solutions_02():
    # the update with GPTQ's Cholesky formulation (rows of chol(H⁻¹)ᵀ), as gptq_quantize computes it
    H = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    w2 = 0.5 - (0.3 - 0.0) / U[0, 0] * U[0, 1]
    check_gptq_update(w2.item())
    check_smooth_scale(smooth_scales(torch.tensor([16.0]), [torch.tensor([[4.0]])], 0.5).item())


def test_wrong_and_missing_answers(capsys):
    with pytest.raises(AssertionError, match="hint"):
        check_absmax_scale(0.2 * 2)
    with pytest.raises(AssertionError):
        check_gptq_update(0.35)
    check_smooth_scale(None)
    assert "not attempted" in capsys.readouterr().out
