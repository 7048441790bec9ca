"""Checkers for notebook 12's exercises."""

from ._check import check, not_attempted


def check_q4_1_bits_per_weight(answer) -> None:
    """Exercise 1: storage cost of llama.cpp's Q4_1, in bits per weight."""
    expected = (2 + 2 + 32 * 4 / 8) * 8 / 32  # float16 d and m, 32 four-bit codes: 20 bytes per 32 weights
    check("q4_1_bits_per_weight", answer, lambda a: abs(float(a) - expected) < 1e-9,
          "a block of 32 weights stores a float16 scale d, a float16 minimum m and 32 four-bit codes")


def check_gguf_size_mib(answer) -> None:
    """Exercise 2: a 576×1536 matrix stored as Q8_0, in KiB."""
    expected = 576 * 1536 / 32 * 34 / 1024  # blocks of 32 int8 codes plus a float16 scale: 34 bytes
    check("gguf_size_kib", answer, lambda a: abs(float(a) - expected) < 0.05,
          "count the blocks of 32 weights; each takes 32 one-byte codes plus a 2-byte scale")


POINTS = {"A": (100, 12.0), "B": (50, 12.5), "C": (60, 13.0), "D": (30, 15.0), "E": (40, 16.0)}  # (MiB, perplexity)


def check_pareto_points(answer) -> None:
    """Exercise 3: which of POINTS lie on the size/perplexity Pareto frontier?"""
    check("pareto_points", answer, lambda a: set(a) == {"A", "B", "D"},
          "a point is dominated when another is no larger and no worse, and better in one of the two")


def check_stored_bytes(fn) -> None:
    """Exercise 4: `fn(W, bits)` returns the bytes of a weight matrix stored the smaller way: dense
    (every weight at `bits` bits) or a bitmask (one bit per weight) plus its nonzero values at `bits`
    bits, each rounded down to whole bytes, as `shrinklib.evaluate.sparse_size_bytes` counts a layer."""
    import torch

    if not_attempted(fn, "stored_bytes"):
        return
    half = torch.ones(4, 8)
    half[:, ::2] = 0  # 16 of 32 weights are zero
    tenth = torch.zeros(10, 10)
    tenth[0] = 1.0  # 10 of 100 are nonzero
    cases = [  # (W, bits, bytes computed by hand)
        (half, 4, 12),  # dense 32·4/8 = 16; bitmask 32/8 = 4 plus 16·4/8 = 8 values: 12
        (half, 32, 68),  # dense 128; 4 + 16·32/8 = 68
        (torch.ones(4, 8), 4, 16),  # no zeros: dense 16 beats 4 + 16 = 20
        (tenth, 16, 32),  # dense 200; (100 + 10·16)/8 = 32.5, rounded down to 32
    ]
    got = [fn(W.clone(), bits) for W, bits, _ in cases]
    wrong = [(W, bits, e) for (W, bits, e), g in zip(cases, got) if not (isinstance(g, int) and g == e)]
    hint = "compare n·bits // 8 (dense) with (n + nnz·bits) // 8 (bitmask and values)"
    if wrong:
        W, bits, e = wrong[0]
        hint = f"a {tuple(W.shape)} matrix with {int((W != 0).sum())} nonzeros at {bits} bits takes {e} bytes; " + hint
    check("stored_bytes", got, lambda a: not wrong, hint)
