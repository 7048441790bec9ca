"""LLM-Pruner (Ma, Fang & Wang, 2023): remove whole dependency groups of a decoder block, chosen
by first-order Taylor importance, and recover with a short LoRA fine-tune. Where the projections
are (fused or not, with or without biases) comes from `shrinklib.arch`; the groups below are named
as in Llama.

Dependency groups of one block (everything that must go together so the shapes still fit):
- an attention head h: rows h·hd..(h+1)·hd of q_proj and the same columns of o_proj. Under
  grouped-query attention every KV group must keep the same number of query heads (Llama's
  repeat_kv maps query head i to KV head i // (heads / kv_heads)), so the same number of
  query heads is removed from every KV group; k_proj and v_proj stay.
- an MLP channel j: row j of gate_proj and up_proj, column j of down_proj.
The same number of groups goes in every block, so the result is an ordinary model with a
smaller config (`num_attention_heads`, `intermediate_size`), saved and loaded by transformers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import arch
from ..checks import check_fields

REDUCTIONS = {"sum": lambda s: s.sum(0), "mean": lambda s: s.mean(0), "max": lambda s: s.amax(0), "prod": lambda s: s.prod(0)}


def check_supported(model: nn.Module) -> arch.Layout:
    """The model's layout, or a clear error before any work if LLM-Pruner cannot slice it."""
    return arch.require(model, "llm_pruner", "LLM-Pruner")


@dataclass(frozen=True)
class LLMPrunerConfig:
    """ratio: fraction of MLP channels removed in every block; head_ratio: fraction of the query
    heads of every KV group removed (default: ratio, rounded to whole heads);
    aggregation: "element" (Σ|w·g| over a group's weights) or "vector" (|Σ w·g| per weight
    matrix slice); reduction: how the slices of one group combine ("sum", "mean", "max", "prod")."""

    ratio: float = 0.2
    head_ratio: float | None = None
    aggregation: str = "element"
    reduction: str = "sum"

    def __post_init__(self):
        check_fields(self)
        for name, r in (("ratio", self.ratio), ("head_ratio", self.head_ratio)):
            if r is not None and not 0.0 <= r < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {r}")
        if self.aggregation not in ("element", "vector"):
            raise ValueError(f"aggregation must be 'element' or 'vector', got {self.aggregation!r}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {self.reduction!r}")


