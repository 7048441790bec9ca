"""The solutions of notebook 16's exercises pass their checkers; wrong answers fail with a hint."""

import math

import pytest
import torch

from shrinklib.exercises.ex16 import check_autoround_reach, check_fake_quant, check_recovered_share


def fake_quant(w, scale):
    """The solution: the rounding forward, the identity backward (the straight-through estimator)."""
    q = torch.round(w / scale) * scale
    return w + (q - w).detach()


def fake_quant_without_ste(w, scale):  # rounds, but its gradient is zero almost everywhere
    return torch.round(w / scale) * scale


def fake_quant_wrong_forward(w, scale):  # the STE around a truncation instead of rounding
    return w + (torch.trunc(w / scale) * scale - w).detach()


def test_solutions(capsys):
    check_autoround_reach(1)
    check_recovered_share(1 - math.log(100 / 13.4) / math.log(1000 / 13.4))
    check_fake_quant(fake_quant)
    assert "correct on all 2 cases" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [fake_quant_without_ste, fake_quant_wrong_forward])
def test_wrong_solutions_fail_with_a_hint(wrong):
    with pytest.raises(AssertionError, match="hint"):
        check_fake_quant(wrong)


def test_wrong_and_missing_answers(capsys):
    with pytest.raises(AssertionError, match="hint"):
        check_autoround_reach(0.5)
    with pytest.raises(AssertionError, match="hint"):
        check_recovered_share(0.9)  # the share of the perplexity itself, (1000 - 100) / (1000 - 13.4)

    def stub(w, scale):
        raise NotImplementedError

    check_fake_quant(stub)
    check_fake_quant(None)
    check_recovered_share(None)
    assert capsys.readouterr().out.count("not attempted") == 3
