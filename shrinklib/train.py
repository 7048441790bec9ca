"""One training loop for fine-tuning, distillation and pretraining, built on `accelerate`.

`train(model, next_batch, loss_fn, config)` runs `config.steps` optimizer steps. The data
is a function of the step index (`next_batch(step) -> batch`), so a run is reproducible
and resumable, and `loss_fn(model, batch) -> scalar` decides what is learned (cross-entropy
on labels, a distillation loss against a teacher, ...).

Checkpoint and resume: with `config.checkpoint_dir`, the model, the optimizer, the step, the
history and every process's random-number state are saved atomically every
`checkpoint_every` steps and at the end; a later call with the same directory continues
where the last checkpoint stopped and reaches the same result as an uninterrupted run.

Multi-process data parallel: launch the same script with
`torchrun --nproc_per_node N script.py` (gloo on CPU, NCCL on GPU). `next_batch` always
returns the *global* micro-batch; each process keeps its slice along dimension 0
(`config.split_batches`), so N processes and one process see the same data per step and
their results agree within float tolerance.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import check_fields
from .io import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


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
    checkpoint_dir: str | Path | None = None  # folder for checkpoint.pt (None: no checkpoints)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    resume: bool = True  # continue from checkpoint_dir's checkpoint when there is one
    split_batches: bool = True  # multi-process: each process takes its rows of the global batch

    def __post_init__(self):
        check_fields(self)
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError(f"steps and grad_accum must be ≥ 1, got {self.steps}, {self.grad_accum}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise ValueError(f"checkpoint_every and eval_every must be ≥ 0, got {self.checkpoint_every}, {self.eval_every}")


def causal_lm_loss(model: nn.Module, batch: dict) -> Tensor:
    """Next-token cross-entropy; the batch has input_ids (and labels with -100 where ignored)."""
    return model(**batch, use_cache=False).loss


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at a step: linear warm-up, then cosine decay."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def shard_batch(batch: dict, rank: int, world: int) -> dict:
    """This process's rows of a global batch: every tensor with a batch dimension is split along dim 0."""
    out = {}
    for key, v in batch.items():
        if isinstance(v, Tensor) and v.ndim >= 1:
            if v.shape[0] % world:
                raise ValueError(f"batch[{key!r}] has {v.shape[0]} rows, not divisible by {world} processes")
            n = v.shape[0] // world
            v = v[rank * n : (rank + 1) * n]
        out[key] = v
    return out


def rng_state() -> dict:
    """The state of every random-number generator a training step may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("steps", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_accum", "max_grad_norm", "seed")


def save_checkpoint(path: str | Path, model: nn.Module, opt, step: int, history: list[dict], rng: list[dict], config: TrainConfig) -> None:
    """Write model, optimizer, step, history and per-process RNG states to one file, atomically."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "history": history,
        "rng": rng,
        "config": {k: getattr(config, k) for k in RESUME_KEYS},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, config: TrainConfig) -> dict | None:
    """The checkpoint at `path` (None when there is none); a clear error if it came from another setup."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    diff = {k: (v, getattr(config, k)) for k, v in state["config"].items() if getattr(config, k) != v}
    if diff:
        raise ValueError(
            f"{path} was written by a run with other settings {diff} (checkpoint, now); "
            "resume with the same TrainConfig, or use another checkpoint_dir / resume=False"
        )
    return state


def _all_rng_states(acc) -> list[dict]:
    """RNG states of every process, in rank order (collected on every process)."""
    mine = rng_state()
    if acc.num_processes == 1:
        return [mine]
    import torch.distributed as dist

    out: list = [None] * acc.num_processes
    dist.all_gather_object(out, mine)
    return out


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
        next_batch: the global micro-batch for a micro-step index (step * grad_accum + k);
            in a multi-process run each process keeps its rows (config.split_batches).
        loss_fn: scalar loss of the model on a batch (mean over its rows).
        config: steps, learning rate, accumulation, checkpointing (TrainConfig).
        eval_fn: called on the unwrapped model every `eval_every` steps and at the end,
            on every process; returns a dict merged into that step's history row.
        params: the parameters to optimize (default: those with requires_grad).
    """
    from accelerate import Accelerator

    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    # cpu=True lets accelerate see a torchrun launch on a machine without GPUs (gloo backend). A
    # single process trains where the model is (a CPU model stays on the CPU of a GPU machine);
    # in a multi-process launch accelerate places each rank's copy.
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    acc = Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=not torch.cuda.is_available(),
                      device_placement=not single)
    device = next(model.parameters()).device if single else acc.device
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    start, history = 0, []
    state = load_checkpoint(ckpt_path, config) if ckpt_path and config.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], list(state["history"])
        if len(state["rng"]) == acc.num_processes:
            set_rng_state(state["rng"][acc.process_index])
        else:
            warnings.warn(f"checkpoint has RNG states of {len(state['rng'])} processes, this run has "
                          f"{acc.num_processes}: random draws after resuming will differ")
            torch.manual_seed(config.seed + start + acc.process_index)
        del state
    model, opt = acc.prepare(model, opt)
    model.train()
    world, rank = acc.num_processes, acc.process_index
    bar = tqdm(range(start, config.steps), desc="train", initial=start, total=config.steps,
               disable=not config.progress or not acc.is_local_main_process)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        total = 0.0
        for k in range(config.grad_accum):
            batch = next_batch(step * config.grad_accum + k)
            if world > 1 and config.split_batches:
                batch = shard_batch(batch, rank, world)
            batch = {key: v.to(device) if isinstance(v, Tensor) else v for key, v in batch.items()}
            with acc.accumulate(model):
                loss = loss_fn(model, batch)
                acc.backward(loss)
                if acc.sync_gradients and config.max_grad_norm:
                    acc.clip_grad_norm_(params, config.max_grad_norm)
                opt.step()
                opt.zero_grad()
            total += acc.gather(loss.detach()[None]).mean().item() / config.grad_accum
        row = {"step": step + 1, "loss": total, "lr": opt.param_groups[0]["lr"]}
        if eval_fn and ((config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 == config.steps):
            model.eval()
            row.update(eval_fn(acc.unwrap_model(model)))
            model.train()
        history.append(row)
        bar.set_postfix(loss=f"{total:.3f}")
        last = step + 1 == config.steps
        if ckpt_path and (last or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0)):
            rng = _all_rng_states(acc)
            if acc.is_main_process:
                save_checkpoint(ckpt_path, acc.unwrap_model(model), opt, step + 1, history, rng, config)
            acc.wait_for_everyone()
    model.eval()
    acc.free_memory()
    return history


def finetune_task(model: nn.Module, batches: list[dict], steps: int, lr: float = 1e-3, seed: int = 0,
                  params: list | None = None, loss_fn: Callable[[nn.Module, dict], Tensor] | None = None) -> list[dict]:
    """Fine-tune `model` in place on fixed batches with `train`.

    Args:
        batches: the training set as fixed batches (`tasks.task_batches`, or their `calib.cache_prefix`).
        steps: optimizer steps; each epoch visits the batches in an order drawn with `seed`.
        seed: seed of the run (batch order, dropout).
        params: the parameters trained (default: all that require grad).
        loss_fn: loss of the model on a batch (default: `tasks.answer_loss`, cross-entropy on the answer tokens).
    """
    from .tasks import answer_loss

    g = torch.Generator().manual_seed(seed)
    order = [i for _ in range(-(-steps // len(batches))) for i in torch.randperm(len(batches), generator=g).tolist()]
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), seed=seed, progress=False)
    return train(model, lambda i: batches[order[i]], loss_fn or answer_loss, cfg, params=params)
