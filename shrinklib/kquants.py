"""llama.cpp's k-quants Q4_K and Q6_K, encoded here (the `gguf` package only decodes them), with
an importance matrix from calibration data.

Both cut a row into super-blocks of QK_K = 256 weights (the GGML spec, ggml-common.h):
    Q4_K  8 sub-blocks of 32: w = d·sc_j·q − dmin·m_j, q in 0..15, sc_j and m_j 6-bit,
          d and dmin float16; 144 bytes (4.5 bits per weight).
    Q6_K  16 sub-blocks of 16: w = d·sc_k·(q − 32), q in 0..63, sc_k int8, d float16;
          210 bytes (6.5625 bits per weight).
Each sub-block's scale (and Q4_K's min) is fitted by weighted least squares over a small grid
of candidate scales, the weights being the importance of each input column (mean x² of the
layer's calibration inputs: llama.cpp's imatrix) times sqrt(σ² + w²), as llama.cpp's
quantize_row_q4_K_impl does; without an importance matrix the weights are w-magnitude based.
The sub-block scales are then rounded to the super-block grid and the codes re-chosen for
those rounded scales, so what is stored is exactly what `dequantize_*` computes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

QK_K = 256
FORMATS = ("Q4_K", "Q6_K")


def _importance(x: Tensor, imatrix: Tensor | None) -> Tensor:
    """Weights (..., n_sub, n) of each weight's squared error; x (..., n_sub, n) one super-block per row."""
    if imatrix is None:
        av = x.pow(2).mean(-1, keepdim=True).sqrt()  # (..., n_sub, 1)
        return av + x.abs()
    sigma2 = 2 * x.pow(2).mean((-2, -1), keepdim=True)  # per super-block
    return imatrix * (sigma2 + x * x).sqrt()


def fit_scale_min(x: Tensor, w: Tensor, nmax: int = 15, steps: int = 20) -> tuple[Tensor, Tensor]:
    """Weighted least-squares x ≈ a·L − m with L in 0..nmax, a ≥ 0, m ≥ 0, per sub-block.

    x, w: (..., n). Tries the candidate inverse scales (nmax + δ)/(max − min), δ in [−1, 1], and for
    each the rounding L it induces; returns the best (a, m), each (...,).
    """
    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)  # the grid reaches 0: m ≥ 0
    span = (hi - lo).clamp_min(1e-30)
    best_a, best_m = span / nmax, -lo
    best_err = (w * (best_a[..., None] * ((x - lo[..., None]) / best_a[..., None]).round().clamp(0, nmax)
                     + lo[..., None] - x).pow(2)).sum(-1)
    sw, swx = w.sum(-1), (w * x).sum(-1)
    for k in range(steps + 1):
        iscale = (nmax - 1 + 2 * k / steps) / span  # (nmax + δ)/(max − min)
        L = ((x - lo[..., None]) * iscale[..., None]).round().clamp(0, nmax)
        swl, swl2, swlx = (w * L).sum(-1), (w * L * L).sum(-1), (w * L * x).sum(-1)
        D = sw * swl2 - swl * swl
        a = (sw * swlx - swl * swx) / D.clamp_min(1e-30)
        b = (swl2 * swx - swl * swlx) / D.clamp_min(1e-30)  # x ≈ a·L + b
        pos = b > 0  # the min must stay ≤ 0: refit the scale alone
        a = torch.where(pos, swlx / swl2.clamp_min(1e-30), a)
        b = torch.where(pos, torch.zeros_like(b), b)
        err = (w * (a[..., None] * L + b[..., None] - x).pow(2)).sum(-1)
        better = (err < best_err) & (a > 0) & (D > 0)
        best_err = torch.where(better, err, best_err)
        best_a, best_m = torch.where(better, a, best_a), torch.where(better, -b, best_m)
    return best_a, best_m


def fit_scale_symmetric(x: Tensor, w: Tensor, nmax: int = 32, steps: int = 18) -> Tensor:
    """Weighted least-squares x ≈ s·L with L in [−nmax, nmax − 1], per sub-block; x, w (..., n) → s (...,).

    The value of largest magnitude maps to −nmax (the grid's longer side), as in llama.cpp; candidate
    inverse scales −(nmax + δ)/x_max, δ in [−0.9, 0.9].
    """
    idx = x.abs().argmax(-1, keepdim=True)
    xmax = x.gather(-1, idx).squeeze(-1)  # (...,) signed value of largest magnitude
    safe = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
    best_s, best_err = torch.zeros_like(xmax), (w * x * x).sum(-1)
    for k in range(steps + 1):
        iscale = -(nmax - 0.9 + 1.8 * k / steps) / safe
        L = (x * iscale[..., None]).round().clamp(-nmax, nmax - 1)
        s = (w * L * x).sum(-1) / (w * L * L).sum(-1).clamp_min(1e-30)
        err = (w * (s[..., None] * L - x).pow(2)).sum(-1)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    return best_s


def _f16(x: Tensor) -> Tensor:
    return x.to(torch.float16).float()


def _codes(x: Tensor, step: Tensor, offset: Tensor, lo: int, hi: int) -> Tensor:
    """round((x + offset)/step) clamped to [lo, hi] (0 where the step is 0)."""
    q = ((x + offset) / torch.where(step == 0, torch.ones_like(step), step)).round().clamp(lo, hi)
    return torch.where(step == 0, torch.zeros_like(q) + max(lo, 0), q)


