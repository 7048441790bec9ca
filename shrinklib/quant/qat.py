"""Quantization-aware training with a straight-through estimator (STE; Bengio et al. 2013, as LLM-QAT,
Liu et al. 2023, https://arxiv.org/abs/2305.17888, trains LLMs): every block linear computes with its
round-to-nearest weight Q(W) while the gradient flows to the latent float weight W as if Q were the
identity,

    forward: y = x Q(W)ᵀ          backward: ∂L/∂W = ∂L/∂Q(W)

trained with the suite's loop (`shrinklib.train`) on the calibration windows; at the end W is
rounded once more, so the packed model computes exactly what training last saw. Zero steps is RTN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..arch import blocks, linears
from .formats import dequantize, quantize


class _RoundSTE(torch.autograd.Function):
    """Q(W) forward (exactly the RTN weight), the incoming gradient unchanged backward."""

    @staticmethod
    def forward(ctx, W: Tensor, bits: int, group_size: int | None, symmetric: bool) -> Tensor:
        return dequantize(quantize(W.detach().float(), "int", bits, group_size, symmetric)).to(W.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None, None


class FakeQuant(nn.Module):
    """Weight parametrization: the RTN weight forward, the identity backward."""

    def __init__(self, bits: int, group_size: int | None, symmetric: bool = False):
        super().__init__()
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    def forward(self, W: Tensor) -> Tensor:
        return _RoundSTE.apply(W, self.bits, self.group_size, self.symmetric)  # (out, in)


def qat_(model: nn.Module, calib_ids: Tensor, config, backend: str | None = "reference", device=None,
         progress: bool = True) -> list[dict]:
    """Train the block linears through fake quantization on windows of `calib_ids` (n, L), then round
    them (RTN) onto `backend`; returns the training history."""
    from ..train import TrainConfig, causal_lm_loss, train
    from .apply import rtn_
    from .config import RTNConfig

    lins = [lin for block in blocks(model) for lin in linears(block).values()]
    history: list[dict] = []
    if config.steps > 0:
        for lin in lins:
            parametrize.register_parametrization(lin, "weight", FakeQuant(config.bits, config.group_size, config.symmetric))
        if device is not None:
            model.to(device)
        n, b = calib_ids.shape[0], config.batch_size
        rows = lambda i: [(i * b + k) % n for k in range(b)]  # noqa: E731: the calibration rows, in turn
        latent = [lin.parametrizations.weight.original.requires_grad_(True) for lin in lins]
        try:
            model.train()
            ids = lambda i: calib_ids[rows(i)].to(next(model.parameters()).device)  # noqa: E731
            with torch.enable_grad():  # also when called under no_grad (a recipe step, a notebook cell)
                history = train(model, lambda i: {"input_ids": ids(i), "labels": ids(i)}, causal_lm_loss,
                                TrainConfig(steps=config.steps, lr=config.lr, seed=config.seed, progress=progress),
                                params=latent)
        finally:
            model.eval()
            for lin in lins:  # keep the trained latent weight
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    with torch.no_grad():
        rtn_(model, RTNConfig(config.bits, config.group_size, config.symmetric), backend, progress)
    return history
