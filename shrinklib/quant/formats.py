"""Number formats simulated in float32, and round-to-nearest (RTN) quantization.

Every quantizer of the suite (RTN, GPTQ, AWQ, the table formats) produces one representation,
`QTensor`, and every backend (the PyTorch reference, the packed-int, LUT and codebook kernels)
consumes it:

    q       uint8 (out, in), codes in [0, 2^bits - 1] (table formats: indices of the sorted table)
    scales  (out, n_groups), n_groups = ceil(in / group_size)
    zeros   (out, n_groups)
    W[o, i] = scales[o, i // g] * (q[o, i] - zeros[o, i // g])          (integer grids)
    W[o, i] = scales[o, i // g] * table(fmt)[q[o, i]]                    (table formats)

The grid is stored as float16 scales s and float16 offsets s·z, as GPTQ/AWQ checkpoints and
llama.cpp's Q4_1 store them (0.5 bit per weight at g64): `storage_grid` rounds a fitted grid to
those values before any code is chosen, so the quantizers optimise, and the reference
dequantizes, exactly the grid that every backend stores. scales and zeros stay float32 tensors
in memory (z = (s·z) / s, recomputed the same way when a backend unpacks).

Asymmetric (zero-point) grids use min-max scales, s = (max - min) / (2^b - 1), and a float
zero z = -min / s (as llama.cpp's Q4_1 stores d and m). Symmetric (absmax) grids use
s = max|w| / (2^(b-1) - 1) and z = 2^(b-1): the codes are 1 .. 2^b - 1, zero is exact, code 0 is
unused. Any group size works: when it does not divide the row, the last group is shorter (e.g.
576 columns at g128: 4 groups of 128 and one of 64). `group_size=None` is per-channel (one group
per row), "tensor" is per-tensor.

Non-uniform formats (NF4, FP4 e2m1, FP8 e4m3/e5m2) are value tables: `table(fmt)` is the
sorted table divided by its largest magnitude, a group's scale is its absmax (so it stays in
float16's normal range even for FP8 e5m2, whose table reaches 57344), and each weight rounds
to the nearest table value (codes index the sorted table).

Microscaling formats ("mxfp4", "mxfp8", "nvfp4"; see `mx`) use the same fields with the formats'
own semantics: codes are the elements' bit patterns, scales the decoded block scales (powers of
two, or FP8 E4M3 values times the per-tensor `global_scale`), zeros 0; a layer stores their 8-bit
scale codes (`QTensor.scale_fmt` says which), not float16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GroupSize = int | str | None  # int > 0, None (per channel) or "tensor"


def _fp_values(exp_bits: int, man_bits: int, bias: int, max_value: float | None = None) -> Tensor:
    """Every finite value of a small float format (sign, exponent, mantissa; subnormals included)."""
    vals = set()
    for e in range(2**exp_bits):
        for m in range(2**man_bits):
            if e == 0:
                v = (m / 2**man_bits) * 2.0 ** (1 - bias)
            else:
                v = (1 + m / 2**man_bits) * 2.0 ** (e - bias)
            if max_value is None or v <= max_value:
                vals.update({v, -v})
    return torch.tensor(sorted(vals), dtype=torch.float32)


# NF4: the 16 values of QLoRA (Dettmers et al. 2023, Appendix E), quantiles of N(0, 1) normalised to [-1, 1].
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
FP4_E2M1_VALUES = _fp_values(2, 1, bias=1)  # ±{0, 0.5, 1, 1.5, 2, 3, 4, 6} (OCP MX spec)
FP8_E4M3_VALUES = _fp_values(4, 3, bias=7, max_value=448.0)  # OCP FP8 E4M3 (no inf; max 448)
FP8_E5M2_VALUES = _fp_values(5, 2, bias=15, max_value=57344.0)  # IEEE-like E5M2 (max 57344)
TABLES = {"nf4": NF4_VALUES, "fp4": FP4_E2M1_VALUES, "fp8_e4m3": FP8_E4M3_VALUES, "fp8_e5m2": FP8_E5M2_VALUES}
MX_FORMATS = ("mxfp4", "mxfp8", "nvfp4")  # microscaling formats: codes are the elements' bits (see `mx`)


def table(fmt: str) -> Tensor:
    """The values of a table format divided by their largest magnitude (so in [-1, 1]), sorted."""
    values = TABLES[fmt]
    return values / values.abs().max()


@dataclass(frozen=True)
class QTensor:
    """A quantized weight: codes, per-group scales and zeros, and how to read them back."""

    q: Tensor  # uint8 (out, in)
    scales: Tensor  # float32 (out, n_groups), float16-exact (microscaling formats: see `scale_fmt`)
    zeros: Tensor  # float32 (out, n_groups), s·z float16-exact; 0 for table formats
    group_size: int  # columns per group (the last group may be shorter)
    fmt: str  # "int", a key of TABLES, or a microscaling format ("mxfp4", "mxfp8", "nvfp4"; see `mx`)
    bits: int
    global_scale: float = 1.0  # NVFP4's per-tensor FP32 scale (1.0 for every other format)

    @property
    def scale_fmt(self) -> str:
        """How the scales are stored: "fp16" (float16 s and s·z), "e8m0" (powers of two) or "e4m3"."""
        from .mx import SCALE_FORMATS

        return SCALE_FORMATS.get(self.fmt, "fp16")

    def dequantize(self) -> Tensor:
        return dequantize(self)


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups of a row: ceil(in / g)."""
    return math.ceil(in_features / group_size)


