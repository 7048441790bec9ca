"""The solutions of notebooks 08 and 09's exercises, computed with the library, pass their checkers."""

import pytest
import torch

from shrinklib.exercises import ex08, ex09
from shrinklib.merge import merge_task_arithmetic, merge_ties
from shrinklib.moe import load_balancing_loss, router_z_loss


def test_ex08_solutions(capsys):
    ta = merge_task_arithmetic(torch.ones(2), [torch.tensor([3.0, 1.0]), torch.tensor([1.0, 5.0])], scale=0.5)
    ex08.check_task_arithmetic(ta.tolist())
    ties = merge_ties(torch.zeros(3), [torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, -2.0, 1.0])], density=2 / 3)
    ex08.check_ties_merge(ties.tolist())
    ex08.check_dare_rescale(2.0 / (1 - 0.75))
    ex08.check_dare_rescale(None)
    out = capsys.readouterr().out
    assert out.count("correct") == 3 and "not attempted" in out


def test_ex09_solutions(capsys):
    ex09.check_mixtral_skipped(6 * 3 * 4096 * 14336 * 32 / 1e9)
    probs = torch.tensor([[0.75, 0.25]] * 4)
    ex09.check_balance_loss(load_balancing_loss(probs, probs.topk(1).indices).item())
    ex09.check_z_loss(router_z_loss(torch.zeros(1, 4)).item())
    assert capsys.readouterr().out.count("correct") == 3


@pytest.mark.parametrize("check, wrong", [
    (ex08.check_task_arithmetic, [3.0, 5.0]), (ex08.check_ties_merge, [-0.5, -1.5, 0.75]), (ex08.check_dare_rescale, 0.5),
    (ex09.check_mixtral_skipped, 45.1), (ex09.check_balance_loss, 1.0), (ex09.check_z_loss, 0.0),
])
def test_wrong_answers_raise_with_a_hint(check, wrong):
    with pytest.raises(AssertionError, match="hint"):
        check(wrong)
