"""Microscaling formats, emulated bit for bit: MXFP4 and MXFP8 (OCP Microscaling Formats
Specification v1.0, 2023, https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf)
and NVFP4 (NVIDIA Blackwell, 2025).

    MXFP4   blocks of 32 E2M1 elements, one E8M0 scale (a power of two)      4 + 8/32 = 4.25 bits
    MXFP8   blocks of 32 E4M3 elements, one E8M0 scale                       8 + 8/32 = 8.25 bits
    NVFP4   blocks of 16 E2M1 elements, one E4M3 scale, one FP32 per tensor  4 + 8/16 = 4.5 bits

Element codes are the formats' own bit patterns (sign, exponent, mantissa), not table indices:
E2M1 code 0b0111 is 6.0 and 0b1000 is -0. A block decodes as X_i = scale · element(P_i) (spec
Sec. 2); NVFP4 as X_i = global · (scale · element(P_i)). In a `QTensor`, `scales` holds the
decoded block scales (float32, exact), `global_scale` NVFP4's per-tensor FP32 scale; a layer stores
the scales' 8-bit codes (`encode_scales`).

Conversion (spec Sec. 6.3): shared_exp = floor(log2(max_i |V_i|)) - emax_elem, X = 2^shared_exp,
P_i = V_i / X rounded to nearest (ties to even) and saturated at the element's largest normal.
NVFP4's scales follow the same spirit with an E4M3 scale: global = amax(W) / (448 · 6), then each
block's scale is E4M3(amax_block / 6 / global).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _float_codes(exp_bits: int, man_bits: int, bias: int) -> Tensor:
    """Value of every code of a sign/exponent/mantissa format with subnormals, indexed by the code
    (sign bit highest); no infinities or NaN here (E4M3's NaN is masked by the caller)."""
    n = 1 + exp_bits + man_bits
    codes = torch.arange(2**n)
    e, m = (codes >> man_bits) & (2**exp_bits - 1), codes & (2**man_bits - 1)
    mag = torch.where(e == 0, m / 2**man_bits * 2.0 ** (1 - bias), (1 + m / 2**man_bits) * 2.0 ** (e - bias))
    return torch.where(codes >> (n - 1) == 1, -mag, mag).float()


E2M1 = _float_codes(2, 1, bias=1)  # (16,) OCP MX v1.0 Sec. 5.3.3: ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}
E4M3 = _float_codes(4, 3, bias=7)  # (256,) OFP8 E4M3: codes 0x7F and 0xFF are NaN (masked below), max 448
E4M3[0x7F], E4M3[0xFF] = float("nan"), float("nan")
ELEMENTS = {"mxfp4": (E2M1, 4, 2), "mxfp8": (E4M3, 8, 8), "nvfp4": (E2M1, 4, 2)}  # fmt -> (codes, bits, emax_elem)
SCALE_FORMATS = {"mxfp4": "e8m0", "mxfp8": "e8m0", "nvfp4": "e4m3"}
BLOCK = {"mxfp4": 32, "mxfp8": 32, "nvfp4": 16}  # the formats' block sizes
E2M1_MAX, E4M3_MAX = 6.0, 448.0
LAYOUT = {"mxfp4": (1, 1, E2M1_MAX), "mxfp8": (3, 7, E4M3_MAX), "nvfp4": (1, 1, E2M1_MAX)}  # (man_bits, bias, max)


def encode_float(x: Tensor, codes: Tensor) -> Tensor:
    """Bit codes (uint8) of x in a small float format given by its code table: round to nearest,
    ties to the even code (the one whose last mantissa bit is 0), saturate at the largest normal."""
    if torch.isnan(x).any():
        raise ValueError("cannot encode NaN")
    n_mag = len(codes) // 2  # positive codes 0 .. n_mag - 1 are increasing magnitudes
    mags = codes[:n_mag]
    mags = mags[~torch.isnan(mags)].to(x.device)  # E4M3: drop the NaN code 0x7F
    mids = (mags[1:] + mags[:-1]) / 2
    a = x.abs().float().contiguous()
    lo, hi = torch.bucketize(a, mids), torch.bucketize(a, mids, right=True)  # differ only on an exact tie
    mag = torch.where((lo != hi) & (lo % 2 == 1), hi, lo)  # ties to even
    return (mag | (torch.signbit(x).to(torch.int64) << int(math.log2(len(codes)) - 1))).to(torch.uint8)


def round_to_element(x: Tensor, fmt: str) -> Tensor:
    """The value `encode_float` then `decode_float` give for x in the format's element type, by
    arithmetic instead of a table search: within x's binade the elements are evenly spaced by
    2^(exponent - man_bits) (subnormals share the lowest normal binade's spacing), so x rounds to a
    multiple of that spacing, half to even (the even multiple is the even code), saturating at the
    largest normal. A handful of elementwise ops: what GPTQ's column loop calls per column."""
    man_bits, bias, top = LAYOUT[fmt]
    a = x.abs()
    e = torch.floor(torch.log2(a)).clamp_(min=1 - bias)  # the binade's exponent (log2 0 = -inf: the lowest)
    step = torch.exp2(e - man_bits)  # exact powers of two
    return torch.copysign(torch.round(a / step).mul_(step).clamp_(max=top), x)


def decode_float(q: Tensor, codes: Tensor) -> Tensor:
    """Values of bit codes (uint8) of a small float format, float32."""
    return codes.to(q.device)[q.long()]


def encode_e8m0(exponent: Tensor) -> Tensor:
    """E8M0 codes of integer exponents: 2^e has code e + 127 (e in [-127, 127]; 0xFF is NaN)."""
    return (exponent.clamp(-127, 127) + 127).to(torch.uint8)


def decode_e8m0(code: Tensor) -> Tensor:
    """2^(code - 127), float32 (exact: 2^-127 is a float32 subnormal)."""
    if (code == 255).any():
        raise ValueError("E8M0 code 0xFF is NaN")
    return torch.ldexp(torch.ones(code.shape, device=code.device), code.long() - 127)


def mx_block_scales(amax: Tensor, emax_elem: int) -> Tensor:
    """E8M0 shared scales (float32 powers of two) of blocks with largest magnitudes amax (spec Sec. 6.3):
    2^(floor(log2 amax) - emax_elem), clamped to E8M0's range; an all-zero block gets 2^-127."""
    e = torch.floor(torch.log2(amax.float())).clamp(-127 - 64, 127 + 64)  # log2(0) = -inf -> clamped
    return decode_e8m0(encode_e8m0(e.to(torch.int64) - emax_elem))


def nvfp4_scales(amax: Tensor, tensor_amax: float) -> tuple[Tensor, float]:
    """NVFP4's block scales (E4M3 values, float32) and per-tensor FP32 scale from block and tensor amax."""
    g = tensor_amax / (E4M3_MAX * E2M1_MAX) if tensor_amax > 0 else 1.0
    g = torch.tensor(g, dtype=torch.float32)
    s = decode_float(encode_float(amax.float() / E2M1_MAX / g, E4M3), E4M3)  # (out, G), saturates at 448
    return s, g.item()


def quantize_mx(W: Tensor, fmt: str, block: int | None = None):
    """Encode W (out, in) in a microscaling format; `block` overrides the format's block size.

    Returns a QTensor whose codes are the elements' bit patterns and whose scales are the decoded
    block scales (a short last block is allowed, as for the suite's groups).
    """
    from .formats import QTensor, expand_groups, grouped, resolve_group_size

    if fmt not in ELEMENTS:
        raise ValueError(f"unknown microscaling format {fmt!r}; use one of {sorted(ELEMENTS)}")
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(W.shape)}")
    codes, bits, emax = ELEMENTS[fmt]
    g = resolve_group_size(BLOCK[fmt] if block is None else block, W.shape[1])
    W = W.float()
    amax = grouped(W.abs(), g).amax(-1)  # (out, G)
    if fmt == "nvfp4":
        scales, gs = nvfp4_scales(amax, W.abs().max().item())
        denom = expand_groups(scales, g, W.shape[1]) * gs  # (out, in)
        x = torch.where(denom > 0, W / denom.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(W))
    else:
        scales, gs = mx_block_scales(amax, emax), 1.0
        x = W / expand_groups(scales, g, W.shape[1])  # exact: a division by a power of two
    return QTensor(encode_float(x, codes), scales, torch.zeros_like(scales), g, fmt, bits, gs)