def resolve_group_size(group_size: GroupSize, in_features: int) -> int:
    """The group length in columns: None means the whole row; "tensor" is handled by the caller."""
    if group_size is None or group_size == "tensor":
        return in_features
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, None (per channel) or 'tensor', got {group_size!r}")
    return min(group_size, in_features)


def expand_groups(t: Tensor, group_size: int, in_features: int) -> Tensor:
    """(out, n_groups) per-group values → (out, in) per-column values."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def grouped(W: Tensor, group_size: int) -> Tensor:
    """(out, in) → (out, n_groups, g); a short last group is padded by repeating its last column
    (so per-group min, max and absmax are unchanged)."""
    out, d = W.shape
    pad = n_groups(d, group_size) * group_size - d
    if pad:
        W = torch.cat([W, W[:, -1:].expand(out, pad)], dim=1)
    return W.reshape(out, -1, group_size)


SCALE_MIN = 2.0**-24  # the smallest positive float16: a scale never rounds to zero


def storage_grid(scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """A fitted grid rounded to what every backend stores: float16 s and s·z.

    Returns float32 (scales, zeros) with s and s·z exactly float16 values; z = (s·z) / s, the
    same float32 division a backend makes when it unpacks, so the grid round-trips bit for bit.
    """
    s = scales.float().clamp_min(SCALE_MIN).to(torch.float16)
    if not torch.isfinite(s).all():
        raise ValueError(f"scales beyond float16's range (|s| > 65504): max {scales.abs().max().item():.3g}")
    sz = (s.float() * zeros.float()).to(torch.float16)
    if not torch.isfinite(sz).all():
        raise ValueError("scales * zeros beyond float16's range (|s·z| > 65504)")
    s = s.float()
    return s, sz.float() / s


def int_params(W: Tensor, bits: int, group_size: int, symmetric: bool, clip: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Scales and zeros (out, n_groups) of an integer grid fitted to each group of W (out, in).

    Args:
        clip: shrink each group's range by this ratio (AWQ's clipping); float or (out, n_groups).
    """
    Wg = grouped(W.float(), group_size)  # (out, G, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = Wg.abs().amax(-1) * clip  # (out, G)
        scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        zeros = torch.full_like(scales, 2.0 ** (bits - 1))
    else:
        wmin, wmax = Wg.amin(-1) * clip, Wg.amax(-1) * clip  # (out, G)
        rng = wmax - wmin
        scales = torch.where(rng > 0, rng / (2**bits - 1), torch.ones_like(rng))
        zeros = -wmin / scales
    return storage_grid(scales, zeros)


