"""Speculative decoding (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen et al.
2023, https://arxiv.org/abs/2302.01318): a cheap draft model proposes gamma tokens, the target
scores all of them in one forward pass, and a rejection rule keeps exactly the target's
distribution (greedy: exactly the target's greedy tokens). Both sides keep a KV cache that is
cropped back when draft tokens are rejected.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

from .checks import check_shared_vocabulary, check_token_ids, vocab_size


def probs_from_logits(logits: Tensor, temperature: float) -> Tensor:
    """Next-token distributions (..., V): softmax(logits / T), or one-hot argmax for T = 0."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    return torch.softmax(logits.float() / temperature, dim=-1)


def accept_draft(p: Tensor, q: Tensor, draft: Tensor, generator: torch.Generator | None = None) -> tuple[int, int]:
    """The rejection rule that keeps the target's distribution (Leviathan et al., Alg. 1).

    Draft token x_i ~ q_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection the next token is drawn from norm(max(0, p_i − q_i)); if all gamma are kept, a
    bonus token comes from p_{gamma+1}. With one-hot p and q (T = 0) this is greedy matching.

    Args:
        p: (gamma + 1, V) target distributions at the draft positions and one beyond.
        q: (gamma, V) draft distributions the draft tokens were sampled from.
        draft: (gamma,) draft tokens.
    Returns:
        (n accepted draft tokens, the next token id from the target side).
    """
    gamma = draft.numel()
    for i in range(gamma):
        x = int(draft[i])
        r = torch.rand((), generator=generator, device=p.device)
        if r * q[i, x] < p[i, x]:  # r < p/q, without dividing (q_i(x) > 0: x was drawn from q_i)
            continue
        residual = (p[i] - q[i]).clamp_min(0)  # (V,)
        if residual.sum() <= 0:  # p_i == q_i up to rounding: any draw from p_i is exact
            residual = p[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return gamma, int(torch.multinomial(p[gamma], 1, generator=generator))


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of a DynamicCache (a negative crop removes tokens,
    which old and new transformers versions read alike)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


@dataclass
class SpeculativeOutput:
    sequences: Tensor  # (1, prompt + new) token ids
    accepted: list[int] = field(default_factory=list)  # accepted draft tokens, per target call
    drafted: list[int] = field(default_factory=list)  # proposed draft tokens, per target call
    draft_calls: int = 0

    @property
    def target_calls(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return sum(self.accepted) / max(1, sum(self.drafted))

    @property
    def tokens_per_target_call(self) -> float:
        """New tokens per target forward pass (1 for plain decoding; at most gamma + 1)."""
        return (sum(self.accepted) + len(self.accepted)) / max(1, len(self.accepted))


def _next(model: nn.Module, x: Tensor, cache: DynamicCache) -> Tensor:
    """Logits (1, len(x), V) of the uncached tail x, extending the cache."""
    return model(input_ids=x, past_key_values=cache, use_cache=True).logits


def check_pair(target: nn.Module, draft: nn.Module, input_ids: Tensor, tokenizers=None) -> None:
    """The draft proposes token ids the target scores, so both have one vocabulary (one size;
    `tokenizers` (target's, draft's), when given, must be identical), and the prompt is (1, n)
    ids of that vocabulary within the target's context."""
    check_shared_vocabulary({"target": vocab_size(target), "draft": vocab_size(draft)}, tokenizers,
                            "Speculative decoding (the target scores the draft's token ids)", allow_padding=False)
    check_token_ids(input_ids, target, what="input_ids")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt, shape (1, n); got {tuple(input_ids.shape)}")


@torch.no_grad()
def speculative_generate(target: nn.Module, draft: nn.Module, input_ids: Tensor, max_new_tokens: int, gamma: int = 4,
                         temperature: float = 0.0, eos_token_id: int | None = None,
                         generator: torch.Generator | None = None, tokenizers=None) -> SpeculativeOutput:
    """Decode with a draft proposing `gamma` tokens and the target verifying them in one pass.

    Args:
        input_ids: (1, n) prompt (batch size 1).
        temperature: 0 for greedy (exactly the target's greedy tokens), else sampling.
        generator: the random generator for sampling and acceptance draws.
        tokenizers: optional (target's, draft's) tokenizers, checked to be one tokenizer.
    """
    check_pair(target, draft, input_ids, tokenizers)
    if gamma < 1 or max_new_tokens < 1:
        raise ValueError(f"speculative_generate needs gamma ≥ 1 and max_new_tokens ≥ 1, got {gamma}, {max_new_tokens}")
    ids, n0 = input_ids, input_ids.shape[1]
    t_cache, d_cache = DynamicCache(), DynamicCache()
    out = SpeculativeOutput(ids)
    while ids.shape[1] - n0 < max_new_tokens:
        g = min(gamma, max_new_tokens - (ids.shape[1] - n0))
        drafts, q = [], []
        x = ids[:, d_cache.get_seq_length():]  # the draft's uncached tail
        for _ in range(g):  # draft: g cheap autoregressive steps
            qi = probs_from_logits(_next(draft, x, d_cache)[0, -1], temperature)  # (V,)
            tok = qi.argmax() if temperature == 0 else torch.multinomial(qi, 1, generator=generator)[0]
            drafts.append(tok)
            q.append(qi)
            x = tok.view(1, 1)
        out.draft_calls += g
        drafts = torch.stack(drafts)  # (g,)
        cand = torch.cat([ids, drafts.view(1, -1)], dim=1)  # (1, n + g)
        logits = _next(target, cand[:, t_cache.get_seq_length():], t_cache)[0, -(g + 1):]  # (g + 1, V): one pass
        n_acc, nxt = accept_draft(probs_from_logits(logits, temperature), torch.stack(q), drafts, generator)
        new = torch.cat([drafts[:n_acc], torch.tensor([nxt], device=ids.device)])
        if eos_token_id is not None and (new == eos_token_id).any():
            new = new[: int((new == eos_token_id).nonzero()[0]) + 1]
        ids = torch.cat([ids, new.view(1, -1)], dim=1)
        crop_cache(t_cache, ids.shape[1] - 1)  # drop rejected drafts; the last token is fed next time
        crop_cache(d_cache, min(d_cache.get_seq_length(), ids.shape[1] - 1))
        out.accepted.append(n_acc)
        out.drafted.append(g)
        if eos_token_id is not None and int(new[-1]) == eos_token_id:
            break
    out.sequences = ids[:, : n0 + max_new_tokens]
    return out


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Tensor:
    """Plain greedy decoding with a KV cache, one target call per token: the reference."""
    ids, cache = input_ids, DynamicCache()
    for _ in range(max_new_tokens):
        tok = _next(model, ids[:, cache.get_seq_length():], cache)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, tok], dim=1)
        if eos_token_id is not None and int(tok) == eos_token_id:
            break
    return ids


