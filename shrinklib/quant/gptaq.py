"""GPTAQ (GPTQv2; Li et al. 2025, https://arxiv.org/abs/2504.02692): GPTQ with asymmetric
calibration. GPTQ fits each layer's quantized weight to its own float output on the inputs X
that the already-quantized blocks produce, min ‖ŴX - WX‖²; GPTAQ fits it to the float model's
output, min ‖ŴX - WX̃‖², where X̃ are the float model's inputs. With ΔX = X̃ - X the optimal
brain compression step gains one term: when column i is rounded, the later columns move by

    -err_i · U[i, j]  +  w_i · P[i, j],      P = α · triu₁((ΔX Xᵀ) Uᵀ) · U,   H⁻¹ = Uᵀ U

(U the upper Cholesky factor GPTQ already uses; α = 0.25 is the authors' default). With ΔX = 0,
P = 0 and GPTAQ is GPTQ exactly (tested).

The authors' lazy batch multiplies the term across batches by the already-rounded values; here it
is the column's value before rounding in both places, so the result does not depend on the
batch size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..arch import get_path, linears
from ..calib import record_inputs, run_block, sequential
from .formats import QTensor, int_params, resolve_group_size


def gptaq_quantize(W: Tensor, H: Tensor, dXXT: Tensor, bits: int = 4, group_size: int | None = 64,
                   symmetric: bool = False, damp: float = 0.01, block_size: int = 128,
                   alpha: float = 0.25) -> tuple[Tensor, Tensor, Tensor]:
    """GPTAQ of one layer: `gptq_quantize` plus the asymmetry term (static groups, natural order).

    Args:
        W: (out, in); H: (in, in) 2XXᵀ/N of the quantized model's inputs X;
        dXXT: (in, in) 2(X̃ - X)Xᵀ/N with X̃ the float model's inputs for the same tokens.
        alpha: weight of the asymmetry term (1: the exact least-squares target).

    Returns:
        q uint8 (out, in), scales and zeros float32 (out, n_groups).
    """
    W, H, dXXT = (t.detach().clone().float() for t in (W, H, dXXT))  # (out, in), (in, in), (in, in)
    out, d = W.shape
    g = d if group_size is None else min(group_size, d)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    dXXT[:, dead] = 0.0
    scales, zeros = int_params(W, bits, g, symmetric)  # static groups, as gptq_quantize
    H += damp * torch.mean(torch.diag(H)) * torch.eye(d, device=W.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)
    P = alpha * (dXXT @ U.T).triu_(1) @ U  # (in, in), strictly upper triangular
    WT = W.T.contiguous()  # (in, out): row i is column i of the paper's W
    cols = torch.arange(d, device=W.device) // g
    S, Z = scales.T[cols].contiguous(), zeros.T[cols].contiguous()  # (in, out) grid of each column
    QT = torch.empty(d, out, device=W.device)
    maxq = 2**bits - 1
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1, E1 = WT[i1:i2], torch.empty(i2 - i1, out, device=W.device)  # (B, out) view, scaled errors
        for i in range(i2 - i1):
            w, s, z, q, e = W1[i], S[i1 + i], Z[i1 + i], QT[i1 + i], E1[i]
            torch.div(w, s, out=q).add_(z).round_().clamp_(0, maxq)
            torch.sub(q, z, out=e).mul_(s)
            torch.sub(w, e, out=e).div_(U[i1 + i, i1 + i])
            W1[i + 1:] -= U[i1 + i, i1 + i + 1:i2, None] * e - P[i1 + i, i1 + i + 1:i2, None] * w
        # lazy batch update of the later columns; W1 holds each column's value before rounding
        WT[i2:] -= (E1.T.contiguous() @ U[i1:i2, i2:]).T - (W1.T @ P[i1:i2, i2:]).T
    return QT.T.to(torch.uint8).contiguous(), scales, zeros


def asymmetric_stats(block: nn.Module, forward, fp_forward) -> dict[str, tuple[list[str], Tensor, Tensor]]:
    """Per distinct input of a block's linears (q/k/v share one, gate/up another): the linears reading it,
    H = 2XXᵀ/N and dXXT = 2(X̃ - X)Xᵀ/N, with X from `forward()` (the quantized model's path) and X̃
    from `fp_forward()` (the float model's), the same tokens in the same order."""
    lins = linears(block)
    xs: dict[str, list[Tensor]] = {p: [] for p in lins}
    with record_inputs(lins, lambda name, x: xs[name].append(x.reshape(-1, x.shape[-1]).float())):
        fp_forward()
    fp = {p: torch.cat(v) for p, v in xs.items()}  # (N, in) each
    xs = {p: [] for p in lins}
    with record_inputs(lins, lambda name, x: xs[name].append(x.reshape(-1, x.shape[-1]).float())):
        forward()
    out: dict[str, tuple[list[str], Tensor, Tensor]] = {}
    for p in lins:
        X = torch.cat(xs[p])  # (N, in)
        first = next((f for f, (paths, _, _) in out.items() if torch.equal(torch.cat(xs[f]), X)), None)
        if first is not None:  # the same input as an earlier linear: share its statistics
            out[first][0].append(p)
            continue
        n = X.shape[0]
        out[p] = ([p], 2.0 / n * X.T @ X, 2.0 / n * (fp[p] - X).T @ X)
    return out


@torch.no_grad()
def gptaq_(model: nn.Module, calib_ids: Tensor, config, backend: str | None = "reference", device=None,
           progress: bool = True) -> None:
    """GPTAQ every block linear: block by block, on the quantized model's inputs X and, beside them,
    the float model's inputs X̃ (the float blocks' outputs carried alongside)."""
    from .apply import _install

    fp_hidden: list = [None]

    def step(s):
        if fp_hidden[0] is None:
            fp_hidden[0] = s.hidden  # block 0: both models see the embeddings
        fp_in = fp_hidden[0]
        stats = asymmetric_stats(s.block, s.forward, lambda: run_block(s.block, fp_in, s.kwargs, s.batch_size))
        fp_hidden[0] = run_block(s.block, fp_in, s.kwargs, s.batch_size)  # the float block's outputs
        for paths, H, dXXT in stats.values():
            lins = [get_path(s.block, p) for p in paths]
            g = resolve_group_size(config.group_size, lins[0].in_features)
            W = torch.cat([lin.weight.detach().float() for lin in lins])  # linears reading one input, stacked
            q, sc, z = gptaq_quantize(W, H, dXXT, config.bits, g, config.symmetric, config.damp, config.block_size,
                                      config.alpha)
            rows = 0
            for path, lin in zip(paths, lins):
                r = slice(rows, rows + lin.out_features)
                _install(s.block, path, QTensor(q[r], sc[r], z[r], g, "int", config.bits), backend)
                rows += lin.out_features

    sequential(model, calib_ids, step, device=device, desc="GPTAQ", progress=progress)
