"""Checkers for notebook 03's exercises."""

from ._check import check


def check_packed_bytes(answer) -> None:
    """Exercise 1: bytes of a 4096×4096 weight at 4 bits, group 64, a float16 scale and s·z per group."""
    expected = 4096 * 4096 // 2 + 4096 * (4096 // 64) * 2 * 2
    check("packed_bytes", answer, lambda a: int(a) == expected,
          "codes take 4096·4096·4/8 bytes; each row has 4096/64 groups, each with a float16 scale and s·z (4 bytes)")


def check_lut_entry(answer) -> None:
    """Exercise 2: the T-MAC table entry T[0b1011] for the four activations x = (0.5, -1, 2, 3)."""
    x = (0.5, -1.0, 2.0, 3.0)
    expected = sum(v for k, v in enumerate(x) if (0b1011 >> k) & 1)  # bits 0, 1 and 3 set
    check("lut_entry", answer, lambda a: abs(float(a) - expected) < 1e-9,
          "bit k of the index says whether x[k] is in the sum; 0b1011 has bits 0, 1 and 3 set")


def check_decode_bound(answer) -> None:
    """Exercise 3: upper bound on batch-1 tokens/s when 60 MB of weights are read per token at 30 GB/s."""
    check("decode_bound", answer, lambda a: abs(float(a) - 500.0) < 1.0,
          "each token reads every weight once: tokens/s <= bandwidth / bytes per token")