@torch.no_grad()
def assisted_generate(target: nn.Module, draft: nn.Module, input_ids: Tensor, max_new_tokens: int, gamma: int = 4,
                      pad_token_id: int | None = None) -> Tensor:
    """transformers' own speculative decoding (`generate(assistant_model=...)`), greedy, with a
    constant number of draft tokens, for comparison."""
    gc = draft.generation_config
    saved = (getattr(gc, "num_assistant_tokens", None), getattr(gc, "num_assistant_tokens_schedule", None))
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = gamma, "constant"
    # transformers' candidate generator calls the draft's generate with both a config and arguments and
    # warns about its own call (deprecation, a duplicated min-length processor): nothing for us to change
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return target.generate(input_ids, attention_mask=torch.ones_like(input_ids), assistant_model=draft,
                               do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                               pad_token_id=pad_token_id)
    finally:
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = saved
        hf_logging.set_verbosity(verbosity)


def speedup_table(target: nn.Module, draft: nn.Module, prompts: list[Tensor], gammas: list[int],
                  max_new_tokens: int = 32) -> list[dict]:
    """Greedy speculative vs plain decoding on each prompt, side by side, for each gamma:
    acceptance rate, tokens per target call, wall-clock speedup and exactness."""
    t = time.perf_counter()
    refs = [greedy_generate(target, x, max_new_tokens) for x in prompts]
    base_s = time.perf_counter() - t
    rows = []
    for gamma in gammas:
        t = time.perf_counter()
        outs = [speculative_generate(target, draft, x, max_new_tokens, gamma) for x in prompts]
        s = time.perf_counter() - t
        acc, drafted = sum(sum(o.accepted) for o in outs), sum(sum(o.drafted) for o in outs)
        n_calls = sum(o.target_calls for o in outs)
        rows.append({
            "gamma": gamma,
            "acceptance": acc / max(1, drafted),
            "tokens_per_target_call": (acc + n_calls) / max(1, n_calls),
            "speedup": base_s / s,
            "exact": all(torch.equal(o.sequences, r) for o, r in zip(outs, refs)),
            "seconds": s,
            "baseline_seconds": base_s,
        })
    return rows


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Expected new tokens per target call when each draft token is accepted independently
    with probability alpha: (1 − alpha^(gamma+1)) / (1 − alpha) (Leviathan et al., Eq. 1)."""
    if not 0 <= alpha <= 1 or gamma < 0:
        raise ValueError(f"alpha must be in [0, 1] and gamma ≥ 0, got {alpha}, {gamma}")
    return float(gamma + 1) if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
