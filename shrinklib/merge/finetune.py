"""Where the merging notebook's fine-tuning helpers used to live; they are plumbing of the whole
suite now: `train.finetune_task`, `tasks.task_batches`, `tasks.answer_loss`, `tasks.answer_metrics`,
`calib.cache_prefix` and `calib.final_hidden`. Kept as names for old imports."""

from __future__ import annotations

from torch import nn

from ..calib import cache_prefix, final_hidden  # noqa: F401
from ..tasks import answer_logits, answer_loss, answer_metrics, task_batches  # noqa: F401
from ..train import finetune_task  # noqa: F401


def truncate_layers(model: nn.Module, keep: int) -> nn.Module:
    """A copy of `model` with only its first `keep` decoder blocks (`smallllm.depth_pruned`)."""
    from ..smallllm import depth_pruned

    return depth_pruned(model, list(range(keep)))
