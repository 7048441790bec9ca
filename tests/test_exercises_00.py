import math

import pytest

from shrinklib.exercises.ex00 import check_block_params, check_kv_cache_bytes, check_perplexity


def test_solutions_pass(capsys):
    check_kv_cache_bytes(2 * 32 * 8 * 128 * 8192 * 2)
    check_block_params(3_540_096)
    check_perplexity(round(math.exp(2.0), 3))
    assert capsys.readouterr().out.count("correct") == 3


def test_wrong_answers_fail_with_a_hint():
    with pytest.raises(AssertionError, match="KV head"):
        check_kv_cache_bytes(2 * 32 * 32 * 128 * 8192 * 2)  # query heads instead of KV heads
    with pytest.raises(AssertionError, match="hint"):
        check_block_params(3_538_944)  # norms forgotten
    with pytest.raises(AssertionError):
        check_perplexity("seven")


def test_unanswered_is_not_attempted(capsys):
    check_perplexity(None)
    assert "not attempted" in capsys.readouterr().out
