"""Knowledge distillation: a student learns the teacher's next-token distribution.

Divergences between the teacher's distribution p and the student's q, per token, averaged
over the positions a mask selects:
    forward KL   KL(p‖q) at temperature T, times T² (Hinton et al., 2015)
    reverse KL   KL(q‖p), mode-seeking (MiniLLM, Gu et al., 2024)
    JSD(β)       β KL(p‖m) + (1-β) KL(q‖m), m = βp + (1-β)q (GKD, Agarwal et al., 2024)
plus top-k logit KD (the teacher keeps only its k largest logits), a hidden-state loss
through a learned projection, and on-policy distillation (the student samples, the teacher
scores its samples; GKD).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_fields


def _mean(per_token: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of a (..., L) per-token loss over the positions where mask is true (all if None)."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """T² · KL(p_T ‖ q_T), p = softmax(teacher/T), q = softmax(student/T); Hinton et al., Eq. 2.

    Args:
        student_logits, teacher_logits: (..., vocab).
        mask: (...) positions to average over (None: all).
    """
    log_q = F.log_softmax(student_logits.float() / temperature, -1)  # (..., V)
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)
    return temperature**2 * _mean(kl, mask)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """T² · KL(q_T ‖ p_T): the student is penalised for mass where the teacher has little."""
    return forward_kl(teacher_logits, student_logits, temperature, mask)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0,
                    mask: Tensor | None = None) -> Tensor:
    """JSD(β) = β KL(p‖m) + (1-β) KL(q‖m), m = βp + (1-β)q, p teacher, q student (GKD, Eq. 3).

    β = 0.5 is the symmetric Jensen-Shannon divergence (at most log 2 per token).
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    log_q = F.log_softmax(student_logits.float() / temperature, -1)  # (..., V)
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return temperature**2 * _mean(beta * kl_pm + (1 - beta) * kl_qm, mask)


