"""Speculative decoding (Leviathan et al. 2023, https://arxiv.org/abs/2211.17192; Chen et al.
2023, https://arxiv.org/abs/2302.01318): a cheap draft proposes gamma tokens, the target scores
all of them in one forward pass, and a rejection rule keeps exactly the target's distribution
(greedy: exactly the target's greedy tokens).

A draft is anything with `propose(ids, gamma, temperature, generator) -> (tokens, q)` and
`rollback(length)`:
    ModelDraft          a smaller model, or the target itself on low-bit kernels (a quantized
                        self-draft, `quantized_draft`), with its own KV cache, cropped back
                        after rejections
    PromptLookupDraft   no model at all: the tokens that followed the context's last n-gram at
                        its most recent earlier occurrence (prompt lookup decoding, Saxena 2023,
                        https://github.com/apoorvumang/prompt-lookup-decoding)
A plain `nn.Module` passed as the draft is wrapped in a ModelDraft.
"""

from __future__ import annotations

import copy
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


def accept_greedy(target_logits: Tensor, draft: Tensor) -> tuple[int, int]:
    """`accept_draft` at temperature 0 without building distributions: the longest prefix of the
    draft equal to the target's argmaxes, and the target's argmax after it.

    Args:
        target_logits: (gamma + 1, V); draft: (gamma,).
    """
    best = target_logits.argmax(-1)  # (gamma + 1,)
    miss = (best[: draft.numel()] != draft).nonzero()
    n = int(miss[0]) if miss.numel() else draft.numel()
    return n, int(best[n])


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of a DynamicCache (a negative crop removes tokens,
    which old and new transformers versions read alike)."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


def next_logits(model: nn.Module, x: Tensor, cache: DynamicCache, keep: int = 1) -> Tensor:
    """Logits (1, keep, V) of the last `keep` positions of the uncached tail x (1, n), extending the
    cache; the output layer runs on those positions only (`logits_to_keep`), as in `generate`."""
    return model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=keep).logits


