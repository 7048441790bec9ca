"""Pruning: unstructured and N:M masks (magnitude, Wanda, SparseGPT) and structured pruning
that yields smaller dense models (LLM-Pruner, SliceGPT).

`prune_(model, PruneConfig("wanda", sparsity=0.5), calib_ids)` prunes every linear of every
decoder block in place, layer by layer through `shrinklib.calib.sequential`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..arch import blocks, linear_layers, linears, named_linears
from ..calib import BlockStep, collect_input_stats, sequential
from ..checks import check_fields
from .llm_pruner import LLMPrunerConfig, llm_prune_
from .masks import check_nm, is_nm, magnitude_mask, nm_mask, sparsity_of, wanda_mask, wanda_score
from .slicegpt import SliceGPTConfig, slicegpt_
from .sparsegpt import reconstruction_error, sparsegpt_prune


@dataclass(frozen=True)
class Method:
    """One pruning method of the registry."""

    name: str
    paper: str
    url: str
    needs_calibration: bool
    needs_hessian: bool


METHODS = {
    "magnitude": Method("magnitude", "Han et al. 2015, Learning both Weights and Connections", "https://arxiv.org/abs/1506.02626", False, False),
    "wanda": Method("wanda", "Sun et al. 2023, A Simple and Effective Pruning Approach for LLMs", "https://arxiv.org/abs/2306.11695", True, False),
    "sparsegpt": Method("sparsegpt", "Frantar & Alistarh 2023, SparseGPT", "https://arxiv.org/abs/2301.00774", True, True),
}


@dataclass(frozen=True)
class PruneConfig:
    """What `prune_` does.

    method: a key of METHODS.
    sparsity: fraction of each linear's weights removed (unstructured), in [0, 1).
    n, m: an N:M pattern instead (keep n of every m consecutive inputs); n=0 means unstructured.
    per: magnitude's comparison group, "layer" or "row" (Wanda and SparseGPT have their own).
    blocksize, percdamp: SparseGPT's lazy-update block and Hessian dampening.
    """

    method: str = "wanda"
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    per: str = "layer"
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        check_fields(self)
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; known: {sorted(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.n or self.m:
            if not 0 < self.n < self.m:
                raise ValueError(f"N:M needs 0 < n < m, got {self.n}:{self.m}")
            if self.blocksize % self.m:
                raise ValueError(f"blocksize {self.blocksize} must be a multiple of m={self.m}")
        if self.per not in ("layer", "row"):
            raise ValueError(f"per must be 'layer' or 'row', got {self.per!r}")
        if self.blocksize < 1 or not 0 <= self.percdamp < 1:
            raise ValueError(f"bad blocksize/percdamp: {self.blocksize}, {self.percdamp}")

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.n else f"{self.sparsity:.0%}"


def layer_mask(W: Tensor, config: PruneConfig, x_norm: Tensor | None = None) -> Tensor:
    """The keep-mask of one layer for magnitude or Wanda (W (out, in), x_norm (in,))."""
    if config.method == "magnitude":
        return nm_mask(W.abs(), config.n, config.m) if config.n else magnitude_mask(W, config.sparsity, config.per)
    if config.n:
        return nm_mask(wanda_score(W, x_norm), config.n, config.m)
    return wanda_mask(W, x_norm, config.sparsity)


def check_pattern_fits(model: nn.Module, config: PruneConfig) -> None:
    """Every block linear's input size holds whole groups of an N:M pattern (ValueError naming the layer)."""
    for name, lin in named_linears(model).items() if config.n else ():
        try:
            check_nm(lin.in_features, config.n, config.m, config.blocksize)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None


@torch.no_grad()
def prune_(model: nn.Module, config: PruneConfig, calib_ids: Tensor | None = None, device=None,
           batch_size: int = 8, progress: bool = True) -> dict[str, float]:
    """Prune every linear of every decoder block in place; returns {layer: reconstruction error}.

    The reconstruction error ½tr(ΔW H ΔWᵀ) = ‖ΔW X‖²/N is measured on each layer's own
    calibration inputs (0 for magnitude, which sees no data).

    Args:
        model: a causal LM supported by `shrinklib.arch` (Llama, OPT, ...).
        config: the method and sparsity pattern.
        calib_ids: (n, L) calibration ids; needed by Wanda and SparseGPT.
        device: compute device for one block at a time (default: the model's).
    """
    method = METHODS[config.method]
    check_pattern_fits(model, config)  # before any layer changes
    errors: dict[str, float] = {}
    if not method.needs_calibration:
        for name, lin in named_linears(model).items():
            lin.weight.mul_(layer_mask(lin.weight, config))
            errors[name] = float("nan")
        return errors
    if calib_ids is None:
        raise ValueError(f"{config.method} needs calibration ids (calib_ids=calibration_batch(...))")

    def step(s: BlockStep) -> None:
        stats = collect_input_stats(s.block, s.forward, hessian=True)  # all linears see the unpruned block
        for name, lin in linears(s.block).items():
            W, H = lin.weight.data, stats[name].hessian  # (out, in), (in, in)
            if config.method == "sparsegpt":
                W_new, _ = sparsegpt_prune(W, H, config.sparsity, config.n, config.m, config.blocksize, config.percdamp)
            else:
                W_new = W * layer_mask(W, config, stats[name].sq_sum.sqrt())
            errors[f"{s.index}.{name}"] = reconstruction_error(W, W_new, H)
            lin.weight.data.copy_(W_new.to(W.dtype))

    sequential(model, calib_ids, step, device=device, batch_size=batch_size, desc=config.method, progress=progress)
    return errors


def model_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over all linear layers of the decoder blocks (quantized ones included)."""
    from ..export import linear_weight

    zeros = total = 0
    for block in blocks(model):
        for lin in linear_layers(block).values():
            W = linear_weight(lin)
            zeros += (W == 0).sum().item()
            total += W.numel()
    return zeros / total


__all__ = [
    "LLMPrunerConfig", "METHODS", "Method", "PruneConfig", "SliceGPTConfig", "llm_prune_", "slicegpt_", "is_nm", "layer_mask", "magnitude_mask", "model_sparsity", "nm_mask",
    "prune_", "reconstruction_error", "sparsegpt_prune", "sparsity_of", "wanda_mask", "wanda_score",
]