def teacher_topk(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest teacher logits and their token ids, (..., k) each: what top-k KD stores."""
    values, indices = teacher_logits.float().topk(k, dim=-1)
    return values, indices


def topk_kd(student_logits: Tensor, top_values: Tensor, top_indices: Tensor, temperature: float = 1.0,
            mask: Tensor | None = None) -> Tensor:
    """Forward KL from the teacher's top-k distribution (renormalised over its k tokens) to the student.

    T² Σ_k p_k (log p_k − log q[idx_k]), with q the student's full softmax; with k = vocab it is
    `forward_kl`. Storing k values instead of the vocabulary saves V/k of the teacher's memory.

    Args:
        top_values, top_indices: (..., k) from `teacher_topk`.
    """
    log_p = F.log_softmax(top_values.float() / temperature, -1)  # (..., k)
    log_q = F.log_softmax(student_logits.float() / temperature, -1).gather(-1, top_indices)  # (..., k)
    return temperature**2 * _mean((log_p.exp() * (log_p - log_q)).sum(-1), mask)


def hidden_state_loss(student_hidden: Tensor, teacher_hidden: Tensor, proj: nn.Module, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between the projected student and the teacher hidden states.

    ‖W h_s − h_t‖² / d_t per token; `proj` (a learned d_s → d_t linear) maps the student's width
    onto the teacher's (Minitron's intermediate-state loss; TinyBERT's W_h).

    Args:
        student_hidden: (..., d_s); teacher_hidden: (..., d_t).
    """
    diff = proj(student_hidden.float()) - teacher_hidden.float()  # (..., d_t)
    return _mean(diff.pow(2).mean(-1), mask)


def cross_entropy(student_logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Hard-label loss: −log q(label), the baseline every KD variant is compared with."""
    nll = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    return _mean(nll, mask)


# name -> (divergence(student_logits, teacher_logits, temperature, mask), paper)
DIVERGENCES: dict[str, tuple[Callable, str]] = {
    "forward_kl": (forward_kl, "https://arxiv.org/abs/1503.02531"),
    "reverse_kl": (reverse_kl, "https://arxiv.org/abs/2306.08543"),
    "jsd": (lambda s, t, temperature=1.0, mask=None: generalized_jsd(s, t, 0.5, temperature, mask),
            "https://arxiv.org/abs/2306.13649"),
}


@dataclass
class KDConfig:
    divergence: str = "forward_kl"  # a key of DIVERGENCES
    temperature: float = 1.0  # softens both distributions; the loss is scaled by T²
    alpha: float = 0.0  # weight of the hard-label cross-entropy added to the divergence
    top_k: int | None = None  # teacher keeps only its k largest logits (forward KL only)
    hidden_weight: float = 0.0  # weight of the hidden-state loss (needs projections)
    on_policy: float = 0.0  # λ: fraction of batches on which the student samples its own continuation
    prompt_len: int = 16  # on-policy: tokens of each sequence kept as the prompt
    sample_temperature: float = 1.0  # on-policy: student sampling temperature

    def __post_init__(self):
        check_fields(self)
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {sorted(DIVERGENCES)}, got {self.divergence!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1 or not 0 <= self.on_policy <= 1:
            raise ValueError(f"alpha and on_policy must be in [0, 1], got {self.alpha}, {self.on_policy}")
        if self.top_k is not None and (self.top_k < 1 or self.divergence != "forward_kl"):
            raise ValueError("top_k needs top_k ≥ 1 and divergence='forward_kl'")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@torch.no_grad()
def sample_continuations(student: nn.Module, input_ids: Tensor, prompt_len: int, temperature: float = 1.0) -> Tensor:
    """The student's own continuation of each prompt, as long as the original sequence. (b, L) -> (b, L)."""
    student = _unwrap(student)
    was_training = student.training
    student.eval()
    prompt = input_ids[:, :prompt_len]  # (b, P)
    out = student.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=temperature,
                           top_k=0, top_p=1.0, max_new_tokens=input_ids.shape[1] - prompt_len,
                           min_new_tokens=input_ids.shape[1] - prompt_len, pad_token_id=0)
    student.train(was_training)
    return out[:, : input_ids.shape[1]]


def kd_loss_fn(teacher: nn.Module, config: KDConfig | None = None, projections: nn.ModuleDict | None = None,
               layer_map: dict[int, int] | None = None) -> Callable[[nn.Module, dict], Tensor]:
    """A `loss_fn(student, batch)` for `shrinklib.train.train` that distils `teacher` into the student.

    The batch has input_ids (and optionally attention_mask, labels, or cached teacher top-k
    logits as "top_values"/"top_indices"). On a fraction `on_policy` of batches the student
    first samples its own continuation of the first `prompt_len` tokens, and the loss is taken
    on the sampled tokens (GKD). With `hidden_weight`, `projections[str(i)]` maps student layer i's
    output onto teacher layer `layer_map[i]`'s.
    """
    config = config or KDConfig()
    divergence = DIVERGENCES[config.divergence][0]
    teacher.eval()

    def loss_fn(student: nn.Module, batch: dict) -> Tensor:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        mask = mask[:, 1:] if mask is not None else None  # predictions at positions 0..L-2
        on_policy = config.on_policy > 0 and torch.rand(()).item() < config.on_policy
        if on_policy:
            ids = sample_continuations(student, ids, config.prompt_len, config.sample_temperature)
            mask = torch.zeros_like(ids[:, 1:], dtype=torch.bool)
            mask[:, config.prompt_len - 1 :] = True  # only the student's own tokens are scored
        hidden = config.hidden_weight > 0
        out = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
        s_logits = out.logits[:, :-1]  # (b, L-1, V)
        t_hidden = None
        if "top_values" in batch and not on_policy:
            loss = topk_kd(s_logits, batch["top_values"][:, :-1], batch["top_indices"][:, :-1], config.temperature, mask)
        else:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
            t_logits, t_hidden = t_out.logits[:, :-1], t_out.hidden_states
            if config.top_k:
                loss = topk_kd(s_logits, *teacher_topk(t_logits, config.top_k), config.temperature, mask)
            else:
                loss = divergence(s_logits, t_logits, config.temperature, mask)
        if config.alpha and not on_policy:
            labels = batch.get("labels", batch["input_ids"])[:, 1:]
            ce_mask = labels != -100 if mask is None else mask & (labels != -100)
            loss = (1 - config.alpha) * loss + config.alpha * cross_entropy(s_logits, labels.clamp_min(0), ce_mask)
        if hidden:
            if t_hidden is None:
                with torch.no_grad():
                    t_hidden = teacher(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
            terms = [hidden_state_loss(out.hidden_states[s + 1], t_hidden[t + 1], projections[str(s)]) for s, t in layer_map.items()]
            loss = loss + config.hidden_weight * torch.stack(terms).mean()
        return loss

    return loss_fn


def hidden_projections(student: nn.Module, teacher: nn.Module, layer_map: dict[int, int]) -> nn.ModuleDict:
    """Learned d_student → d_teacher linears, one per mapped student layer, initialised to the identity where square."""
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    projs = nn.ModuleDict()
    for s in layer_map:
        lin = nn.Linear(d_s, d_t, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(d_t, d_s))
        projs[str(s)] = lin.to(next(student.parameters()).device)
    return projs


@torch.no_grad()
def cache_teacher_topk(teacher: nn.Module, input_ids: Tensor, k: int, batch_size: int = 4) -> tuple[Tensor, Tensor]:
    """Teacher top-k logits for every position of (n, L) ids, computed once: (n, L, k) values and ids.

    Several students (or several epochs) then distil from the cache without running the teacher.
    """
    device = next(teacher.parameters()).device
    vals, idx = [], []
    for start in range(0, input_ids.shape[0], batch_size):
        logits = teacher(input_ids[start : start + batch_size].to(device), use_cache=False).logits  # (b, L, V)
        v, i = teacher_topk(logits, k)
        vals.append(v.cpu())
        idx.append(i.cpu())
    return torch.cat(vals), torch.cat(idx)
