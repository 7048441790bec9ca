"""Proxy tuning (Liu et al. 2024, "Tuning Language Models by Proxy", https://arxiv.org/abs/2401.08565):
steer a large model at decoding time with the difference a small model learned in tuning,

    logits = logits_large + alpha · (logits_small_tuned − logits_small_untuned),

without touching the large model's weights. The three models must share a tokenizer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DynamicCache, LogitsProcessor

from .checks import (TokenizerMismatchError, VocabularyMismatchError, check_same_tokenizer, check_shared_vocabulary,
                     check_token_ids, context_length, vocab_size)
from .tasks import Example, exact_match, generate_answers

__all__ = ["ProxyTuningLogitsProcessor", "TokenizerMismatchError", "VocabularyMismatchError", "check_same_tokenizer",
           "gap_closed", "proxy_generate_answers", "proxy_logits", "proxy_task_accuracy"]
USE = "Proxy tuning (it adds logits token by token)"


def proxy_logits(large: Tensor, tuned: Tensor, untuned: Tensor, alpha: float = 1.0) -> Tensor:
    """logits_large + alpha · (logits_tuned − logits_untuned), over the shared vocabulary.

    Args:
        large, tuned, untuned: (..., V) next-token logits (a longer, padded vocabulary is cut).
    """
    V = min(large.shape[-1], tuned.shape[-1], untuned.shape[-1])
    out = large.clone()
    out[..., :V] += alpha * (tuned[..., :V].float() - untuned[..., :V].float()).to(large.dtype)
    return out


class _Follower:
    """Runs a model on the same sequences as `generate`, feeding only the new tokens (KV cache)."""

    def __init__(self, model: nn.Module, pad_token_id: int | None):
        self.model, self.pad = model, pad_token_id
        self.cache, self.seen = None, None

    @torch.no_grad()
    def logits(self, input_ids: Tensor) -> Tensor:
        """Next-token logits (b, V) for each row of input_ids (left padding allowed)."""
        b, n = input_ids.shape
        fresh = self.seen is None or self.seen.shape[0] != b or self.seen.shape[1] >= n or not torch.equal(input_ids[:, : self.seen.shape[1]], self.seen)
        if fresh:
            self.cache, start = DynamicCache(), 0
        else:
            start = self.seen.shape[1]
        mask = torch.ones_like(input_ids)
        if self.pad is not None:  # left padding: the pads before each row's first real token
            mask = ((input_ids != self.pad).long().cumsum(-1) > 0).long()
        pos = (mask.cumsum(-1) - 1).clamp_min(0)  # (b, n) position ids that skip the padding
        out = self.model(input_ids=input_ids[:, start:], attention_mask=mask, position_ids=pos[:, start:],
                         past_key_values=self.cache, use_cache=True)
        self.seen = input_ids
        return out.logits[:, -1]


class ProxyTuningLogitsProcessor(LogitsProcessor):
    """A logits processor for the large model's `generate`: adds alpha · (tuned − untuned)
    next-token logits of a small model pair (Liu et al. 2024, Eq. 1).

    Args:
        tuned, untuned: the small model after and before tuning (the "expert" and "anti-expert").
        tokenizers: optional tokenizers of (large, tuned, untuned), checked to be identical. Without
            them the three vocabulary sizes must be equal (the large one is read from the first
            scores); with them, sizes that differ by padding rows are accepted.
        pad_token_id: the padding id of left-padded batches (None: no padding).
    """

    def __init__(self, tuned: nn.Module, untuned: nn.Module, alpha: float = 1.0, tokenizers=None,
                 pad_token_id: int | None = None):
        self.sizes = {"small tuned": vocab_size(tuned), "small untuned": vocab_size(untuned)}
        self.tokenizers, self.large_size = tokenizers, None  # the large model's size: from its first scores
        check_shared_vocabulary(self.sizes, tokenizers, USE)
        self.tuned, self.untuned = _Follower(tuned, pad_token_id), _Follower(untuned, pad_token_id)
        contexts = [c for c in (context_length(tuned), context_length(untuned)) if c]
        self.max_len = min(contexts) if contexts else None  # the small pair reads the whole sequence too
        self.alpha = alpha

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.large_size != scores.shape[-1]:
            check_shared_vocabulary({"large": scores.shape[-1], **self.sizes}, self.tokenizers, USE)
            self.large_size = scores.shape[-1]
        check_token_ids(input_ids, vocab=min(v for v in self.sizes.values() if v), max_len=self.max_len,
                        what="proxy tuning's input_ids")
        return proxy_logits(scores, self.tuned.logits(input_ids), self.untuned.logits(input_ids), self.alpha)


def proxy_generate_answers(large: nn.Module, tokenizer, examples: list[Example], tuned: nn.Module | None = None,
                           untuned: nn.Module | None = None, alpha: float = 1.0, max_new_tokens: int = 12,
                           batch_size: int = 16) -> list[str]:
    """Greedy answers of the large model (`tasks.generate_answers`), proxy-tuned by (tuned, untuned)
    when both are given."""
    procs = None
    if tuned is not None and untuned is not None:
        procs = lambda: [ProxyTuningLogitsProcessor(tuned, untuned, alpha, pad_token_id=tokenizer.pad_token_id)]  # noqa: E731
    return generate_answers(large, tokenizer, examples, max_new_tokens, batch_size, procs)


def proxy_task_accuracy(large, tokenizer, examples, tuned=None, untuned=None, alpha: float = 1.0, **kw) -> float:
    """Exact-match accuracy of the (proxy-tuned) large model on the examples."""
    return exact_match(proxy_generate_answers(large, tokenizer, examples, tuned, untuned, alpha, **kw), examples)


def gap_closed(untuned: float, proxy: float, tuned: float) -> float:
    """Fraction of the gap between the untuned and the directly tuned large model that proxy
    tuning closes: (proxy − untuned) / (tuned − untuned)."""
    if tuned == untuned:
        return float("nan")
    return (proxy - untuned) / (tuned - untuned)
