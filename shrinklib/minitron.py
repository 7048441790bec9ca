"""Minitron: prune a trained LLM by width or depth from activation statistics, then distil.

Importance (Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge
Distillation", https://arxiv.org/abs/2407.14679, Sec. 2.2), from one forward pass over a
small calibration batch:
    attention head h   mean over tokens of ‖x_h W_O,hᵀ‖₂, the head's contribution to the
                       residual stream (the paper scores the head output before W_O)
    MLP neuron i       mean over tokens of |act(x W_gate,i) · x W_up,i|, the input of down_proj
    embedding channel  mean over tokens and layers of |RMSNorm(X)_c| at every norm's output
    layer              perplexity (LM loss) change when the layer is dropped, or the Block
                       Importance 1 − cos(x_in, x_out) (Sec. 2.2 and ShortGPT)
Width pruning keeps the most important neurons, heads and channels and slices the weights;
depth pruning removes whole layers. Both give an ordinary, smaller `transformers` model.
Any architecture of `shrinklib.arch` (GQA included); where one cannot take a step (e.g. embedding
channels of Gemma's scaled, tied embedding) it raises UnsupportedArchitectureError before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import arch
from .arch import Layout, get_path
from .checks import check_fields
from .io import staged_folder

MINITRON_URL = "https://arxiv.org/abs/2407.14679"
LLAMA_MINITRON_URL = "https://arxiv.org/abs/2408.11796"
LAYER_METRICS = ("ppl", "cosine")  # layer importance: loss increase when dropped, or Block Importance


@dataclass(frozen=True)
class MinitronDepthConfig:
    """Depth pruning (`prune_depth_`): drop the `n_drop` least important layers."""

    n_drop: int = 1
    metric: str = "ppl"  # one of LAYER_METRICS
    iterative: bool = False  # drop one layer at a time, re-scoring the rest

    def __post_init__(self):
        check_fields(self)
        if self.n_drop < 1:
            raise ValueError(f"n_drop must be ≥ 1, got {self.n_drop}")
        if self.metric not in LAYER_METRICS:
            raise ValueError(f"metric must be one of {LAYER_METRICS}, got {self.metric!r}")


@dataclass(frozen=True)
class MinitronWidthConfig:
    """Width pruning (`prune_width_iterative_`): keep the most important channels, neurons and heads."""

    hidden: int | None = None  # embedding channels kept
    intermediate: int | None = None  # MLP neurons kept per layer
    heads_per_group: int | None = None  # query heads kept per KV group
    iterations: int = 1  # importance re-estimated before each of this many stages (1: one shot)

    def __post_init__(self):
        check_fields(self)
        if all(v is None for v in (self.hidden, self.intermediate, self.heads_per_group)):
            raise ValueError("give at least one of hidden, intermediate, heads_per_group")
        for k in ("hidden", "intermediate", "heads_per_group", "iterations"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ValueError(f"{k} must be ≥ 1, got {getattr(self, k)}")


def require_minitron(model: nn.Module, what: str = "Minitron pruning") -> Layout:
    """The model's layout if Minitron's width pruning can slice it, else a clear error before any work."""
    return arch.require(model, "minitron_width", what)


head_dim = arch.head_dim


def non_embedding_params(config) -> int:
    """Parameters of the decoder blocks and final norm (embeddings and lm_head excluded), by the
    architecture's analytic formula (`shrinklib.arch.param_count`)."""
    return int(arch.param_count(config, embeddings=False))


@dataclass
class Importance:
    """Activation-based importance from calibration data (larger = more important)."""

    heads: Tensor  # (layers, query heads)
    neurons: Tensor  # (layers, intermediate)
    channels: Tensor  # (hidden,)
    n_tokens: int


