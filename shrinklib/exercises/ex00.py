"""Checkers for notebook 00's exercises."""

import math

from ._check import check


def check_kv_cache_bytes(answer) -> None:
    """Exercise 1: KV cache of Llama-3.1-8B, one 8,192-token sequence, bfloat16."""
    expected = 2 * 32 * 8 * 128 * 8192 * 2  # K and V × layers × KV heads × head dim × tokens × 2 bytes
    check("kv_cache_bytes", answer, lambda a: a == expected,
          "count K and V, every layer, every KV head (not query head), 2 bytes per bfloat16 value")


def check_block_params(answer) -> None:
    """Exercise 2: parameters of one SmolLM2 decoder block."""
    d, kv, mlp = 576, 3 * 64, 1536
    expected = 2 * d * d + 2 * d * kv + 3 * d * mlp + 2 * d  # q,o + k,v + gate,up,down + two norms
    check("block_params", answer, lambda a: a == expected,
          "q and o are 576×576, k and v are 576×192 (3 KV heads × 64), the MLP has three 576×1536 matrices, plus two norms")


def check_perplexity(answer) -> None:
    """Exercise 3: perplexity from a mean negative log-likelihood of 2.0 nats."""
    check("perplexity", answer, lambda a: abs(a - math.exp(2.0)) < 5e-4, "perplexity = exp(mean NLL in nats)")
