"""GPTQ (Frantar et al., 2023, https://arxiv.org/abs/2210.17323): quantize one column at a time
and spread its error over the columns not yet quantized, weighted by the inverse Hessian of
the layer's reconstruction loss ‖WX - ŴX‖², H = 2XXᵀ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
from torch import Tensor

from .formats import QTensor, expand_groups, int_params
from .mx import ELEMENTS, encode_float, quantize_mx, round_to_element


def gptq_quantize(W: Tensor, H: Tensor, bits: int = 4, group_size: int | None = 64, symmetric: bool = False,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of one layer (Algorithm 1 with lazy batch updates and groups).

    Args:
        W: (out, in) weight.
        H: (in, in) Hessian 2XXᵀ/N of the layer's calibration inputs.
        group_size: columns per group (None: per channel); the last group may be shorter.
        damp: λ = damp · mean(diag H) added to the diagonal.
        block_size: columns per lazy batch update (B in the paper).
        act_order: quantize columns in order of decreasing diag(H) (groups keep their columns).

    Each group's grid is fitted on the weights before any GPTQ update ("static groups"), in
    either order. The original code fits a group's grid when its first column comes up, on
    weights already moved by the updates: a grid fitted to [min, max] of moved weights leaves the
    group's later columns, which move further, outside it, where they are clamped and their
    error compensated again; on SmolLM2 this made 4-bit g64 asymmetric GPTQ worse than RTN.

    Returns:
        q uint8 (out, in), scales and zeros float32 (out, n_groups): W ≈ s · (q - z).
    """
    W, H = _live_inputs(W, H)
    g = W.shape[1] if group_size is None else min(group_size, W.shape[1])
    scales, zeros = int_params(W, bits, g, symmetric)  # (out, n_groups): static groups, before any update
    q = gptq_columns(W, H, scales, zeros, g, functools.partial(gptq_block_, bits=bits), damp, block_size, act_order)
    return q.to(torch.uint8), scales, zeros


