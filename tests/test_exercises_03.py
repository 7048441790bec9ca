"""The solutions of notebook 03's exercises pass their checkers; wrong answers fail."""

import pytest
import torch

from shrinklib import kernels as K
from shrinklib.exercises.ex03 import check_decode_bound, check_lut_entry, check_packed_bytes


def test_solutions_pass():
    check_packed_bytes(4096 * 4096 // 2 + 4096 * 64 * 4)
    check_lut_entry(0.5 - 1.0 + 3.0)
    check_decode_bound(30e9 / 60e6)
    check_packed_bytes(None)  # "not attempted" does not raise


def test_packed_bytes_answer_is_the_kernels_layout():
    """The hand-computed answer is what the packer really stores (int and LUT layouts alike)."""
    q, s, z = torch.zeros(4096, 4096, dtype=torch.uint8), torch.ones(4096, 64), torch.zeros(4096, 64)
    check_packed_bytes(K.pack_int(q, s, z, 4, 64).nbytes())
    check_packed_bytes(K.pack_lut(q, s, z, 4, 64).nbytes())


def test_wrong_answers_fail():
    with pytest.raises(AssertionError, match="hint"):
        check_packed_bytes(4096 * 4096 // 2)
    with pytest.raises(AssertionError, match="hint"):
        check_packed_bytes(4096 * 4096 // 2 + 4096 * 64 * 8)  # float32 scales and zeros
    with pytest.raises(AssertionError):
        check_lut_entry(4.5)