class ModelDraft:
    """A draft model with its own KV cache: proposes gamma tokens autoregressively."""

    def __init__(self, model: nn.Module):
        self.model, self.cache = model, DynamicCache()

    def propose(self, ids: Tensor, gamma: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """(gamma,) draft tokens after the context ids (1, n) and the distributions (gamma, V) they
        were drawn from (None at temperature 0: the tokens are the draft's argmaxes)."""
        x, tokens, q = ids[:, self.cache.get_seq_length():], [], []  # x: the draft's uncached tail
        for _ in range(gamma):
            logits = next_logits(self.model, x, self.cache)[0, -1]  # (V,)
            if temperature == 0:
                tok = logits.argmax()
            else:
                q.append(probs_from_logits(logits, temperature))
                tok = torch.multinomial(q[-1], 1, generator=generator)[0]
            tokens.append(tok)
            x = tok.view(1, 1)
        return torch.stack(tokens), (torch.stack(q) if q else None)

    def rollback(self, length: int) -> None:
        """Forget the cached positions from `length` on (the rejected drafts)."""
        crop_cache(self.cache, length)


def lookup_continuation(ids: Tensor, gamma: int, max_ngram: int = 3, min_ngram: int = 1) -> Tensor:
    """The (≤ gamma,) tokens that followed the most recent earlier occurrence of the last n-gram of
    ids (n,), trying n = max_ngram first; empty when no n-gram recurs."""
    for n in range(min(max_ngram, ids.numel() - 1), min_ngram - 1, -1):
        windows = ids[:-1].unfold(0, n, 1)  # (len - n, n): every n-gram that has a successor
        hits = (windows == ids[-n:]).all(1).nonzero()[:, 0]
        if hits.numel():
            start = int(hits[-1]) + n
            return ids[start : start + gamma]
    return ids[:0]


class PromptLookupDraft:
    """Prompt lookup decoding: propose what followed the context's last n-gram before. Free to run,
    and right wherever the output repeats its input (copying, editing, quoting, code)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 ≤ min_ngram ≤ max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, ids: Tensor, gamma: int, temperature: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[Tensor, None]:
        """Up to gamma tokens (possibly none) copied from the context ids (1, n); deterministic, so
        its proposal distribution is one-hot (None)."""
        return lookup_continuation(ids[0], gamma, self.max_ngram, self.min_ngram), None

    def rollback(self, length: int) -> None:
        """Nothing is cached."""


def quantized_draft(target: nn.Module, fmt="lut4", lm_head: bool = True) -> nn.Module:
    """Self-speculative decoding's draft: a copy of the target with every block linear (and the output
    head) on a low-bit kernel format. The target's own function at a fraction of its step cost, so
    most of its tokens are accepted.

    Args:
        fmt: a name of `shrinklib.kernels.modules.FORMATS` (e.g. "lut4": RTN 4-bit g64 on notebook
            03's lookup-table kernel) or a function nn.Linear -> module (`Mo.rtn_layer("lut", 4,
            group_size=32)`).
    """
    from .kernels import modules as Mo

    if isinstance(fmt, str) and fmt not in Mo.FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {list(Mo.FORMATS)} or a function nn.Linear -> module")
    return Mo.replace_linears_(copy.deepcopy(target), fmt, lm_head=lm_head).eval()


@dataclass
class SpeculativeOutput:
    sequences: Tensor  # (1, prompt + new) token ids
    accepted: list[int] = field(default_factory=list)  # accepted draft tokens, per target call
    drafted: list[int] = field(default_factory=list)  # proposed draft tokens, per target call

    @property
    def target_calls(self) -> int:
        return len(self.accepted)

    @property
    def draft_calls(self) -> int:
        return sum(self.drafted)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens."""
        return sum(self.accepted) / max(1, sum(self.drafted))

    @property
    def tokens_per_target_call(self) -> float:
        """New tokens per target forward pass (1 for plain decoding; at most gamma + 1)."""
        return (sum(self.accepted) + len(self.accepted)) / max(1, len(self.accepted))


def check_pair(target: nn.Module, draft, input_ids: Tensor, tokenizers=None) -> None:
    """The draft proposes token ids the target scores, so a draft model has the target's vocabulary
    (one size; `tokenizers` (target's, draft's), when given, must be identical), and the prompt is
    (1, n) ids of that vocabulary within the target's context."""
    if isinstance(draft, nn.Module):
        check_shared_vocabulary({"target": vocab_size(target), "draft": vocab_size(draft)}, tokenizers,
                                "Speculative decoding (the target scores the draft's token ids)", allow_padding=False)
    elif not (hasattr(draft, "propose") and hasattr(draft, "rollback")):
        raise TypeError(f"the draft must be a model or have propose() and rollback() (ModelDraft, PromptLookupDraft); "
                        f"got {type(draft).__name__}")
    check_token_ids(input_ids, target, what="input_ids")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt, shape (1, n); got {tuple(input_ids.shape)}")


def verify(logits: Tensor, tokens: Tensor, q: Tensor | None, temperature: float,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """(accepted draft tokens, next token) from the target's logits (g + 1, V) on g draft tokens
    drawn from q (g, V); q None means a deterministic proposal (one-hot)."""
    tokens = tokens.to(logits.device)
    if temperature == 0:
        return accept_greedy(logits, tokens)
    p = probs_from_logits(logits, temperature)  # (g + 1, V)
    if q is None:
        q = F.one_hot(tokens, p.shape[-1]).to(p.dtype)
    return accept_draft(p, q.to(p.device), tokens, generator)


@torch.no_grad()
def speculative_generate(target: nn.Module, draft, input_ids: Tensor, max_new_tokens: int, gamma: int = 4,
                         temperature: float = 0.0, eos_token_id: int | None = None,
                         generator: torch.Generator | None = None, tokenizers=None) -> SpeculativeOutput:
    """Decode with a draft proposing up to `gamma` tokens and the target verifying them in one pass.

    Args:
        draft: a model (smaller, or the target at lower precision) or a draft object
            (`PromptLookupDraft`, `ModelDraft`).
        input_ids: (1, n) prompt (batch size 1).
        temperature: 0 for greedy (exactly the target's greedy tokens), else sampling (exactly the
            target's distribution).
        generator: the random generator for sampling and acceptance draws.
        tokenizers: optional (target's, draft's) tokenizers, checked to be one tokenizer.
    """
    check_pair(target, draft, input_ids, tokenizers)
    if gamma < 1 or max_new_tokens < 1:
        raise ValueError(f"speculative_generate needs gamma ≥ 1 and max_new_tokens ≥ 1, got {gamma}, {max_new_tokens}")
    draft = ModelDraft(draft) if isinstance(draft, nn.Module) else draft
    ids, n0, cache = input_ids, input_ids.shape[1], DynamicCache()
    out = SpeculativeOutput(ids)
    while ids.shape[1] - n0 < max_new_tokens:
        tokens, q = draft.propose(ids, min(gamma, max_new_tokens - (ids.shape[1] - n0)), temperature, generator)
        g = tokens.numel()
        cand = torch.cat([ids, tokens.view(1, -1).to(ids)], dim=1)  # (1, n + g)
        logits = next_logits(target, cand[:, cache.get_seq_length():], cache, keep=g + 1)[0]  # (g + 1, V): one pass
        n_acc, nxt = verify(logits, tokens, q, temperature, generator)
        new = torch.cat([tokens[:n_acc].to(ids), torch.tensor([nxt], device=ids.device)])
        if eos_token_id is not None and (new == eos_token_id).any():
            new = new[: int((new == eos_token_id).nonzero()[0]) + 1]
        ids = torch.cat([ids, new.view(1, -1)], dim=1)
        crop_cache(cache, ids.shape[1] - 1)  # drop rejected drafts; the last token is fed next time
        draft.rollback(ids.shape[1] - 1)
        out.accepted.append(n_acc)
        out.drafted.append(g)
        if eos_token_id is not None and int(new[-1]) == eos_token_id:
            break
    out.sequences = ids[:, : n0 + max_new_tokens]
    return out


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> Tensor:
    """Plain greedy decoding with a KV cache, one model call per token: the reference."""
    ids, cache = input_ids, DynamicCache()
    for _ in range(max_new_tokens):
        tok = next_logits(model, ids[:, cache.get_seq_length():], cache)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
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


def speedup_table(target: nn.Module, drafts: dict, prompts: list[Tensor], gammas: list[int], max_new_tokens: int = 32,
                  repeats: int = 1) -> list[dict]:
    """Greedy speculative decoding with each draft and gamma against plain greedy decoding of the
    same prompts, timed side by side: each repeat runs the plain decoder and every (draft, gamma) once
    on all prompts, in turn, and each keeps its fastest repeat (the least disturbed by other work).

    Args:
        drafts: name -> draft (a model, or a draft object such as PromptLookupDraft).
        prompts: (1, n) prompts.
    Returns:
        one row per (draft, gamma): acceptance rate, draft tokens proposed per target call, tokens
        per target call, seconds, the plain decoder's seconds, speedup, and whether every output
        equals the target's greedy output.
    """
    if repeats < 1 or not drafts or not gammas:
        raise ValueError("speedup_table needs repeats ≥ 1 and at least one draft and one gamma")
    runs = [(name, g) for name in drafts for g in gammas]
    best = {key: float("inf") for key in [None, *runs]}
    refs, outs = None, {}
    for _ in range(repeats):
        t = time.perf_counter()
        refs = [greedy_generate(target, x, max_new_tokens) for x in prompts]
        best[None] = min(best[None], time.perf_counter() - t)
        for name, g in runs:
            t = time.perf_counter()
            outs[name, g] = [speculative_generate(target, drafts[name], x, max_new_tokens, g) for x in prompts]
            best[name, g] = min(best[name, g], time.perf_counter() - t)
    rows = []
    for name, g in runs:
        o = outs[name, g]
        acc, drafted, calls = sum(sum(x.accepted) for x in o), sum(x.draft_calls for x in o), sum(x.target_calls for x in o)
        rows.append({"draft": name, "gamma": g, "acceptance": acc / max(1, drafted), "drafted_per_call": drafted / max(1, calls),
                     "tokens_per_target_call": (acc + calls) / max(1, calls), "seconds": best[name, g],
                     "baseline_seconds": best[None], "speedup": best[None] / best[name, g],
                     "exact": all(torch.equal(x.sequences, r) for x, r in zip(o, refs))})
    return rows


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """Expected new tokens per target call when each draft token is accepted independently
    with probability alpha: (1 − alpha^(gamma+1)) / (1 − alpha) (Leviathan et al., Eq. 1)."""
    if not 0 <= alpha <= 1 or gamma < 0:
        raise ValueError(f"alpha must be in [0, 1] and gamma ≥ 0, got {alpha}, {gamma}")
    return float(gamma + 1) if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


def expected_speedup(alpha: float, gamma: int, cost: float) -> float:
    """Expected wall-clock speedup over plain decoding when a draft step costs `cost` target steps
    and a target pass over gamma + 1 tokens costs one: E[tokens per call] / (gamma·cost + 1)
    (Leviathan et al., Theorem 3.8)."""
    if cost < 0:
        raise ValueError(f"cost must be ≥ 0, got {cost}")
    return expected_tokens_per_call(alpha, gamma) / (gamma * cost + 1)


@torch.no_grad()
def continuation_law(model: nn.Module, input_ids: Tensor, n_tokens: int, temperature: float = 1.0) -> Tensor:
    """The exact law of the next `n_tokens` tokens that sampling at `temperature` draws after the
    prompt (1, n), by enumerating every continuation: (V ** n_tokens,), continuation t_1..t_n at
    index Σ_i t_i·V^(n-i). For tiny vocabularies only: the reference of a statistical test."""
    V = vocab_size(model)
    if V ** n_tokens > 1 << 16:
        raise ValueError(f"{V}^{n_tokens} continuations are too many to enumerate; use a tiny vocabulary")
    law, prefixes = torch.ones(1, dtype=torch.float64), input_ids  # law of the prefixes so far, (V^i,)
    for _ in range(n_tokens):
        p = probs_from_logits(model(prefixes).logits[:, -1].double(), temperature)  # (V^i, V)
        law = (law[:, None] * p).flatten()  # (V^(i+1),)
        prefixes = torch.cat([prefixes.repeat_interleave(V, 0), torch.arange(V).repeat(prefixes.shape[0])[:, None]], 1)
    return law


def continuation_counts(sample, V: int, n_tokens: int, n: int) -> Tensor:
    """How often each continuation came out of `n` calls of `sample() -> (n_tokens,) ids`, indexed as
    in `continuation_law`: (V ** n_tokens,)."""
    counts = torch.zeros(V**n_tokens, dtype=torch.float64)
    place = V ** torch.arange(n_tokens - 1, -1, -1)
    for _ in range(n):
        counts[int((sample().cpu() * place).sum())] += 1
    return counts


def chi_square_pvalue(counts: Tensor, law: Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit of observed counts to a law; outcomes expected fewer than
    `min_expected` times are pooled into one cell (the test's usual validity condition). NaN when
    fewer than two cells remain: too few draws to test anything."""
    from scipy.stats import chisquare

    expected = law.double() / law.sum() * counts.sum()
    keep = expected >= min_expected
    obs = torch.cat([counts.double()[keep], counts.double()[~keep].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    if exp[-1] == 0:  # nothing to pool
        obs, exp = obs[:-1], exp[:-1]
    if obs.numel() < 2:
        return float("nan")
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)