def quantize_codes(W: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    """Integer codes q = clamp(round(W / s + z), 0, 2^b - 1), uint8 (out, in)."""
    s, z = expand_groups(scales, group_size, W.shape[1]), expand_groups(zeros, group_size, W.shape[1])
    return torch.clamp(torch.round(W.float() / s + z), 0, 2**bits - 1).to(torch.uint8)


def dequantize_codes(q: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """W = s * (q - z), float32 (out, in): the formula every kernel implements."""
    s, z = expand_groups(scales, group_size, q.shape[1]), expand_groups(zeros, group_size, q.shape[1])
    return s * (q.float() - z)


def nearest(x: Tensor, values: Tensor) -> Tensor:
    """Index of the nearest entry of a sorted 1-D table for every element of x."""
    mids = (values[1:] + values[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.to(x.device))


def quantize(W: Tensor, fmt: str = "int", bits: int = 4, group_size: GroupSize = None, symmetric: bool = False,
             clip: float | Tensor = 1.0) -> QTensor:
    """Quantize a weight matrix W (out, in) by rounding to nearest.

    Args:
        fmt: "int" (integer grid of `bits`), "nf4", "fp4", "fp8_e4m3", "fp8_e5m2", or a microscaling
            format "mxfp4", "mxfp8", "nvfp4" (`mx.quantize_mx`; group_size is its block size).
        bits: 2..8 for "int" (ignored otherwise).
        group_size: columns per group, None (per channel) or "tensor" (one scale for all).
        symmetric: absmax grid (True) or min-max zero-point grid (False); "int" only.
        clip: range shrink ratio per group (1.0: none).
    """
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight (out, in), got shape {tuple(W.shape)}")
    if fmt in MX_FORMATS:
        from .mx import quantize_mx

        return quantize_mx(W, fmt, group_size)
    per_tensor = group_size == "tensor"
    work = W.reshape(1, -1) if per_tensor else W  # per-tensor = one group over everything
    g = resolve_group_size(group_size, work.shape[1])
    if fmt == "int":
        lowest = 2 if symmetric else 1  # a 1-bit zero-point grid is {min, max} (T-MAC's 1-bit LUT); absmax needs 2
        if not lowest <= bits <= 8:
            raise ValueError(f"{'symmetric ' if symmetric else ''}integer grids have {lowest}..8 bits, got {bits}")
        scales, zeros = int_params(work, bits, g, symmetric, clip)
        q = quantize_codes(work, scales, zeros, bits, g)
    elif fmt in TABLES:
        values = table(fmt).to(W.device)
        amax = grouped(work.float().abs(), g).amax(-1) * clip  # (out, G)
        scales, zeros = storage_grid(torch.where(amax > 0, amax, torch.ones_like(amax)), torch.zeros_like(amax))
        q = nearest(work.float() / expand_groups(scales, g, work.shape[1]), values).to(torch.uint8)
        bits = math.ceil(math.log2(len(values)))
    else:
        raise ValueError(f"unknown format {fmt!r}; use 'int' or one of {sorted(TABLES)}")
    if per_tensor:
        q = q.reshape(W.shape)
    return QTensor(q, scales, zeros, g, fmt, bits)


def dequantize(qt: QTensor) -> Tensor:
    """The float32 weight a QTensor stands for."""
    if qt.fmt in MX_FORMATS:
        from .mx import dequantize_mx

        return dequantize_mx(qt)
    if qt.fmt == "int":
        q = qt.q if qt.scales.shape[0] == qt.q.shape[0] else qt.q.reshape(1, -1)
        return dequantize_codes(q, qt.scales, qt.zeros, qt.group_size).reshape(qt.q.shape)
    values = table(qt.fmt).to(qt.q.device)
    q = qt.q if qt.scales.shape[0] == qt.q.shape[0] else qt.q.reshape(1, -1)
    return (values[q.long()] * expand_groups(qt.scales, qt.group_size, q.shape[1])).reshape(qt.q.shape)


def quantize_rtn(W: Tensor, bits: int = 4, group_size: GroupSize = None, symmetric: bool = False, fmt: str = "int") -> Tensor:
    """Round-to-nearest fake quantization: the float32 weight after quantize then dequantize."""
    return dequantize(quantize(W, fmt, bits, group_size, symmetric))


def quantize_weight(W: Tensor, bits: int = 4, group_size: int | None = 64, symmetric: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """RTN (q, scales, zeros) of a weight in the kernels' layout (see the module docstring)."""
    qt = quantize(W, "int", bits, group_size, symmetric)
    return qt.q, qt.scales, qt.zeros


def quantize_activations_per_token(x: Tensor, bits: int = 8) -> Tensor:
    """Dynamic symmetric per-token fake quantization of activations x (..., d)."""
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / qmax  # (..., 1)
    return torch.clamp(torch.round(x / s), -qmax, qmax) * s


def error(W: Tensor, Wq: Tensor) -> float:
    """Relative Frobenius error ‖W - Wq‖ / ‖W‖."""
    return ((W - Wq).norm() / W.norm().clamp_min(1e-12)).item()