def dequantize_mx(qt) -> Tensor:
    """The float32 weight of a microscaling QTensor: global · (scale · element)."""
    from .formats import expand_groups

    codes = ELEMENTS[qt.fmt][0]
    x = decode_float(qt.q, codes) * expand_groups(qt.scales, qt.group_size, qt.q.shape[1])  # exact in float32
    return x * qt.global_scale if qt.fmt == "nvfp4" else x


def encode_scales(qt) -> Tensor:
    """The 8-bit codes a layer stores for a microscaling QTensor's scales (E8M0 or E4M3)."""
    if SCALE_FORMATS[qt.fmt] == "e8m0":
        e = torch.log2(qt.scales).round().to(torch.int64)
        return encode_e8m0(e)
    return encode_float(qt.scales, E4M3)


def decode_scales(code: Tensor, fmt: str) -> Tensor:
    """Inverse of `encode_scales`: float32 block scales."""
    return decode_e8m0(code) if SCALE_FORMATS[fmt] == "e8m0" else decode_float(code, E4M3)


def bits_per_weight(fmt: str, group_size: int, numel: int | None = None) -> float:
    """Bits stored per weight, scales counted: element bits + 8 / block (+ 32 / numel for NVFP4's
    per-tensor scale); integer grids of the suite store a float16 scale and a float16 s·z per group."""
    if fmt in ELEMENTS:
        extra = 32 / numel if (fmt == "nvfp4" and numel) else 0.0
        return ELEMENTS[fmt][1] + 8 / group_size + extra
    raise ValueError(f"unknown microscaling format {fmt!r}")


def mx_(model, config, backend: str | None = "reference", progress: bool = True) -> None:
    """Round every block linear to a microscaling format (`MXConfig`)."""
    from ..arch import blocks, linears
    from .apply import _install

    with torch.no_grad():
        for block in blocks(model):
            for path, lin in linears(block).items():
                _install(block, path, quantize_mx(lin.weight.float(), config.fmt, config.block_size), backend)


def stored_bits_per_weight(model) -> float:
    """Bits that a model's quantized linears store per weight: codes, scales and zeros (biases excluded)."""
    from .qlinear import QuantLinear

    bits, n = 0, 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            bits += 8 * sum(b.numel() * b.element_size() for name, b in m.named_buffers(recurse=False) if name != "bias")
            n += m.in_features * m.out_features
    if n == 0:
        raise ValueError("stored_bits_per_weight: the model has no quantized linear layers")
    return bits / n
