"""LLM-Pruner (Ma, Fang & Wang, 2023): remove whole dependency groups of a Llama block, chosen
by first-order Taylor importance, and recover with a short LoRA fine-tune.

Dependency groups of one block (everything that must go together so the shapes still fit):
- an attention head h: rows h·hd..(h+1)·hd of q_proj and the same columns of o_proj. Under
  grouped-query attention every KV group must keep the same number of query heads (Llama's
  repeat_kv maps query head i to KV head i // (heads / kv_heads)), so the same number of
  query heads is removed from every KV group; k_proj and v_proj stay.
- an MLP channel j: row j of gate_proj and up_proj, column j of down_proj.
The same number of groups goes in every block, so the result is an ordinary Llama with a
smaller config (`num_attention_heads`, `intermediate_size`), saved and loaded by transformers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..arch import LLAMA_ROLES, UnsupportedArchitectureError, blocks, layout
from ..checks import check_fields

REDUCTIONS = {"sum": lambda s: s.sum(0), "mean": lambda s: s.mean(0), "max": lambda s: s.amax(0), "prod": lambda s: s.prod(0)}


def check_llama(model: nn.Module) -> None:
    """Raise a clear error unless the model has Llama blocks (q/k/v/o, gate/up/down, RMSNorm)."""
    lay = layout(model)
    block = blocks(model)[0]
    missing = [p for p in LLAMA_ROLES if not _has(block, p)]
    if lay.roles() != LLAMA_ROLES or missing or not hasattr(model.config, "num_key_value_heads"):
        raise UnsupportedArchitectureError(
            f"structured pruning needs a Llama-architecture block (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj, "
            f"grouped-query attention); '{lay.model_type}' does not have it (missing: {missing or 'roles differ'})"
        )


def _has(root: nn.Module, path: str) -> bool:
    try:
        for part in path.split("."):
            root = getattr(root, part)
        return isinstance(root, nn.Linear)
    except AttributeError:
        return False


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
    params = {n: p for n, p in model.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
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
                     config: LLMPrunerConfig) -> tuple[Tensor, Tensor]:
    """(head scores (n_heads,), channel scores (intermediate,)) of one block."""
    att, mlp, reduce = block.self_attn, block.mlp, REDUCTIONS[config.reduction]

    def score(lin, name, n, dim):
        return taylor_group_scores(lin.weight, grads[f"{prefix}.{name}.weight"], n, dim, config.aggregation)

    heads = reduce(torch.stack([score(att.q_proj, "self_attn.q_proj", n_heads, 0), score(att.o_proj, "self_attn.o_proj", n_heads, 1)]))
    inter = mlp.gate_proj.out_features
    channels = reduce(torch.stack([score(mlp.gate_proj, "mlp.gate_proj", inter, 0), score(mlp.up_proj, "mlp.up_proj", inter, 0),
                                   score(mlp.down_proj, "mlp.down_proj", inter, 1)]))
    return heads, channels


def _sliced(lin: nn.Linear, keep: Tensor, dim: int) -> nn.Linear:
    """A new Linear with only the kept output rows (dim 0) or input columns (dim 1)."""
    W = lin.weight.data.index_select(dim, keep)
    new = nn.Linear(W.shape[1], W.shape[0], bias=lin.bias is not None, device=W.device, dtype=W.dtype)
    new.weight.data.copy_(W)
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data if dim == 1 else lin.bias.data[keep])
    return new


def prune_block_(block: nn.Module, keep_heads: Tensor, keep_channels: Tensor, head_dim: int, kv_heads: int) -> None:
    """Remove every head not in keep_heads and every MLP channel not in keep_channels (sorted ids)."""
    att, mlp = block.self_attn, block.mlp
    rows = (keep_heads[:, None] * head_dim + torch.arange(head_dim, device=keep_heads.device)).flatten()
    att.q_proj, att.o_proj = _sliced(att.q_proj, rows, 0), _sliced(att.o_proj, rows, 1)
    att.num_key_value_groups = len(keep_heads) // kv_heads
    mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, keep_channels, 0), _sliced(mlp.up_proj, keep_channels, 0)
    mlp.down_proj = _sliced(mlp.down_proj, keep_channels, 1)


@torch.no_grad()
def llm_prune_(model: nn.Module, config: LLMPrunerConfig, calib_ids: Tensor, batch_size: int = 4) -> dict:
    """Prune a Llama-architecture model in place by Taylor importance; returns what was removed.

    Args:
        model: a Llama-family causal LM (raises UnsupportedArchitectureError otherwise).
        config: ratios and importance aggregation.
        calib_ids: (n, L) calibration ids for the gradients.
    """
    check_llama(model)
    cfg = model.config
    n_heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    per_kv = n_heads // kv
    drop_per_kv = round((config.ratio if config.head_ratio is None else config.head_ratio) * per_kv)
    drop_per_kv = min(drop_per_kv, per_kv - 1)  # keep at least one query head per KV group
    n_channels = cfg.intermediate_size - int(cfg.intermediate_size * config.ratio)
    grads = taylor_grads(model, calib_ids, batch_size)
    removed = {"heads": [], "channels": [], "head_scores": [], "channel_scores": []}
    for i, block in enumerate(blocks(model)):
        heads, channels = block_importance(block, grads, f"{layout(model).blocks_path}.{i}", n_heads, config)
        by_kv = heads.reshape(kv, per_kv)  # (kv groups, query heads per group)
        keep_in_group = torch.topk(by_kv, per_kv - drop_per_kv, dim=1).indices.sort(1).values
        keep_heads = (keep_in_group + per_kv * torch.arange(kv, device=heads.device)[:, None]).flatten()
        keep_channels = torch.topk(channels, n_channels).indices.sort().values
        removed["heads"].append(sorted(set(range(n_heads)) - set(keep_heads.tolist())))
        removed["channels"].append(cfg.intermediate_size - n_channels)
        removed["head_scores"].append(heads.tolist())
        removed["channel_scores"].append(channels)
        prune_block_(block, keep_heads, keep_channels, head_dim, kv)
    cfg.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
    cfg.num_attention_heads = kv * (per_kv - drop_per_kv)
    cfg.intermediate_size = n_channels
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

    targets = [p.rsplit(".", 1)[-1] for p in LLAMA_ROLES]
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing; nothing for us to change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    history = train(peft_model, next_batch, config=TrainConfig(steps=steps, lr=lr, warmup_steps=min(5, steps // 5), progress=progress))
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged, history
