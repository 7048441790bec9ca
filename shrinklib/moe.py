"""Mixture of experts: an MoE MLP with a top-k softmax router (Shazeer et al., 2017,
https://arxiv.org/abs/1701.06538; Mixtral, Jiang et al., 2024, https://arxiv.org/abs/2401.04088),
the Switch load-balancing loss (Fedus et al., 2022, https://arxiv.org/abs/2101.03961), the
router z-loss (ST-MoE, Zoph et al., 2022, https://arxiv.org/abs/2202.08906), and sparse
upcycling of a dense model's MLPs into experts (Komatsuzaki et al., 2023,
https://arxiv.org/abs/2212.05055)."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import arch
from .checks import check_fields


@dataclass
class MoEConfig:
    num_experts: int = 4  # E
    top_k: int = 2  # experts per token
    every: int = 1  # upcycle the MLP of every `every`-th block (2: every other block)
    router_std: float = 0.02  # std of the new router's weights
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"need 1 ≤ top_k ≤ num_experts, got top_k={self.top_k}, num_experts={self.num_experts}")
        if self.every < 1:
            raise ValueError(f"every must be ≥ 1, got {self.every}")


def route_top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over experts, keep the k largest, renormalize them (Mixtral's router).

    Returns (probs (T, E), gates (T, k) summing to 1, experts (T, k) indices)."""
    probs = logits.float().softmax(-1)  # (T, E)
    gates, experts = probs.topk(k, dim=-1)  # (T, k)
    return probs, gates / gates.sum(-1, keepdim=True), experts


def load_balancing_loss(probs: Tensor, experts: Tensor) -> Tensor:
    """Switch loss E · Σ_i f_i P_i: f_i the fraction of the T·k assignments sent to expert i,
    P_i the mean router probability of expert i; 1 when routing is uniform."""
    E = probs.shape[-1]
    f = F.one_hot(experts, E).float().mean((0, 1))  # (E,) fraction of assignments
    P = probs.mean(0)  # (E,)
    return E * (f * P).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's z-loss: mean over tokens of (log Σ_j exp z_j)², keeps router logits small."""
    return torch.logsumexp(logits.float(), -1).square().mean()


def expert_load(experts: Tensor, num_experts: int) -> Tensor:
    """Fraction of the token-to-expert assignments each expert received, (E,)."""
    return torch.bincount(experts.flatten(), minlength=num_experts).float() / experts.numel()


class MoEMLP(nn.Module):
    """y = Σ_{i ∈ top-k(x)} g_i(x) · E_i(x); keeps the last routing for the losses and statistics."""

    def __init__(self, experts: list[nn.Module], hidden: int, top_k: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = nn.Linear(hidden, len(experts), bias=False)
        self.top_k = top_k
        self.last: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, d)
        logits = self.router(x)  # (T, E)
        probs, gates, experts = route_top_k(logits, self.top_k)
        y = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            tok, slot = (experts == i).nonzero(as_tuple=True)  # tokens routed to expert i
            if tok.numel():
                y.index_add_(0, tok, expert(x[tok]) * gates[tok, slot, None].to(x.dtype))
        self.last = {"logits": logits, "probs": probs, "experts": experts}
        return y.reshape(shape)


def upcycle_mlp(mlp: nn.Module, hidden: int, config: MoEConfig) -> MoEMLP:
    """E copies of a dense MLP behind a new router: the output equals the dense MLP's, since
    every expert computes the same function and the k gates sum to 1."""
    moe = MoEMLP([copy.deepcopy(mlp) for _ in range(config.num_experts)], hidden, config.top_k)
    g = torch.Generator().manual_seed(config.seed)
    w = moe.router.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=g) * config.router_std)
    return moe.to(next(mlp.parameters()).device, next(mlp.parameters()).dtype)


def upcycle_(model: nn.Module, config: MoEConfig, blocks: list[int] | None = None) -> list[int]:
    """Replace the MLP of every `config.every`-th block (or of the blocks listed in `blocks`) by an
    upcycled MoE, in place; returns the indices of the upcycled blocks."""
    arch.require(model, "moe", "MoE upcycling")
    hidden = model.config.hidden_size
    n = len(arch.blocks(model))
    if blocks is not None and not all(-n <= i < n for i in blocks):
        raise ValueError(f"blocks {blocks} out of range for a model of {n} blocks")
    chosen = {i % n for i in blocks} if blocks is not None else {i for i in range(n) if i % config.every == config.every - 1}
    done = []
    for i, block in enumerate(arch.blocks(model)):
        if i in chosen:
            mlp = upcycle_mlp(arch.mlp_module(model, block), hidden, dataclasses.replace(config, seed=config.seed + i))
            arch.set_mlp(model, block, mlp)
            done.append(i)
    return done


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def moe_aux_losses(model: nn.Module) -> dict[str, Tensor]:
    """Load-balancing and z-loss of the last forward, averaged over the MoE layers."""
    layers = [m for m in moe_layers(model) if m.last]
    if not layers:
        return {"balance": torch.tensor(0.0), "z": torch.tensor(0.0)}
    lb = torch.stack([load_balancing_loss(m.last["probs"], m.last["experts"]) for m in layers]).mean()
    z = torch.stack([router_z_loss(m.last["logits"]) for m in layers]).mean()
    return {"balance": lb, "z": z}


