"""AutoRound-style learned rounding (Cheng et al. 2023, https://arxiv.org/abs/2309.05516): instead
of rounding every weight to nearest, learn a rounding offset V ∈ [-0.5, 0.5] per weight and a
clipping factor per group for its max and min (α, β ∈ [0.5, 1]) by signed gradient descent,

    Ŵ = s(clamp(⌊W/s + z + V⌉, 0, 2^b - 1) - z),   s = (α·max - β·min) / (2^b - 1),  z = -β·min / s
    θ ← θ - lr · sign(∇θ L),   lr decaying linearly from 1/steps to 0, keeping the best iterate,

with the rounding's gradient passed straight through (STE). The paper minimises each decoder
block's output error; here each linear's output error on its calibration inputs,
L = ‖(Ŵ - W)X‖² / ‖WX‖² on a token sample (the same sequential calibration as GPTQ). Zero steps is
round-to-nearest exactly (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..arch import get_path, linears
from ..calib import record_inputs, sequential
from .formats import QTensor, expand_groups, grouped, resolve_group_size, storage_grid


def round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def learned_grid(W: Tensor, V: Tensor, alpha: Tensor, beta: Tensor, bits: int, g: int) -> tuple[Tensor, Tensor, Tensor]:
    """Ŵ (out, in) and the grid (s, z) (out, G) of W with rounding offsets V and clip factors α, β (out, G)."""
    Wg = grouped(W, g)  # (out, G, g)
    wmax, wmin = Wg.amax(-1) * alpha, Wg.amin(-1) * beta  # (out, G)
    rng = wmax - wmin
    s = torch.where(rng > 0, rng / (2**bits - 1), torch.ones_like(rng))  # as `int_params`
    z = -wmin / s
    S, Z = expand_groups(s, g, W.shape[1]), expand_groups(z, g, W.shape[1])
    q = torch.clamp(round_ste(W / S + Z + V), 0, 2**bits - 1)
    return S * (q - Z), s, z


def autoround_quantize(W: Tensor, X: Tensor, bits: int = 3, group_size: int | None = 64, steps: int = 50,
                       lr: float | None = None) -> QTensor:
    """Learned rounding of one linear W (out, in) on calibration inputs X (tokens, in) on an asymmetric
    grid; 0 steps = RTN (`quantize(W, "int", bits, group_size)`)."""
    W, X = W.detach().float(), X.detach().float()
    g = resolve_group_size(group_size, W.shape[1])
    G = grouped(W, g).shape[1]
    V = torch.zeros_like(W, requires_grad=True)  # (out, in)
    alpha, beta = (torch.ones(W.shape[0], G, requires_grad=True) for _ in range(2))  # (out, G)
    lr = 1.0 / max(steps, 1) if lr is None else lr
    ref = X @ W.T  # (tokens, out) float outputs
    norm = ref.pow(2).sum()
    best, keep = float("inf"), (V.detach().clone(), alpha.detach().clone(), beta.detach().clone())
    with torch.enable_grad():
        for t in range(steps):
            What, _, _ = learned_grid(W, V, alpha, beta, bits, g)
            loss = (X @ What.T - ref).pow(2).sum() / norm
            if loss.item() < best:  # keep the best iterate, as AutoRound does (step 0 is RTN)
                best, keep = loss.item(), (V.detach().clone(), alpha.detach().clone(), beta.detach().clone())
            gV, ga, gb = torch.autograd.grad(loss, (V, alpha, beta))
            step = lr * (1 - t / steps)  # linear decay
            with torch.no_grad():
                for p, grad, lo, hi in ((V, gV, -0.5, 0.5), (alpha, ga, 0.5, 1.0), (beta, gb, 0.5, 1.0)):
                    p.sub_(step * grad.sign()).clamp_(lo, hi)
    V, alpha, beta = keep
    with torch.no_grad():
        _, s, z = learned_grid(W, V, alpha, beta, bits, g)
        s, z = storage_grid(s, z)  # the stored grid; the learned offsets choose each code on it
        S, Z = expand_groups(s, g, W.shape[1]), expand_groups(z, g, W.shape[1])
        q = torch.clamp(torch.round(W / S + Z + V), 0, 2**bits - 1).to(torch.uint8)
    return QTensor(q, s, z, g, "int", bits)


@torch.no_grad()
def autoround_(model: nn.Module, calib_ids: Tensor, config, backend: str | None = "reference", device=None,
               progress: bool = True) -> None:
    """Learned rounding of every block linear, block by block on the already-quantized blocks' outputs."""
    from .apply import _install

    def step(s):
        lins = linears(s.block)
        xs: dict[str, list[Tensor]] = {p: [] for p in lins}
        with record_inputs(lins, lambda name, x: xs[name].append(x.reshape(-1, x.shape[-1]))):
            s.forward()
        gen = torch.Generator().manual_seed(s.index)
        for path, lin in lins.items():
            X = torch.cat(xs[path])
            X = X[torch.randperm(X.shape[0], generator=gen)[: config.max_tokens].to(X.device)]
            qt = autoround_quantize(lin.weight, X, config.bits, config.group_size, config.steps, config.lr)
            _install(s.block, path, qt, backend)

    sequential(model, calib_ids, step, device=device, desc="AutoRound", progress=progress)
