"""The solutions of notebooks 04 and 05's exercises pass their checkers; wrong ones fail."""

import pytest
import torch

from shrinklib.exercises import ex04, ex05
from shrinklib.prune import magnitude_mask, wanda_mask


def test_ex04_solutions_agree_with_the_library():
    W, x = torch.tensor(ex04.W), torch.tensor(ex04.X_NORM)
    ex04.check_magnitude_mask(magnitude_mask(W, 0.5, per="row").int().tolist())
    ex04.check_wanda_mask(wanda_mask(W, x, 0.5).int().tolist())
    ex04.check_two_four_bytes(0.5625)


def test_ex05_solutions():
    ex05.check_mlp_params(3 * 576 * 1229)
    ex05.check_gqa_heads(2 * 576 * 384)
    ex05.check_sliced_block_params(432 * 960 + 576 * 432 + 3 * 432 * 1536 + 2 * 432 * 432)


@pytest.mark.parametrize("fn, wrong", [(ex04.check_magnitude_mask, [[1, 1, 0, 0], [1, 1, 0, 0]]),
                                       (ex04.check_two_four_bytes, 0.5), (ex05.check_mlp_params, 0),
                                       (ex05.check_gqa_heads, 1), (ex05.check_sliced_block_params, 2)])
def test_wrong_answers_fail(fn, wrong):
    with pytest.raises(AssertionError, match="hint"):
        fn(wrong)


def test_none_is_not_attempted(capsys):
    ex04.check_wanda_mask(None)
    ex05.check_gqa_heads(None)
    assert capsys.readouterr().out.count("not attempted") == 2
