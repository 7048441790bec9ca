"""Checkers for notebook 15's exercises."""

import torch

from ._check import check, check_function


def check_bytes_per_token(answer) -> None:
    """Exercise 1: bytes per token of SmolLM2-135M's float16 KV cache (30 layers, 3 KV heads of 64)."""
    check("bytes_per_token", answer, lambda a: float(a) == 2 * 30 * 3 * 64 * 2,
          "each token stores a key and a value (2) per layer, KV head and channel, 2 bytes each in float16")


def check_key_bits(answer) -> None:
    """Exercise 2: bits per key value of 2-bit per-channel keys in groups of 32 tokens, with a float16
    scale and a float16 s·z per group."""
    check("key_bits", answer, lambda a: abs(float(a) - (2 + 2 * 16 / 32)) < 1e-9,
          "each value has its 2 bits, and each group of 32 tokens of one channel shares 16 + 16 bits")


def check_quantized_tokens(answer) -> None:
    """Exercise 3: how many past tokens a query at position 300 reads quantized with a float window of
    128 tokens and blocks of 32."""
    check("quantized_tokens", answer, lambda a: float(a) == 160,
          "whole blocks of 32 tokens at least 128 positions back: 32 · floor((300 - 128) / 32)")


def check_per_channel_quantize(fn) -> None:
    """Exercise 4 (code): `per_channel_quantize(K, bits, group)`: K (tokens, channels) on a zero-point
    (min-max) grid fitted to each group of `group` consecutive tokens of each channel, read back as floats."""
    cases = [
        # one channel, one group of 4: s = 3/3 = 1, the codes are the values themselves
        ((torch.tensor([[0.0], [1.0], [2.0], [3.0]]), 2, 4), [[0.0], [1.0], [2.0], [3.0]]),
        # two channels with their own grids: channel 0 spans [0, 6] (s = 2: 2.9 -> 2), channel 1 spans [10, 13]
        ((torch.tensor([[0.0, 10.0], [2.9, 13.0], [6.0, 11.2], [4.0, 12.0]]), 2, 4),
         [[0.0, 10.0], [2.0, 13.0], [6.0, 11.0], [4.0, 12.0]]),
        # groups of 2 tokens: each pair of a channel is reproduced exactly (its min and max)
        ((torch.tensor([[1.0, -1.0], [5.0, 3.0], [-2.0, 0.5], [7.0, 0.25]]), 1, 2),
         [[1.0, -1.0], [5.0, 3.0], [-2.0, 0.5], [7.0, 0.25]]),
        # a short last group (3 tokens, groups of 2): the third token is its own group, exact
        ((torch.tensor([[0.0], [3.0], [1.7]]), 1, 2), [[0.0], [3.0], [1.7]]),
    ]
    check_function("per_channel_quantize", fn, cases,
                   "for each channel (column) and each group of `group` tokens (rows): s = (max - min) / (2^bits - 1), "
                   "z = -min / s, q = clamp(round(k / s + z), 0, 2^bits - 1), read back s · (q - z)", tol=1e-3)
