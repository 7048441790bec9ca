import pytest

from shrinklib.exercises.ex12 import POINTS, check_gguf_size_mib, check_pareto_points, check_q4_1_bits_per_weight


def test_solutions_pass(capsys):
    check_q4_1_bits_per_weight(5.0)
    check_gguf_size_mib(576 * 1536 / 32 * 34 / 1024)
    check_pareto_points(["A", "B", "D"])
    assert capsys.readouterr().out.count("correct") == 3


def test_wrong_answers_raise_and_none_is_not_attempted(capsys):
    with pytest.raises(AssertionError, match="float16"):
        check_q4_1_bits_per_weight(4.0)
    with pytest.raises(AssertionError):
        check_gguf_size_mib(864)
    with pytest.raises(AssertionError, match="dominated"):
        check_pareto_points(["A", "B", "C", "D"])
    check_pareto_points(None)
    assert "not attempted" in capsys.readouterr().out


def test_pareto_answer_matches_the_library():
    from shrinklib.results import pareto_front

    assert {k for k in POINTS if k in pareto_front({k: v for k, v in POINTS.items()})} == {"A", "B", "D"}
