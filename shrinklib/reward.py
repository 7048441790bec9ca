"""Reward models: a causal LM's backbone with a scalar head, trained on preference pairs with
the Bradley-Terry loss −log σ(r(x, y⁺) − r(x, y⁻)) (Ouyang et al., 2022,
https://arxiv.org/abs/2203.02155), on a generated preference task with exact ground truth
and a label-noise rate, as in WARM (Ramé et al., 2024, https://arxiv.org/abs/2401.12187).

`RewardModel` runs the whole backbone; `LastMLPRewardModel` is the same reward when only the
last block's MLP, the final norm and the head are fine-tuned, computed from features that the
frozen model produces once per pair (`last_mlp_features`), so many reward models train in
seconds on a CPU.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import arch
from .calib import to_device
from .tasks import Example, format_prompt, make_examples


class RewardModel(nn.Module):
    """r(x, y): the backbone's last hidden state at the last real token, through a linear head."""

    def __init__(self, lm: nn.Module, head_seed: int = 0):
        super().__init__()
        self.backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
        self.head = self.new_head(self.backbone.config.hidden_size, head_seed)

    @staticmethod
    def new_head(d: int, seed: int) -> nn.Linear:
        """A d → 1 linear head with N(0, 1/d) weights drawn with `seed` and a zero bias."""
        head = nn.Linear(d, 1)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, d, generator=torch.Generator().manual_seed(seed)) / d**0.5)
            head.bias.zero_()
        return head

    def forward(self, batch: dict) -> Tensor:
        h = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        h = h.last_hidden_state  # (n, L, d)
        last = batch["attention_mask"].sum(1) - 1  # (n,) right padding: index of the last real token
        return self.head(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1)  # (n,)


@torch.no_grad()
def last_mlp_features(lm: nn.Module, batch: dict) -> dict[str, Tensor]:
    """What the last block's MLP reads at the last real token, x, and the residual stream h it
    is added to (block output = h + MLP(x)), both (n, d): computed once by the frozen model."""
    block = arch.blocks(lm)[-1]
    seen = {}
    hook = block.register_forward_hook(lambda m, args, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    try:
        with arch.record_mlp_branch(lm, block, seen):  # seen["x"]: the MLP's input, seen["y"]: what it adds
            lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        hook.remove()
    rows = torch.arange(batch["input_ids"].shape[0])
    last = batch["attention_mask"].sum(1) - 1  # (n,) right padding: index of the last real token
    x, y = (seen[k].reshape(seen["h"].shape) for k in ("x", "y"))  # (n, L, d); OPT flattens the tokens
    return {"x": x[rows, last], "h": (seen["h"] - y)[rows, last]}


class LastMLPRewardModel(nn.Module):
    """The same reward as `RewardModel` when only the last block's MLP, the final norm and the
    head are trained, computed from `last_mlp_features`: r = head(norm(h + MLP(x))). Its
    weights are copies, so M reward models share one frozen backbone."""

    def __init__(self, lm: nn.Module, head_seed: int = 0, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)  # on the MLP's output (the residual branch), in training only
        self.mlp = copy.deepcopy(arch.mlp_branch(lm, arch.blocks(lm)[-1]))  # the MLP branch (with any post-norm)
        self.norm = copy.deepcopy(arch.layout(lm).final_norm(lm))
        self.head = RewardModel.new_head(lm.config.hidden_size, head_seed)
        self.requires_grad_(True)

    def forward(self, batch: dict) -> Tensor:
        return self.head(self.norm(batch["h"] + self.dropout(self.mlp(batch["x"])))).squeeze(-1)  # (n,)


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
    r = rm(batch)  # (2n,)
    n = r.shape[0] // 2
    return bradley_terry_loss(r[:n], r[n:])


def preference_batches(tokenizer, pairs: list[PreferencePair], batch_size: int, features=None) -> list[dict]:
    """The pairs as `preference_batch`es of `batch_size` pairs each, in order; `features(batch)`
    (e.g. `last_mlp_features` of the frozen model) replaces each by what a reward model reads."""
    out = [preference_batch(tokenizer, pairs[i : i + batch_size]) for i in range(0, len(pairs), batch_size)]
    return [features(b) for b in out] if features else out


@torch.no_grad()
def reward_margins(rm: nn.Module, batches: list[dict], pairs: list[PreferencePair]) -> Tensor:
    """r(correct) − r(wrong) per pair, whatever the (possibly flipped) label says.

    Args:
        batches: `preference_batches` of `pairs`, in order.
    """
    rm.eval()
    device = next(rm.parameters()).device
    diffs = []
    for b in batches:
        b = to_device(b, device)
        r = rm(b).float().cpu()  # (2n,): chosen, then rejected
        diffs.append(r[: len(r) // 2] - r[len(r) // 2 :])
    sign = torch.tensor([-1.0 if p.flipped else 1.0 for p in pairs])
    return sign * torch.cat(diffs)


def clean_accuracy(margins: Tensor) -> float:
    """Fraction of pairs where the correct answer gets the higher reward (the clean label)."""
    return (margins > 0).float().mean().item()


def memorization(margins: Tensor, pairs: list[PreferencePair]) -> float:
    """Among pairs with a flipped training label, the fraction where the model agrees with the
    corrupted label (prefers the wrong answer): how much of the noise it memorized."""
    flipped = torch.tensor([p.flipped for p in pairs])
    return (margins[flipped] < 0).float().mean().item() if flipped.any() else float("nan")
