"""One training loop for fine-tuning, distillation and pretraining, built on `accelerate`.

`train(model, next_batch, loss_fn, config)` runs `config.steps` optimizer steps. The data
is a function of the step index (`next_batch(step) -> batch`), so a run is reproducible
and resumable, and `loss_fn(model, batch) -> scalar` decides what is learned (cross-entropy
on labels, a distillation loss against a teacher, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    lr: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # steps between calls of eval_fn (0: only at the end)
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form, recorded with the run

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError(f"steps and grad_accum must be ≥ 1, got {self.steps}, {self.grad_accum}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def causal_lm_loss(model: nn.Module, batch: dict) -> Tensor:
    """Next-token cross-entropy; the batch has input_ids (and labels with -100 where ignored)."""
    return model(**batch, use_cache=False).loss


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at a step: linear warm-up, then cosine decay."""
    import math

    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model: nn.Module,
    next_batch: Callable[[int], dict],
    loss_fn: Callable[[nn.Module, dict], Tensor] = causal_lm_loss,
    config: TrainConfig | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    params: list[nn.Parameter] | None = None,
) -> list[dict]:
    """Train `model` in place and return the history: one dict per step (step, loss, lr),
    plus the eval_fn results where it ran.

    Args:
        next_batch: micro-batch for a micro-step index (step * grad_accum + k).
        loss_fn: scalar loss of the model on a batch.
        params: the parameters to optimize (default: those with requires_grad).
    """
    from accelerate import Accelerator

    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    acc = Accelerator(gradient_accumulation_steps=config.grad_accum)
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, opt = acc.prepare(model, opt)
    model.train()
    history = []
    bar = tqdm(range(config.steps), desc="train", disable=not config.progress or not acc.is_local_main_process)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        total = 0.0
        for k in range(config.grad_accum):
            batch = {key: v.to(acc.device) if isinstance(v, Tensor) else v for key, v in next_batch(step * config.grad_accum + k).items()}
            with acc.accumulate(model):
                loss = loss_fn(model, batch)
                acc.backward(loss)
                if acc.sync_gradients and config.max_grad_norm:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                opt.zero_grad()
            total += loss.item() / config.grad_accum
        row = {"step": step + 1, "loss": total, "lr": opt.param_groups[0]["lr"]}
        if eval_fn and ((config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 == config.steps):
            model.eval()
            row.update(eval_fn(acc.unwrap_model(model)))
            model.train()
        history.append(row)
        bar.set_postfix(loss=f"{total:.3f}")
    model.eval()
    acc.free_memory()
    return history
