"""The solutions of notebook 03's exercises pass their checkers; wrong answers fail."""

import pytest

from shrinklib.exercises.ex03 import check_decode_bound, check_lut_entry, check_packed_bytes


def test_solutions_pass():
    check_packed_bytes(4096 * 4096 // 2 + 4096 * 64 * 8)
    check_lut_entry(0.5 - 1.0 + 3.0)
    check_decode_bound(30e9 / 60e6)
    check_packed_bytes(None)  # "not attempted" does not raise


def test_wrong_answers_fail():
    with pytest.raises(AssertionError, match="hint"):
        check_packed_bytes(4096 * 4096 // 2)
    with pytest.raises(AssertionError):
        check_lut_entry(4.5)
