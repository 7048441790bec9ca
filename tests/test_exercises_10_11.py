import pytest

from shrinklib.exercises.ex10 import check_kv_bytes_per_token, check_smollm2_flops, check_tokens_per_call
from shrinklib.exercises.ex11 import check_gap_closed, check_proxy_logits


def test_solutions_pass():
    check_smollm2_flops(6 * 135e6 * 2e12)
    check_tokens_per_call((1 - 0.6**4) / 0.4)
    check_kv_bytes_per_token(2 * 22 * 4 * 64 * 2)
    check_proxy_logits([3, -1, 3])
    check_gap_closed(0.8)


def test_wrong_answers_fail():
    for check, wrong in [(check_smollm2_flops, 2 * 135e6 * 2e12), (check_tokens_per_call, 0.6 * 3),
                         (check_kv_bytes_per_token, 2 * 22 * 32 * 64 * 2), (check_proxy_logits, [1, 2, 0]),
                         (check_gap_closed, 0.5)]:
        with pytest.raises(AssertionError):
            check(wrong)


def test_not_attempted(capsys):
    for check in (check_smollm2_flops, check_tokens_per_call, check_kv_bytes_per_token, check_proxy_logits, check_gap_closed):
        check(None)
    assert capsys.readouterr().out.count("not attempted") == 5