def quantize_q4_k(W: Tensor, imatrix: Tensor | None = None) -> tuple[np.ndarray, Tensor]:
    """Q4_K bytes (out, in/256·144) of W (out, in), and the float32 weight they decode to.

    Args:
        imatrix: (in,) importance of each input column (mean x² over calibration tokens), or None.
    """
    out, d_in = W.shape
    x = W.float().reshape(out, -1, 8, 32)  # (out, n_super, 8, 32)
    imp = None if imatrix is None else imatrix.float().reshape(1, -1, 8, 32)
    a, m = fit_scale_min(x, _importance(x, imp))  # (out, n_super, 8)
    d, dmin = _f16(a.amax(-1) / 63), _f16(m.amax(-1) / 63)  # (out, n_super)
    sc = (a / torch.where(d == 0, torch.ones_like(d), d)[..., None]).round().clamp(0, 63)
    mm = (m / torch.where(dmin == 0, torch.ones_like(dmin), dmin)[..., None]).round().clamp(0, 63)
    step, off = d[..., None] * sc, dmin[..., None] * mm  # (out, n_super, 8): the decoder's float32 products
    q = _codes(x, step[..., None], off[..., None], 0, 15)  # (out, n_super, 8, 32)
    back = (step[..., None] * q - off[..., None]).reshape(out, d_in)
    # bytes: d, dmin (float16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
    sc8, mm8 = sc.to(torch.uint8), mm.to(torch.uint8)
    scales = torch.cat([(sc8[..., :4] & 63) | ((sc8[..., 4:] >> 4) << 6),
                        (mm8[..., :4] & 63) | ((mm8[..., 4:] >> 4) << 6),
                        (sc8[..., 4:] & 15) | ((mm8[..., 4:] & 15) << 4)], -1)  # (out, n_super, 12)
    q8 = q.to(torch.uint8).reshape(out, -1, 4, 2, 32)  # sub-blocks 2i (low nibble) and 2i + 1 (high)
    qs = (q8[:, :, :, 0] | (q8[:, :, :, 1] << 4)).reshape(out, -1, 128)
    halves = [t.numpy().astype(np.float16).view(np.uint8).reshape(out, -1, 2) for t in (d, dmin)]
    raw = np.concatenate([*halves, scales.numpy(), qs.numpy()], -1)  # (out, n_super, 144)
    return raw.reshape(out, -1), back


def quantize_q6_k(W: Tensor, imatrix: Tensor | None = None) -> tuple[np.ndarray, Tensor]:
    """Q6_K bytes (out, in/256·210) of W (out, in), and the float32 weight they decode to."""
    out, d_in = W.shape
    x = W.float().reshape(out, -1, 16, 16)  # (out, n_super, 16, 16)
    imp = None if imatrix is None else imatrix.float().reshape(1, -1, 16, 16)
    s = fit_scale_symmetric(x, x * x if imp is None else _importance(x, imp))  # (out, n_super, 16)
    big = s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1)  # signed scale of largest magnitude
    d = _f16(-big / 128)  # that scale becomes −128
    sc = (s / torch.where(d == 0, torch.ones_like(d), d)[..., None]).round().clamp(-128, 127)
    step = d[..., None] * sc  # (out, n_super, 16)
    L = _codes(x, step[..., None], torch.zeros(()), -32, 31)
    back = (step[..., None] * L).reshape(out, d_in)
    q = (L + 32).to(torch.uint8).reshape(out, -1, 256)
    v = q.reshape(out, -1, 2, 2, 64)  # value 128·i + 64·h + b: chunk i, half h, byte b
    ql = (v[:, :, :, 0] & 15) | ((v[:, :, :, 1] & 15) << 4)  # (out, n_super, 2, 64)
    hi = (q >> 4).reshape(out, -1, 2, 4, 32)  # value 128·i + 32·j + b: its 2 high bits at bits 2j of qh[32·i + b]
    qh = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)  # (out, n_super, 2, 32)
    raw = np.concatenate([ql.reshape(out, -1, 128).numpy(), qh.reshape(out, -1, 64).numpy(),
                          sc.to(torch.int8).numpy().view(np.uint8), d.numpy().astype(np.float16).view(np.uint8)
                          .reshape(out, -1, 2)], -1)  # (out, n_super, 210)
    return raw.reshape(out, -1), back


def quantize_k(W: Tensor, kind: str, imatrix: Tensor | None = None) -> tuple[np.ndarray, Tensor]:
    """Encode W (out, in) as `kind` ("Q4_K" or "Q6_K"); in must be a multiple of 256."""
    if W.shape[1] % QK_K:
        raise ValueError(f"{kind} needs rows of a multiple of {QK_K} weights, got {W.shape[1]}")
    if imatrix is not None and imatrix.shape != (W.shape[1],):
        raise ValueError(f"imatrix must have one entry per input column ({W.shape[1]}), got {tuple(imatrix.shape)}")
    return {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}[kind](W.detach().cpu(), imatrix)


@torch.no_grad()
def importance_matrix(model, calib_ids: Tensor, progress: bool = False) -> dict[str, Tensor]:
    """llama.cpp's importance matrix from our calibration data: for every block linear (full module
    name), the mean x² of each input column over the calibration tokens, (in,)."""
    from .arch import layout
    from .calib import collect_input_stats, sequential

    prefix, out = layout(model).blocks_path, {}

    def step(s):
        for path, st in collect_input_stats(s.block, s.forward, hessian=False).items():
            out[f"{prefix}.{s.index}.{path}"] = (st.sq_sum / st.n).cpu()

    sequential(model, calib_ids, step, desc="imatrix", progress=progress)
    return out