def moe_lm_loss(balance_coef: float = 0.01, z_coef: float = 0.001, lm_loss=None):
    """A `train` loss: causal LM cross-entropy + α · load balancing + β · z-loss (Switch's α = 0.01, ST-MoE's β = 0.001).

    Args:
        lm_loss: the language-model loss `(model, batch) -> scalar` (default: the model's own
            cross-entropy on the batch's labels; `tasks.answer_loss` for a `calib.cache_prefix` batch).
    """

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        ce = lm_loss(model, batch) if lm_loss is not None else model(**batch, use_cache=False).loss
        aux = moe_aux_losses(model)
        return ce + balance_coef * aux["balance"].to(ce.device) + z_coef * aux["z"].to(ce.device)

    return loss_fn


def param_counts(model: nn.Module, top_k: int | None = None, num_experts: int | None = None) -> dict[str, int]:
    """Total and active (per token) parameters. An expert parameter is one inside an `MoEMLP`'s
    experts, or named `...experts...` (transformers' fused Mixtral experts, shape (E, ...));
    a token uses top_k / E of them. Tied weights are counted once."""
    seen, total, expert = set(), 0, 0
    k, E = top_k, num_experts
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name:
            expert += p.numel()
    if E is None or k is None:
        layers = moe_layers(model)
        cfg = getattr(model, "config", None)
        E = E or (len(layers[0].experts) if layers else getattr(cfg, "num_local_experts", 1))
        k = k or (layers[0].top_k if layers else getattr(cfg, "num_experts_per_tok", 1))
    embed = sum(p.numel() for p in {id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}.values())
    active = total - expert + expert * k // E
    return {"total": total, "active": active, "expert": expert, "embedding": embed, "num_experts": E, "top_k": k}


def flops_per_token(active_params: int, embedding_params: int, layers: int, hidden: int, context: int) -> int:
    """Forward FLOPs per token ≈ 2 · N_active (non-embedding) + 2 · layers · context · hidden
    for the attention scores and values (Kaplan et al., 2020, https://arxiv.org/abs/2001.08361, Table 1)."""
    return 2 * (active_params - embedding_params) + 2 * layers * context * hidden


def widen_mlp(mlp: nn.Module, factor: int, model_type: str = "llama", split_noise: float = 0.0, seed: int = 0) -> nn.Module:
    """A copy of an MLP module with a `factor` × wider hidden layer computing the same function
    (each neuron copied `factor` times, down's columns divided by `factor`): a dense model with
    the MoE's total (factor = E) or active (factor = k) parameters.

    Args:
        model_type: the architecture the MLP comes from (`shrinklib.arch.ARCHS`: where its gate,
            up and down projections are).
        split_noise: copies of a neuron with equal down columns get equal gradients and stay copies
            forever; with split_noise > 0 each copy's down column gets its own noise (std split_noise ×
            the std of down's weights), the noises of a neuron's copies summing to zero, so the
            function is unchanged but the copies learn apart.
    """
    lay = arch.layout_of_type(model_type)
    holder = nn.Module()  # stands for the block: the MLP sits at the architecture's path in it
    arch.set_module(holder, lay.arch.mlp, copy.deepcopy(mlp))
    width = arch.proj_slice(lay, holder, None, "up")[1]
    with torch.no_grad():
        idx = torch.arange(width.stop - width.start).repeat(factor)  # (factor·f,) every neuron factor times
        arch.select_mlp_channels_(lay, holder, None, idx, down_scale=1.0 / factor)
        if split_noise > 0 and factor > 1:
            W = arch.get_path(holder, lay.arch.down.path).weight  # (d, factor·f), copy c in columns c·f ... (c+1)·f
            d, f = W.shape[0], W.shape[1] // factor
            g = torch.Generator().manual_seed(seed)
            noise = torch.randn(factor, d, f, generator=g) * (split_noise * W.float().std().item())  # (factor, d, f)
            noise -= noise.mean(0)  # the copies of a neuron: noises summing to zero
            W.add_(noise.permute(1, 0, 2).reshape(d, factor * f).to(W.dtype))
    return arch.get_path(holder, lay.arch.mlp)
