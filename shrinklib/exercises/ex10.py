"""Checkers for notebook 10's exercises (small LLMs and speculative decoding)."""

import math

import torch

from ._check import check, check_function


def check_smollm2_flops(answer) -> None:
    """Exercise 1: training FLOPs of SmolLM2-135M on 2T tokens by 6·N·D (N = 135e6)."""
    expected = 6 * 135e6 * 2e12
    check("smollm2_flops", answer, lambda a: math.isclose(float(a), expected, rel_tol=0.02),
          "6 × parameters × tokens: 2N FLOPs forward and 4N backward per token")


def check_tokens_per_call(answer) -> None:
    """Exercise 2: expected tokens per target call for acceptance alpha = 0.6 and gamma = 3."""
    expected = (1 - 0.6**4) / (1 - 0.6)
    check("tokens_per_call", answer, lambda a: math.isclose(float(a), expected, rel_tol=1e-3),
          "1 + alpha + alpha² + alpha³: the i-th draft token counts only if all before it were accepted, "
          "and the target always adds one token of its own")


def check_kv_bytes_per_token(answer) -> None:
    """Exercise 3: KV-cache bytes per token of TinyLlama-1.1B in 16-bit (22 layers, 4 KV heads of 64)."""
    expected = 2 * 22 * 4 * 64 * 2  # K and V × layers × KV heads × head dim × 2 bytes
    check("kv_bytes_per_token", answer, lambda a: int(a) == expected,
          "K and V, every layer, only the 4 shared KV heads (grouped-query attention, not the 32 query heads), "
          "head dimension 2048 / 32 = 64, 2 bytes per value")


def check_lookup(fn) -> None:
    """Exercise 4 (code): `lookup(ids, n, gamma)`, prompt lookup's proposal: the up to `gamma` tokens
    after the most recent earlier occurrence of the last `n` tokens of a 1-D id tensor, else []."""
    t = torch.tensor
    cases = [
        ((t([1, 2, 3, 4, 1, 2]), 2, 3), [3, 4, 1]),  # (1, 2) occurred at 0
        ((t([5, 6, 7, 5, 9, 5]), 1, 2), [9, 5]),  # 5 occurred at 0 and 3: the most recent is 3
        ((t([1, 2, 3, 1, 2]), 2, 10), [3, 1, 2]),  # up to the end of the context
        ((t([1, 2, 3]), 1, 4), []),  # nothing recurs
        ((t([4, 4, 4]), 1, 2), [4]),  # the occurrence at 1 is the most recent; its successor is the last token
    ]
    check_function("lookup", fn, cases, "compare every earlier window ids[i:i+n] (with i + n < len(ids)) with ids[-n:]; "
                   "take the largest matching i and return ids[i+n : i+n+gamma].tolist()", tol=0)
