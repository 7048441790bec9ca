"""What the merging notebook needs around the merges: fine-tuning only the top blocks of a
model on what its frozen lower blocks compute, cached once per example (`cache_prefix`), so a
training step or an evaluation runs a few blocks; a fine-tuning loop over fixed batches (the
suite's `train`); and a cheap exact accuracy (teacher-forced greedy match of the whole answer,
equal to greedy decoding's exact match for the answer and its end-of-turn token)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import arch
from ..calib import _to, block_inputs
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


def cache_prefix(model: nn.Module, batch: dict, start: int) -> dict:
    """`batch` plus what block `start` receives: the hidden states computed once by the frozen
    embeddings and blocks below it, and the block call's other arguments (position embeddings,
    mask). `final_hidden` then runs only blocks `start`, `start + 1`, ... on it."""
    hidden, kwargs = block_inputs(model, start, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {**batch, "hidden": hidden, "block_kwargs": kwargs, "start": start}


def final_hidden(model: nn.Module, batch: dict) -> torch.Tensor:
    """The decoder's last hidden states (n, L, d), after its final norm: from the token ids, or
    from a `cache_prefix` batch by running only the blocks above the cached ones."""
    if "hidden" not in batch:
        out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state
    h = batch["hidden"]  # (n, L, d) entering block `start`
    for block in arch.blocks(model)[batch["start"]:]:
        out = block(h, **batch["block_kwargs"])
        h = out[0] if isinstance(out, tuple) else out
    return arch.layout(model).final_norm(model)(h)


def answer_logits(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an answer token, and those tokens: the output head
    (49K × 576 for SmolLM2) runs on a few positions per example instead of all of them."""
    h = final_hidden(model, batch)  # (n, L, d)
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


def finetune_task(model: nn.Module, batches: list[dict], steps: int, lr: float = 1e-3, seed: int = 0,
                  params: list | None = None, loss_fn=answer_loss) -> list[dict]:
    """Fine-tune `model` in place on fixed batches with `shrinklib.train.train`.

    Args:
        batches: the training set as fixed batches (`task_batches`, or their `cache_prefix`).
        steps: optimizer steps; each epoch visits the batches in an order drawn with `seed`.
        seed: seed of the run (batch order, dropout).
        params: the parameters trained (default: all that require grad).
        loss_fn: loss of the model on a batch (default: cross-entropy on the answer tokens).
    """
    g = torch.Generator().manual_seed(seed)
    order = [i for _ in range(-(-steps // len(batches))) for i in torch.randperm(len(batches), generator=g).tolist()]
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), seed=seed, progress=False)
    return train(model, lambda i: batches[order[i]], loss_fn, cfg, params=params)


@torch.no_grad()
def answer_metrics(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Exact match (every answer token is the greedy argmax under teacher forcing) and mean
    answer cross-entropy over supervised batches."""
    device = next(model.parameters()).device
    hits = total = 0
    nll = n_tok = 0.0
    for b in batches:
        b = _to(b, device)  # also the cached block arguments (position embeddings) of a `cache_prefix` batch
        logits, target = answer_logits(model, b)  # (m, V), (m,) over the batch's answer tokens
        row = (b["labels"][:, 1:] != -100).nonzero()[:, 0]  # (m,) the example of each answer token
        wrong = torch.zeros(b["labels"].shape[0], device=device).index_add_(0, row, (logits.argmax(-1) != target).float())
        hits += (wrong == 0).sum().item()
        total += wrong.numel()
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
        n_tok += target.numel()
    return {"accuracy": hits / max(1, total), "loss": nll / max(1.0, n_tok)}