def _live_inputs(W: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """Float32 copies of W (out, in) and H (in, in) with the inputs that never fire (diag H = 0)
    made harmless: their weights zeroed (they do not matter) and H's diagonal set to 1 there."""
    W, H = W.detach().clone().float(), H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def gptq_columns(W: Tensor, H: Tensor, scales: Tensor, zeros: Tensor, g: int, round_block, damp: float = 0.01,
                 block_size: int = 128, act_order: bool = False) -> Tensor:
    """GPTQ's column loop on a fixed grid: what `round_block` writes per column (integer codes, or
    microscaling elements), float32 (out, in), for W (out, in) on the grid
    (scales, zeros), each (out, n_groups) with groups of g columns. `round_block(W1, S1, Z1, Hinv1, Q1)`
    rounds one lazy batch of columns (`gptq_block_` for integer grids, `mx_block_` for microscaling)."""
    out, d = W.shape
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(d, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(d, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (in, in)
    # Column i of the paper's W is row i here: (in, out) layouts make every per-column step contiguous.
    WT = W.T.contiguous()  # (in, out), permuted order
    S, Z = (t.T[perm // g].contiguous() for t in (scales, zeros))  # (in, out): the grid of each column
    QT = torch.empty(d, out, device=W.device)  # codes, permuted order
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        with one_thread():  # the column loop: a few small ops per column, which threads only slow down
            Err1 = round_block(WT[i1:i2], S[i1:i2], Z[i1:i2], Hinv[i1:i2, i1:i2], QT[i1:i2])  # (out, B)
        WT[i2:] -= (Err1 @ Hinv[i1:i2, i2:]).T  # lazy batch update of the remaining columns (all threads)
    q = torch.empty(out, d, device=W.device)
    q[:, perm] = QT.T
    return q


@contextlib.contextmanager
def one_thread():
    """Run the block on one torch thread: each op of the column loop touches a few thousand floats,
    less than a thread hand-off costs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_block_(W1: Tensor, S1: Tensor, Z1: Tensor, Hinv1: Tensor, Q1: Tensor, bits: int) -> Tensor:
    """Quantize the B columns of one lazy batch, column after column (rows of the (B, out) views),
    updating the batch's later columns in place; writes the codes into Q1 (B, out) and returns the
    scaled errors Err1 (out, B).

    Per column: q = clamp(round(w / s + z), 0, 2^b - 1); err = (w - s(q - z)) / [H⁻¹]_ii; the later
    columns j > i move by -err · [H⁻¹]_ij (Eq. 3 with the Cholesky rows of H⁻¹). The same float
    operations in the same order as the textbook loop over columns of W, so the same bits; written
    in place on unbound rows, a dozen tensor calls per column (on one thread: elementwise, the same
    bits with any thread count).
    """
    maxq = 2**bits - 1
    E1 = torch.empty_like(W1)  # (B, out) scaled errors
    w_, s_, z_, q_, e_ = (t.unbind(0) for t in (W1, S1, Z1, Q1, E1))
    h_, d_ = Hinv1.unbind(0), Hinv1.diagonal().unbind(0)
    for i in range(W1.shape[0]):
        w, s, z, q, e = w_[i], s_[i], z_[i], q_[i], e_[i]
        torch.div(w, s, out=q).add_(z).round_().clamp_(0, maxq)
        torch.sub(q, z, out=e).mul_(s)
        torch.sub(w, e, out=e).div_(d_[i])
        W1[i + 1:] -= h_[i][i + 1:, None] * e
    return E1.T.contiguous()


def mx_block_(W1: Tensor, S1: Tensor, Z1: Tensor, Hinv1: Tensor, Q1: Tensor, fmt: str) -> Tensor:
    """`gptq_block_` on a microscaling grid: each column rounds to the nearest element of the format
    times its block scale S1 (NVFP4: scale · per-tensor scale; positive); Z1 is unused. The
    element's value goes into Q1; the error spreads over the batch's later columns as in GPTQ."""
    E1 = torch.empty_like(W1)  # (B, out) scaled errors
    h_, d_ = Hinv1.unbind(0), Hinv1.diagonal().unbind(0)
    for i in range(W1.shape[0]):
        w, s, v = W1[i], S1[i], Q1[i]  # (out,)
        v.copy_(round_to_element(w / s, fmt))  # the element, as quantize_mx rounds w / s
        torch.sub(w, v * s, out=E1[i]).div_(d_[i])
        W1[i + 1:] -= h_[i][i + 1:, None] * E1[i]
    return E1.T.contiguous()


def gptq_quantize_mx(W: Tensor, H: Tensor, fmt: str, block: int | None = None, damp: float = 0.01,
                     block_size: int = 128, rows: list[int] | None = None) -> list[QTensor]:
    """GPTQ of one layer on a microscaling grid (MXFP4, MXFP8, NVFP4): every block's scale is fixed
    on the weights before any update (static groups, as `gptq_quantize`), then GPTQ's column loop
    rounds each column to the format's elements. With H = I it is `quantize_mx` bit for bit (tested).

    Args:
        W: (out, in), possibly several linears reading the same input stacked by rows; H: (in, in).
        block: elements per scale (None: the format's own).
        rows: the row counts of the stacked linears; each keeps its own scales (NVFP4: its own
            per-tensor scale), as if quantized alone.

    Returns:
        one QTensor per stacked linear.
    """
    W, H = _live_inputs(W, H)
    rows = [W.shape[0]] if rows is None else list(rows)
    grids = [quantize_mx(w, fmt, block) for w in W.split(rows)]  # the round-to-nearest grids
    S = torch.cat([qt.scales * qt.global_scale for qt in grids])  # (out, n_blocks): as quantize_mx divides
    g = grids[0].group_size
    zero = expand_groups(S == 0, g, W.shape[1])  # NVFP4 blocks whose scale rounded to 0: quantize_mx writes +0
    S = S.clamp_min(torch.finfo(torch.float32).tiny)  # there the loop's error is w itself (to within 1e-38)
    elements = gptq_columns(W, H, S, torch.zeros_like(S), g, functools.partial(mx_block_, fmt=fmt), damp, block_size)
    elements = elements.masked_fill(zero, 0.0)
    q = encode_float(elements, ELEMENTS[fmt][0])  # exact: every value is an element
    return [dataclasses.replace(qt, q=qi) for qt, qi in zip(grids, q.split(rows))]
