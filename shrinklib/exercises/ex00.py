"""Checkers for notebook 00's exercises."""

import math

import torch

from ._check import check, check_function


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


def check_perplexity_of(fn) -> None:
    """Exercise 4 (code): `perplexity_of(logits, ids)`, the perplexity of next-token `logits`
    (b, l, V) on the ids (b, l) they were computed from, over all predicted tokens."""
    half = torch.tensor([math.log(2.0), 0.0, 0.0])  # P = (1/2, 1/4, 1/4) at every position
    cases = [
        ((torch.zeros(1, 5, 8), torch.tensor([[1, 2, 3, 4, 5]])), 8.0),  # uniform over 8 tokens
        # predicted tokens 0, 1, 2 (the first id is never predicted): exp((ln 2 + 2 ln 4) / 3) = 2^(5/3)
        ((half.expand(1, 4, 3), torch.tensor([[0, 0, 1, 2]])), 2 ** (5 / 3)),
        # two rows, 3 predictions each at p = 1/2 and p = 1/4: the mean NLL of all 6 is 1.5 ln 2
        ((half.expand(2, 4, 3), torch.tensor([[2, 0, 0, 0], [0, 1, 2, 1]])), 2**1.5),
    ]
    check_function("perplexity_of", fn, cases,
                   "the logits at position t predict the id at t + 1: compare logits[:, :-1] with ids[:, 1:], "
                   "take log_softmax over the vocabulary, average the negative log-probabilities of ALL predicted "
                   "tokens (not per row), then exp")
