import pytest

from shrinklib.exercises.ex12 import (POINTS, check_gguf_size_mib, check_pareto_points, check_q4_1_bits_per_weight,
                                      check_stored_bytes)


def stored_bytes(W, bits):  # the solution of exercise 4
    n, nnz = W.numel(), int((W != 0).sum())
    return min(n * bits // 8, (n + nnz * bits) // 8)


def test_solutions_pass(capsys):
    check_q4_1_bits_per_weight(5.0)
    check_gguf_size_mib(576 * 1536 / 32 * 34 / 1024)
    check_pareto_points(["A", "B", "D"])
    check_stored_bytes(stored_bytes)
    assert capsys.readouterr().out.count("correct") == 4


def test_the_stored_bytes_solution_is_the_librarys_count():
    """Exercise 4's rule is how evaluate.sparse_size_bytes counts each layer of a pruned model."""
    from common import make_picollama

    from shrinklib.arch import named_linears
    from shrinklib.evaluate import model_size_bytes, sparse_size_bytes
    from shrinklib.prune import PruneConfig, prune_

    model = make_picollama()
    prune_(model, PruneConfig("magnitude", 0.6))
    dense = sum(lin.weight.numel() * 4 for lin in named_linears(model).values())
    stored = sum(stored_bytes(lin.weight, 32) for lin in named_linears(model).values())
    assert model_size_bytes(model) - sparse_size_bytes(model) == dense - stored


def test_a_wrong_stored_bytes_is_refused_with_the_case():
    with pytest.raises(AssertionError, match=r"a \(4, 8\) matrix with 16 nonzeros at 4 bits takes 12 bytes"):
        check_stored_bytes(lambda W, bits: W.numel() * bits // 8)  # always dense
    with pytest.raises(AssertionError, match="32.5"):
        check_stored_bytes(lambda W, bits: min(W.numel() * bits / 8, (W.numel() + int((W != 0).sum()) * bits) / 8))


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