@torch.no_grad()
def activation_importance(model: nn.Module, input_ids: Tensor, batch_size: int = 8) -> Importance:
    """Head, neuron and embedding-channel importance from one forward pass over (n, L) calibration ids."""
    lay = require_minitron(model, "Minitron importance")
    blocks, cfg = lay.blocks(model), model.config
    n, hd = len(blocks), head_dim(cfg)
    heads = torch.zeros(n, cfg.num_attention_heads)
    neurons = torch.zeros(n, lay.mlp_width(cfg))
    channels = torch.zeros(cfg.hidden_size)
    handles = []

    def on_o_proj(i):
        def hook(mod, args, out):
            x = args[0].float().reshape(-1, cfg.num_attention_heads, hd)  # (tokens, H, hd)
            W = mod.weight.float().reshape(-1, cfg.num_attention_heads, hd)  # (hidden, H, hd)
            heads[i] += torch.einsum("thd,ohd->tho", x, W).norm(dim=-1).sum(0).cpu()  # Σ_t ‖x_h W_O,hᵀ‖
        return hook

    def on_down(i):
        def hook(mod, args, out):
            neurons[i] += args[0].float().abs().reshape(-1, args[0].shape[-1]).sum(0).cpu()  # Σ_t |a_i|
        return hook

    def on_norm(mod, args, out):
        channels.add_(out.float().abs().reshape(-1, out.shape[-1]).sum(0).cpu())  # Σ_t |RMSNorm(X)_c|
        return None

    a = lay.arch
    for i, b in enumerate(blocks):
        handles += [get_path(b, a.o.path).register_forward_hook(on_o_proj(i)), get_path(b, a.down.path).register_forward_hook(on_down(i)),
                    get_path(b, a.attn_norm).register_forward_hook(on_norm), get_path(b, a.mlp_norm).register_forward_hook(on_norm)]
    device = next(model.parameters()).device
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            model(input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    tokens = input_ids.numel()
    return Importance(heads / tokens, neurons / tokens, channels / (tokens * 2 * n), tokens)


def without_layers(model: nn.Module, drop: list[int]):
    """Temporarily run `model` with the blocks in `drop` skipped (a context manager)."""
    return arch.without_blocks(model, drop)


@torch.no_grad()
def lm_loss(model: nn.Module, input_ids: Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of `model` on (n, L) ids."""
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, input_ids.shape[0], batch_size):
        x = input_ids[start : start + batch_size].to(device)
        logits = model(x, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
    return total / (input_ids.shape[0] * (input_ids.shape[1] - 1))


@torch.no_grad()
def layer_importance(model: nn.Module, input_ids: Tensor, metric: str = "ppl", batch_size: int = 8) -> Tensor:
    """Importance of each layer, (layers,): "ppl" = LM-loss increase when it alone is dropped
    (Minitron Fig. 8), "cosine" = Block Importance 1 − mean cos(x_in, x_out) (one forward pass)."""
    blocks = arch.blocks(model)
    if metric == "ppl":
        base = lm_loss(model, input_ids, batch_size)
        scores = []
        for i in range(len(blocks)):
            with without_layers(model, [i]):
                scores.append(lm_loss(model, input_ids, batch_size) - base)
        return torch.tensor(scores)
    if metric != "cosine":
        raise ValueError(f"metric must be 'ppl' or 'cosine', got {metric!r}")
    sims = torch.zeros(len(blocks))

    def hook(i):
        def fn(mod, args, kwargs, out):
            x_in = (args[0] if args else kwargs["hidden_states"]).float()
            x_out = (out[0] if isinstance(out, tuple) else out).float()
            sims[i] += F.cosine_similarity(x_in, x_out, dim=-1).sum().cpu()
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        lm_loss(model, input_ids, batch_size)
    finally:
        for h in handles:
            h.remove()
    return 1 - sims / input_ids.numel()


def _keep_top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, in their original order. (n,) -> (k,)."""
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def prune_width_(model: nn.Module, imp: Importance, hidden: int | None = None, intermediate: int | None = None,
                 heads_per_group: int | None = None) -> nn.Module:
    """Keep the `intermediate` most important MLP neurons of every layer, the `heads_per_group`
    most important query heads of every KV group, and the `hidden` most important embedding
    channels; slice the weights and update the config. In place; returns the model."""
    lay = require_minitron(model)
    if hidden is not None and hidden < model.config.hidden_size:
        lay.require("minitron_hidden", "pruning embedding channels")
    cfg, blocks = model.config, lay.blocks(model)
    kv = arch.kv_heads(cfg)
    group = cfg.num_attention_heads // kv
    if intermediate is not None and intermediate < lay.mlp_width(cfg):
        arch.keep_mlp_(model, [_keep_top(imp.neurons[i], intermediate) for i in range(len(blocks))])
    if heads_per_group is not None and heads_per_group < group:
        keep = []
        for i in range(len(blocks)):
            per_group = imp.heads[i].view(kv, group)  # (kv, group): query heads share their KV head
            keep.append(torch.cat([g * group + _keep_top(per_group[g], heads_per_group) for g in range(kv)]))
        arch.keep_heads_(model, keep)
    if hidden is not None and hidden < cfg.hidden_size:
        arch.keep_hidden_(model, _keep_top(imp.channels, hidden))
    return model


@torch.no_grad()
def drop_layers_(model: nn.Module, drop: list[int]) -> nn.Module:
    """Remove the blocks in `drop` for good (depth pruning) and update the config. In place."""
    n = len(arch.blocks(model))
    return arch.keep_blocks_(model, [i for i in range(n) if i not in set(drop)])


@torch.no_grad()
def prune_depth_(model: nn.Module, n_drop: int, input_ids: Tensor, metric: str = "ppl", iterative: bool = False) -> list[int]:
    """Drop the `n_drop` least important layers. One-shot: score once, drop the lowest.
    Iterative: drop one, re-score the rest, repeat. Returns the original indices dropped."""
    remaining = list(range(len(arch.blocks(model))))
    if not iterative:
        drop = layer_importance(model, input_ids, metric).topk(n_drop, largest=False).indices.tolist()
        drop_layers_(model, drop)
        return sorted(drop)
    dropped = []
    for _ in range(n_drop):
        j = int(layer_importance(model, input_ids, metric).argmin())
        dropped.append(remaining.pop(j))
        drop_layers_(model, [j])
    return sorted(dropped)


@torch.no_grad()
def prune_width_iterative_(model: nn.Module, input_ids: Tensor, hidden: int | None = None, intermediate: int | None = None,
                           heads_per_group: int | None = None, iterations: int = 2) -> nn.Module:
    """Width pruning in `iterations` stages, re-estimating importance on the partly pruned model
    before each (Minitron Sec. 4.2 found one shot as good as iterative for width)."""
    cfg = model.config
    start = (cfg.hidden_size, arch.layout(model).mlp_width(cfg), cfg.num_attention_heads // arch.kv_heads(cfg))
    for k in range(1, iterations + 1):
        def step(a, b):
            return None if b is None else round(a + (b - a) * k / iterations)
        imp = activation_importance(model, input_ids)
        prune_width_(model, imp, step(start[0], hidden), step(start[1], intermediate), step(start[2], heads_per_group))
    return model


def match_width(config, target_non_embedding: int, multiple: int = 64) -> tuple[int, int]:
    """(hidden, intermediate) for a width-pruned student (heads kept) with about the target
    non-embedding parameter count: hidden is the multiple of lcm(heads, 8) nearest to the
    proportional shrink of both dimensions (transformers requires heads | hidden), and the
    intermediate size (a multiple of `multiple`) then matches the target."""
    n_heads = config.num_attention_heads
    step = n_heads * 8 // math.gcd(n_heads, 8)

    def count(h, i):
        return arch.param_count(config, hidden=h, intermediate=i, embeddings=False)

    # proportional shrink r of hidden and intermediate together, by bisection on the count
    lo, hi = 0.0, 1.0
    for _ in range(50):
        r = (lo + hi) / 2
        lo, hi = (r, hi) if count(r * config.hidden_size, r * arch.mlp_width(config)) < target_non_embedding else (lo, r)
    hidden = max(step, round(r * config.hidden_size / step) * step)
    inters = range(multiple, arch.mlp_width(config) + 1, multiple)
    intermediate = min(inters, key=lambda i: abs(count(hidden, i) - target_non_embedding))
    return hidden, intermediate


def match_mlp(config, target_non_embedding: int, multiple: int = 64) -> int:
    """MLP width (a multiple of `multiple`) of a student that keeps the hidden size and every head and
    has about the target non-embedding parameter count: width pruning of the MLP alone."""
    inters = range(multiple, arch.mlp_width(config) + 1, multiple)
    return min(inters, key=lambda i: abs(arch.param_count(config, intermediate=i, embeddings=False) - target_non_embedding))


def save_student(model: nn.Module, folder: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Save a pruned model as an ordinary `transformers` checkpoint (safetensors + its smaller
    config), written to a temporary folder and renamed into place. An existing folder is replaced
    only when the suite wrote it (or with `overwrite`)."""
    folder = Path(folder)
    with staged_folder(folder, overwrite, what="student folder") as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


def random_init_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """A freshly initialised model with the same (pruned) config: the from-scratch baseline."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    fresh = AutoModelForCausalLM.from_config(model.config)
    return fresh.to(next(model.parameters()).device, next(model.parameters()).dtype).eval()


def token_efficiency(tokens_pruned: int, tokens_scratch: int) -> float:
    """How many times fewer tokens the pruned student needed than from scratch for the same quality."""
    return tokens_scratch / max(1, tokens_pruned) if math.isfinite(tokens_scratch) else float("inf")
