"""What the merging notebook needs around the merges: a depth-truncated model that fine-tunes
in seconds on a CPU, fine-tuning on a generated task with the suite's loop, and a cheap exact
accuracy (teacher-forced greedy match of the whole answer, equal to greedy decoding's exact
match for the answer and its end-of-turn token)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import arch
from ..tasks import make_examples, supervised_batch
from ..train import TrainConfig, train


def truncate_layers(model: nn.Module, keep: int) -> nn.Module:
    """A copy of `model` with only its first `keep` decoder blocks (same embeddings, norm, head)."""
    if not 1 <= keep <= len(arch.blocks(model)):
        raise ValueError(f"keep must be in [1, {len(arch.blocks(model))}], got {keep}")
    small = copy.deepcopy(model)
    lay = arch.layout(small)
    arch.set_module(small, lay.blocks_path, nn.ModuleList(list(lay.blocks(small))[:keep]))
    small.config.num_hidden_layers = keep
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = small.config.layer_types[:keep]
    return small


def answer_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an answer token, and those tokens: the output head
    (49K × 576 for SmolLM2) runs on a few positions per example instead of all of them."""
    h = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # (n, L-1): position t predicts token t+1
    where = labels != -100
    return model.get_output_embeddings()(h[:, :-1][where]), labels[where]  # (m, V), (m,)


def answer_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy on the answer tokens only (the same value as `causal_lm_loss`, cheaper)."""
    logits, target = answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), target)


def task_batches(tokenizer, task: str, n: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Fixed supervised batches of a task (the training set is `n` examples drawn with `seed`)."""
    ex = make_examples(task, n, seed)
    return [supervised_batch(tokenizer, ex[i : i + batch_size]) for i in range(0, n, batch_size)]


def finetune_task(model: nn.Module, tokenizer, task: str, steps: int, lr: float = 1e-3, batch_size: int = 16,
                  n_train: int = 512, seed: int = 0, data_seed: int = 0, params: list | None = None) -> list[dict]:
    """Fine-tune `model` in place on a task's answers with `shrinklib.train.train`.

    Args:
        steps: optimizer steps; the data cycles through `n_train` examples drawn with `data_seed`.
        seed: seed of the run (shuffling of batches).
        params: the parameters trained (default: all that require grad).
    """
    batches = task_batches(tokenizer, task, n_train, batch_size, data_seed)
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), seed=seed, progress=False)
    return train(model, lambda i: batches[order[i % len(order)]], answer_loss, cfg, params=params)


@torch.no_grad()
def answer_metrics(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Exact match (every answer token is the greedy argmax under teacher forcing) and mean
    answer cross-entropy over supervised batches."""
    device = next(model.parameters()).device
    hits = total = 0
    nll = n_tok = 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        logits, target = answer_logits(model, b)  # (m, V), (m,) over the batch's answer tokens
        row = (b["labels"][:, 1:] != -100).nonzero()[:, 0]  # (m,) the example of each answer token
        wrong = torch.zeros(b["labels"].shape[0], device=device).index_add_(0, row, (logits.argmax(-1) != target).float())
        hits += (wrong == 0).sum().item()
        total += wrong.numel()
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
        n_tok += target.numel()
    return {"accuracy": hits / max(1, total), "loss": nll / max(1.0, n_tok)}
