"""Notebook 10's exercise that asks for code: prompt lookup's proposal."""

import pytest
import torch

from shrinklib.exercises import ex10
from shrinklib.speculative import lookup_continuation


def lookup(ids, n, gamma):  # the library's own, at one n-gram length
    return lookup_continuation(ids, gamma, max_ngram=n, min_ngram=n).tolist()


def lookup_first_occurrence(ids, n, gamma):  # the earliest occurrence instead of the most recent
    tail = ids[-n:].tolist()
    for i in range(len(ids) - n):
        if ids[i : i + n].tolist() == tail:
            return ids[i + n : i + n + gamma].tolist()
    return []


def lookup_including_itself(ids, n, gamma):  # matches the last n-gram with itself: proposes nothing
    tail = ids[-n:].tolist()
    hits = [i for i in range(len(ids) - n + 1) if ids[i : i + n].tolist() == tail]
    return ids[hits[-1] + n : hits[-1] + n + gamma].tolist()


def test_solution_passes(capsys):
    ex10.check_lookup(lookup)
    assert "correct on all" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [lookup_first_occurrence, lookup_including_itself])
def test_wrong_solutions_fail_with_a_hint(wrong):
    with pytest.raises(AssertionError, match="hint"):
        ex10.check_lookup(wrong)


def test_stub_is_not_attempted(capsys):
    def stub(ids, n, gamma):
        raise NotImplementedError

    ex10.check_lookup(stub)
    assert "not attempted" in capsys.readouterr().out
    assert lookup(torch.tensor([1, 2, 1]), 1, 3) == [2, 1]