def taylor_grads(model: nn.Module, calib_ids: Tensor, batch_size: int = 4) -> dict[str, Tensor]:
    """∂L/∂W of the mean next-token loss on the calibration ids, for every linear of every block."""
    wanted = set(arch.block_weight_names(model))
    params = {n: p for n, p in model.named_parameters() if n in wanted}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
        p.grad = None
    device = next(model.parameters()).device
    n_batches = -(-calib_ids.shape[0] // batch_size)
    with torch.enable_grad():
        for start in range(0, calib_ids.shape[0], batch_size):
            x = calib_ids[start : start + batch_size].to(device)
            (model(x, labels=x, use_cache=False).loss / n_batches).backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    for n, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(saved[n])
    return grads


def taylor_group_scores(W: Tensor, G: Tensor, n_groups: int, dim: int, aggregation: str) -> Tensor:
    """Importance of each of `n_groups` equal slices of W along `dim` (0: rows, 1: columns).

    element: Σ |W ⊙ G| over the slice; vector: |Σ W ⊙ G| over the slice (the first-order
    Taylor estimate of the loss change when the slice is removed, LLM-Pruner Eq. 4/5).
    """
    WG = (W * G).float()  # (out, in)
    if dim == 1:
        WG = WG.T
    WG = WG.reshape(n_groups, -1)  # (groups, elements per group)
    return WG.abs().sum(1) if aggregation == "element" else WG.sum(1).abs()


def block_importance(block: nn.Module, grads: dict[str, Tensor], prefix: str, n_heads: int,
                     config: LLMPrunerConfig, lay: arch.Layout, model_config) -> tuple[Tensor, Tensor]:
    """(head scores (n_heads,), channel scores (intermediate,)) of one block.

    Args:
        lay, model_config: the model's `shrinklib.arch` layout and config (where q, o, gate, up, down are).
    """
    reduce = REDUCTIONS[config.reduction]

    def score(name, n, dim):
        lin, rows = arch.proj_slice(lay, block, model_config, name)
        G = grads[f"{prefix}.{getattr(lay.arch, name).path}.weight"]
        return taylor_group_scores(lin.weight[rows], G[rows], n, dim, config.aggregation)

    heads = reduce(torch.stack([score("q", n_heads, 0), score("o", n_heads, 1)]))
    inter = arch.proj_slice(lay, block, model_config, "up")[1]
    inter = inter.stop - inter.start
    channels = reduce(torch.stack([score(n, inter, 0) for n in ("gate", "up") if getattr(lay.arch, n) is not None]
                                  + [score("down", inter, 1)]))
    return heads, channels


def prune_block_(model: nn.Module, block: nn.Module, keep_heads: Tensor, keep_channels: Tensor) -> None:
    """Remove every head not in keep_heads (its q rows, o columns) and every MLP channel not in
    keep_channels (gate/up rows, down columns) of one block; sorted ids."""
    lay = arch.layout(model)
    arch.keep_block_heads_(lay, block, model.config, keep_heads)
    arch.select_mlp_channels_(lay, block, model.config, keep_channels)


@torch.no_grad()
def llm_prune_(model: nn.Module, config: LLMPrunerConfig, calib_ids: Tensor, batch_size: int = 4) -> dict:
    """Prune a Llama-architecture model in place by Taylor importance; returns what was removed.

    Args:
        model: a causal LM of an architecture `shrinklib.arch` knows (UnsupportedArchitectureError otherwise).
        config: ratios and importance aggregation.
        calib_ids: (n, L) calibration ids for the gradients.
    """
    lay = check_supported(model)
    cfg = model.config
    n_heads, kv, inter = cfg.num_attention_heads, arch.kv_heads(cfg), lay.mlp_width(cfg)
    per_kv = n_heads // kv
    drop_per_kv = round((config.ratio if config.head_ratio is None else config.head_ratio) * per_kv)
    drop_per_kv = min(drop_per_kv, per_kv - 1)  # keep at least one query head per KV group
    n_channels = inter - int(inter * config.ratio)
    grads = taylor_grads(model, calib_ids, batch_size)
    removed = {"heads": [], "channels": [], "head_scores": [], "channel_scores": []}
    keep = []
    for i, block in enumerate(lay.blocks(model)):
        heads, channels = block_importance(block, grads, f"{lay.blocks_path}.{i}", n_heads, config, lay, cfg)
        by_kv = heads.reshape(kv, per_kv)  # (kv groups, query heads per group)
        keep_in_group = torch.topk(by_kv, per_kv - drop_per_kv, dim=1).indices.sort(1).values
        keep_heads = (keep_in_group + per_kv * torch.arange(kv, device=heads.device)[:, None]).flatten()
        keep_channels = torch.topk(channels, n_channels).indices.sort().values
        removed["heads"].append(sorted(set(range(n_heads)) - set(keep_heads.tolist())))
        removed["channels"].append(inter - n_channels)
        removed["head_scores"].append(heads.tolist())
        removed["channel_scores"].append(channels)
        keep.append((keep_heads, keep_channels))
    for block, (keep_heads, keep_channels) in zip(lay.blocks(model), keep):  # scores first, then every block is cut
        prune_block_(model, block, keep_heads, keep_channels)
    arch.set_heads(cfg, kv * (per_kv - drop_per_kv))
    setattr(cfg, lay.arch.mlp_size, n_channels)
    return removed


def lora_recover_(model: nn.Module, next_batch, steps: int = 30, lr: float = 2e-4, r: int = 8, alpha: int = 16,
                  progress: bool = True) -> tuple[nn.Module, list[dict]]:
    """A short LoRA fine-tune on every block linear (LLM-Pruner's recovery stage), merged back.

    Args:
        next_batch: micro-step → batch dict with input_ids (and labels).
        steps: optimizer steps; lr: peak learning rate; r, alpha: LoRA rank and scale.

    Returns:
        (the model with the LoRA update merged into its weights, training history).
    """
    from peft import LoraConfig, get_peft_model

    from ..train import TrainConfig, train

    targets = arch.linear_leaf_names(model)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing; nothing for us to change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    history = train(peft_model, next_batch, config=TrainConfig(steps=steps, lr=lr, warmup_steps=min(5, steps // 5), progress=progress))
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, history
