"""Pure-PyTorch references of every compiled kernel, with the same signatures.

They unpack the layouts of `pack.py` and compute in float64 (integers exactly), so a kernel is
checked against something slow and obvious rather than against itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pack import _lut_chunks, Packed24, PackedInt, PackedLUT, lut_row_scales, unpack_int, unpack_lut


def _expand(t: Tensor, g: int, K: int) -> Tensor:
    """(N, G) per-group values -> (N, K) per-input values."""
    return t.repeat_interleave(g, 1)[:, :K]


def _dequantize64(w: PackedInt) -> Tensor:
    q = unpack_int(w).long()
    v = w.codebook.double()[q] if w.codebook.numel() else q.double()
    return _expand(w.scales.double(), w.group_size, w.in_features) * v - _expand(w.szeros.double(), w.group_size, w.in_features)


def dequantize(w: PackedInt) -> Tensor:
    """W[o, i] = s[o, g] * v(q[o, i]) - (s*z)[o, g], v(q) = q or codebook[q]; (out, in) float32."""
    return _dequantize64(w).float()


def int_matmul(x: Tensor, w: PackedInt) -> Tensor:
    """y = x Wᵀ with W dequantized, in float64."""
    return (x.double() @ _dequantize64(w).T).float()


def lut_tables(x: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """T-MAC tables of one padded row x (Kp,): int8 tables (Kp/4, 16), scales per 64-input chunk, sums per group.

    The float operations and their order are those of the C++ `build_tables`, so the int8
    tables are identical to the kernel's.
    """
    x4 = x.float().reshape(-1, 4)  # (T, 4)
    T = torch.zeros(x4.shape[0], 16)
    for k in range(4):
        T[:, 2**k: 2**(k + 1)] = T[:, : 2**k] + x4[:, k: k + 1]
    pos, neg = x4.clamp(min=0), x4.clamp(max=0)
    pos = ((pos[:, 0] + pos[:, 1]) + pos[:, 2]) + pos[:, 3]
    neg = ((neg[:, 0] + neg[:, 1]) + neg[:, 2]) + neg[:, 3]
    tmax = torch.maximum(pos, -neg)
    Kp, scales, tq = x.shape[0], [], torch.empty(x4.shape[0], 16)
    for s in range(0, Kp, group_size):
        for c in range(s, s + group_size, 64):
            t0, t1 = c // 4, min(c + 64, s + group_size) // 4
            mx = tmax[t0:t1].max()
            inv = torch.tensor(127.0) / mx if mx > 0 else torch.tensor(0.0)
            tq[t0:t1] = torch.round(T[t0:t1] * inv)
            scales.append(mx / 127.0)
    xs = x.double().reshape(-1, group_size).sum(1)
    return tq.to(torch.int64), torch.stack(scales).double(), xs


def _lut_scales(w: PackedLUT) -> tuple[Tensor, Tensor]:
    """Scales and s*z of a `PackedLUT` back in row order: (out, G) float64 each."""
    s, sz = lut_row_scales(w)
    return s.double(), sz.double()


def lut_dequantize(w: PackedLUT) -> Tensor:
    """W[o, i] = s[o, g] * q[o, i] - (s*z)[o, g] of a `PackedLUT`; (out, in) float32."""
    s, sz = _lut_scales(w)
    K = w.in_features
    return (_expand(s, w.group_size, K) * unpack_lut(w).double() - _expand(sz, w.group_size, K)).float()


def lut_gemv(x: Tensor, w: PackedLUT) -> Tensor:
    """y = x Wᵀ the T-MAC way: exact integer sums of table lookups, then scales, in float64."""
    q = unpack_lut(w).long()  # (N, K)
    N, K, gi = w.out_features, w.in_features, w.group_size
    G = w.scales.shape[1]
    Kp = G * gi
    q = torch.nn.functional.pad(q, (0, Kp - K))
    s, sz = _lut_scales(w)  # (N, G)
    x2 = torch.nn.functional.pad(x.reshape(-1, K).float(), (0, Kp - K))
    chunks = _lut_chunks(Kp, gi)
    chunk_of_t = torch.tensor([i for i, (a, e) in enumerate(chunks) for _ in range((e - a) // 4)])
    cg = torch.tensor([a // gi for a, _ in chunks])  # group of each chunk
    ys = []
    for xr in x2:
        tq, ls, xs = lut_tables(xr, gi)
        acc = 0
        for b in range(w.bits):
            idx = (((q >> b) & 1).reshape(N, -1, 4) << torch.arange(4)).sum(-1)  # (N, T)
            acc = acc + torch.gather(tq[None].expand(N, -1, -1), 2, idx[..., None])[..., 0] * 2**b
        sums = torch.zeros(N, len(ls), dtype=torch.int64).index_add_(1, chunk_of_t, acc)  # exact per-chunk integers
        ys.append((s[:, cg] * ls * sums.double()).sum(1) - (sz * xs).sum(1))
    return torch.stack(ys).float().reshape(*x.shape[:-1], N)


def int8_gemm(xq: Tensor, wq: Tensor) -> Tensor:
    """Exact int32 C = xq wqᵀ."""
    return (xq.long() @ wq.long().T).to(torch.int32)


def w8a8_linear(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None = None, a_bits: int = 8,
                per_token: bool = True) -> Tensor:
    """Dynamic int8 activations (`shrinklib.quant.quantize_activations`) times per-channel int8 weights:
    the exact integer product, then (float(C) · s_x) · w_scale, the kernel's float operations."""
    from ..quant.smoothquant import quantize_activations

    x2 = x.reshape(-1, wq.shape[1])
    codes, s = quantize_activations(x2, a_bits, per_token)  # s (M, 1) per token, () per tensor
    y = int8_gemm(codes.to(torch.int8), wq).float() * s * w_scale[None, :]
    y = y + (bias if bias is not None else 0)
    return y.reshape(*x.shape[:-1], wq.shape[0])


def sparse24_dense(w: Packed24) -> Tensor:
    """The dense (out, in) float32 weight of a `Packed24`."""
    N, Kp = w.values.shape[0], w.values.shape[1] * 2
    code = w.index.to(torch.int32) & 0xFFFF
    pos = ((code[..., None] >> (2 * torch.arange(8))) & 3).reshape(N, Kp // 2)
    cols = pos + 4 * (torch.arange(Kp // 2) // 2)
    W = torch.zeros(N, Kp).scatter_add_(1, cols, w.values)
    return W[:, : w.in_features]


def sparse24_matmul(x: Tensor, w: Packed24) -> Tensor:
    """y = x Wᵀ with the dense weight, in float64."""
    return (x.double() @ sparse24_dense(w).double().T).float()
