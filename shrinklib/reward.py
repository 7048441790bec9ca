"""Reward models: a causal LM's backbone with a scalar head, trained on preference pairs with
the Bradley-Terry loss −log σ(r(x, y⁺) − r(x, y⁻)) (Ouyang et al., 2022,
https://arxiv.org/abs/2203.02155), on a generated preference task with exact ground truth
and a label-noise rate, as in WARM (Ramé et al., 2024, https://arxiv.org/abs/2401.12187)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tasks import Example, format_prompt, make_examples


class RewardModel(nn.Module):
    """r(x, y): the backbone's last hidden state at the last real token, through a linear head."""

    def __init__(self, lm: nn.Module, head_seed: int = 0):
        super().__init__()
        self.backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        d = self.backbone.config.hidden_size
        self.head = nn.Linear(d, 1)
        g = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(1, d, generator=g) / d**0.5)
            self.head.bias.zero_()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (n, L, d)
        last = attention_mask.sum(1) - 1  # (n,) right padding: index of the last real token
        return self.head(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1)  # (n,)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """−mean log σ(r⁺ − r⁻)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@dataclass(frozen=True)
class PreferencePair:
    """A prompt, the answer the label prefers and the other; `flipped` marks a corrupted label."""

    prompt: str
    chosen: str
    rejected: str
    flipped: bool = False


def wrong_answer(example: Example, rng: random.Random) -> str:
    """A plausible wrong answer: a number off by 1–10, or a word/list with two items swapped."""
    a = example.answer
    if a.isdigit():
        return str(int(a) + rng.choice([-1, 1]) * rng.randint(1, 10))
    parts = a.split(" ") if " " in a else list(a)
    sep = " " if " " in a else ""
    for _ in range(100):
        i, j = rng.sample(range(len(parts)), 2)
        p = parts.copy()
        p[i], p[j] = p[j], p[i]
        if sep.join(p) != a:
            return sep.join(p)
    return a + a[-1]


def make_preferences(task: str, n: int, noise: float = 0.0, seed: int = 0) -> list[PreferencePair]:
    """`n` pairs (correct vs wrong answer); exactly round(noise · n) of them, drawn at random,
    have their label flipped (the wrong answer is "chosen").

    Args:
        task: a `shrinklib.tasks` task ("addition", "reversal", "copying", "sorting").
        noise: label-noise rate in [0, 1).
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    rng = random.Random(f"pref-{task}-{seed}")
    flip = set(rng.sample(range(n), round(noise * n)))
    pairs = []
    for i, e in enumerate(make_examples(task, n, seed)):
        w = wrong_answer(e, rng)
        pairs.append(PreferencePair(e.question, w, e.answer, True) if i in flip else PreferencePair(e.question, e.answer, w))
    return pairs


def encode(tokenizer, prompts: list[str], answers: list[str]) -> dict[str, Tensor]:
    """Right-padded ids and mask of prompt (chat format) + answer + end of turn."""
    eos = tokenizer.eos_token or ""
    rows = [tokenizer(format_prompt(tokenizer, p) + a + eos, add_special_tokens=False).input_ids for p, a in zip(prompts, answers)]
    L = max(map(len, rows))
    ids = torch.tensor([r + [tokenizer.pad_token_id] * (L - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def preference_batch(tokenizer, pairs: list[PreferencePair]) -> dict[str, Tensor]:
    """Chosen and rejected sequences in one batch: the first half chosen, the second rejected."""
    return encode(tokenizer, [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs])


def preference_loss(rm: nn.Module, batch: dict) -> Tensor:
    """Bradley-Terry loss of a reward model on a `preference_batch`."""
    r = rm(batch["input_ids"], batch["attention_mask"])  # (2n,)
    n = r.shape[0] // 2
    return bradley_terry_loss(r[:n], r[n:])


@torch.no_grad()
def reward_margins(rm: nn.Module, tokenizer, pairs: list[PreferencePair], batch_size: int = 32) -> Tensor:
    """r(correct) − r(wrong) per pair, whatever the (possibly flipped) label says."""
    device = next(rm.parameters()).device
    rm.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        b = preference_batch(tokenizer, chunk)
        r = rm(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu()
        n = len(chunk)
        sign = torch.tensor([-1.0 if p.flipped else 1.0 for p in chunk])
        out.append(sign * (r[:n] - r[n:]))
    return torch.cat(out)


def clean_accuracy(margins: Tensor) -> float:
    """Fraction of pairs where the correct answer gets the higher reward (the clean label)."""
    return (margins > 0).float().mean().item()


def memorization(margins: Tensor, pairs: list[PreferencePair]) -> float:
    """Among pairs with a flipped training label, the fraction where the model agrees with the
    corrupted label (prefers the wrong answer): how much of the noise it memorized."""
    flipped = torch.tensor([p.flipped for p in pairs])
    return (margins[flipped] < 0).float().mean().item() if flipped.any() else float("nan")
