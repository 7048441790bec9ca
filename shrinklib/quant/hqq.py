"""HQQ, half-quadratic quantization (Badri & Shaji 2023, https://mobiusml.github.io/hqq_blog/): a
calibration-free zero-point search. With the scale s fixed (min-max), HQQ minimises a sparsity-
promoting l_p norm (p < 1) of the weight error, ‖W - s(Q - z)‖_p^p, by splitting it with an
auxiliary error W_e and a penalty β/2 ‖W_e - (W - s(Q - z))‖² that tightens (β ← κβ):

    W_e ← shrink_p(W - s(Q - z), β)          shrink_p(x, β) = sign(x) · relu(|x| - |x|^(p-1) / β)
    Q   ← clamp(round(W / s + z), 0, 2^b - 1)
    z   ← mean over the group of (Q - (W - W_e) / s)       (the closed-form minimiser in z)

No data: the weights alone decide, so it quantizes a model in seconds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..arch import blocks, linears
from .formats import QTensor, grouped, int_params, quantize_codes, resolve_group_size, storage_grid


def shrink_lp(x: Tensor, beta: float, p: float) -> Tensor:
    """The generalised soft-threshold of the l_p proximal step (HQQ Eq. 5)."""
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def hqq_zero_step(Wg: Tensor, Q: Tensor, s: Tensor, We: Tensor, mask: Tensor) -> Tensor:
    """argmin_z Σ_group (Q - z - (W - W_e) / s)²: the group mean (out, G); Wg, Q, We (out, G, g)."""
    return ((Q - (Wg - We) / s[..., None]) * mask).sum(-1) / mask.sum(-1)


def hqq_quantize(W: Tensor, bits: int = 4, group_size: int | None = 64, p: float = 0.7, beta: float = 10.0,
                 kappa: float = 1.01, iters: int = 20) -> QTensor:
    """HQQ of one weight W (out, in) on an asymmetric grid; stops when the l_p error stops falling and
    keeps the zeros of the smallest (as the authors' optimiser does)."""
    W = W.float()
    g = resolve_group_size(group_size, W.shape[1])
    s, z = int_params(W, bits, g, symmetric=False)  # (out, G): min-max start (= RTN)
    Wg = grouped(W, g)  # (out, G, g)
    cols = torch.arange(Wg.shape[1] * g, device=W.device).reshape(1, -1, g)
    mask = (cols < W.shape[1]).float().expand_as(Wg)  # a short last group's padding does not count

    def codes(z):
        return torch.clamp(torch.round(Wg / s[..., None] + z[..., None]), 0, 2**bits - 1)

    def lp_error(z):
        return ((Wg - s[..., None] * (codes(z) - z[..., None])).abs().pow(p) * mask).sum()

    best_z, best = z, lp_error(z)
    for _ in range(iters):
        Q = codes(z)
        We = shrink_lp(Wg - s[..., None] * (Q - z[..., None]), beta, p)
        z = hqq_zero_step(Wg, Q, s, We, mask)
        beta *= kappa
        err = lp_error(z)
        if not err < best:
            break
        best_z, best = z, err
    s, z = storage_grid(s, best_z)  # the grid every backend stores; the codes are chosen on it
    return QTensor(quantize_codes(W, s, z, bits, g), s, z, g, "int", bits)


@torch.no_grad()
def hqq_(model: nn.Module, config, backend: str | None = "reference", progress: bool = True) -> None:
    """HQQ every block linear (no calibration data)."""
    from .apply import _install

    for block in blocks(model):
        for path, lin in linears(block).items():
            _install(block, path, hqq_quantize(lin.weight.float(), config.bits, config.group_size, config.p,
                                               config.beta, config.kappa, config.iters), backend)
