"""Weight layouts of the compiled kernels: pure-PyTorch pack and unpack.

A quantized weight arrives as the fields of a `shrinklib.quant.QTensor`: integer codes `q`
(uint8, (out, in), values in [0, 2^bits)), `scales` and `zeros` float32 (out, n_groups),
n_groups = ceil(in / group_size), with `W[o, i] = scales[o, i // g] * (q[o, i] - zeros[o, i // g])`.
Rows are padded to whole groups with code 0 (the kernels pad x with zeros, so padding
contributes nothing). Codebooks are the number-format tables of `shrinklib.quant.formats`.

The packed layouts store the scales and the products s·z in float16, as GPTQ/AWQ checkpoints
and llama.cpp's Q4_1 do: at group size 64 that is 0.5 bit per weight of overhead instead of
1 bit in float32 (4.5 bits per weight at 4-bit, 2.5 at 2-bit). The references compute with the
same stored float16 values, so the kernels are checked against exactly what they read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..quant.formats import table

LUT_PERM = [*range(0, 32, 2), *range(1, 32, 2)]  # order in which the LUT kernel's lanes hold a tile's rows


def table_codebook(fmt: str) -> Tensor:
    """The kernel's 16-entry codebook of a table format: `shrinklib.quant.formats.table(fmt)` (sorted,
    largest magnitude 1), padded with its last value (FP4 e2m1 has 15 distinct values; code 15 is
    never produced)."""
    values = table(fmt)
    if len(values) > 16:
        raise ValueError(f"{fmt} has {len(values)} values; the codebook kernel takes at most 16")
    return torch.cat([values, values[-1:].expand(16 - len(values))]).float().contiguous()


CODEBOOKS = {name: table_codebook(name) for name in ("nf4", "fp4")}
NF4, FP4 = CODEBOOKS["nf4"], CODEBOOKS["fp4"]


@dataclass
class PackedInt:
    """Bit-plane packed codes for `int_matmul`: packed (out, Kp*bits/8) uint8, scales and s*z (out, G) float16."""

    packed: Tensor
    scales: Tensor
    szeros: Tensor
    codebook: Tensor  # (16,) float32, or empty for plain integers
    bits: int
    group_size: int  # the group the kernel uses (a multiple of 32)
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.szeros, self.codebook))


@dataclass
class PackedLUT:
    """Bit planes of 4-input indices in 32-row tiles for `lut_gemv`; scales and s*z (tiles, G, 32) float16."""

    packed: Tensor
    scales: Tensor
    szeros: Tensor
    bits: int
    group_size: int
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.szeros))


@dataclass
class Packed24:
    """2:4 sparse weight: values (out, Kp/2) float32 and 2-bit positions, 8 per int16 (out, Kp/16)."""

    values: Tensor
    index: Tensor
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        return self.values.numel() * 4 + self.index.numel() * 2


def plane_widths(bits: int) -> list[int]:
    """Widths of the bit planes of a code, low bits first: 3 -> [2, 1], 8 -> [8]."""
    out, rem = [], bits
    while rem:
        w = 8 if rem >= 8 else 4 if rem >= 4 else 2 if rem >= 2 else 1
        out.append(w)
        rem -= w
    return out


def _check_codes(q: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int, allowed) -> int:
    """Validate the quantizer's output; return the kernel's group size (a multiple of 32)."""
    if bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits}")
    if not isinstance(q, Tensor) or q.dtype != torch.uint8 or q.dim() != 2:
        raise TypeError(f"q must be a 2-D uint8 tensor of codes, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.device.type != "cpu":
        raise ValueError(f"the kernels run on the CPU; q is on {q.device}")
    N, K = q.shape
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    G = -(-K // group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != (N, G):
            raise ValueError(f"{name} must have shape (out, ceil(in/group_size)) = {(N, G)}, got {tuple(t.shape)}")
    if int(q.max()) >= 2**bits:
        raise ValueError(f"q has a code {int(q.max())} >= 2^{bits}")
    if G == 1:
        return -(-K // 32) * 32
    if group_size % 32:
        raise ValueError(f"group_size must be a multiple of 32 (or >= in_features for one group per row), got {group_size}")
    return group_size


def to_half(t: Tensor, name: str) -> Tensor:
    """Scales (or s·z) as stored: float16, refusing values float16 cannot hold."""
    h = t.to(torch.float16)
    if not torch.isfinite(h).all():
        raise ValueError(f"{name} has values beyond float16's range (|v| > 65504): {t.abs().max().item():.3g}")
    return h.contiguous()


def _pad_cols(t: Tensor, n: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, n - t.shape[1])) if n > t.shape[1] else t


def pack_planes(q: Tensor, bits: int) -> Tensor:
    """(N, Kp) codes -> (N, Kp*bits/8) bytes: per 32 codes, planes of width w, byte j field k = code j + 4wk."""
    N, Kp = q.shape
    q = q.to(torch.int32).reshape(N, Kp // 32, 32)
    out, shift = [], 0
    for w in plane_widths(bits):
        plane = ((q >> shift) & ((1 << w) - 1)).reshape(N, Kp // 32, 8 // w, 4 * w)
        weights = (1 << (w * torch.arange(8 // w, dtype=torch.int32)))[:, None]
        out.append((plane * weights).sum(2))
        shift += w
    return torch.cat(out, 2).reshape(N, Kp * bits // 8).to(torch.uint8)


def unpack_planes(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_planes`: (N, Kp*bits/8) bytes -> (N, Kp) uint8 codes."""
    N = packed.shape[0]
    p = packed.to(torch.int32).reshape(N, -1, 4 * bits)
    q, shift, off = 0, 0, 0
    for w in plane_widths(bits):
        b = p[:, :, off:off + 4 * w, None] >> (w * torch.arange(8 // w, dtype=torch.int32))  # (N, B, 4w, 8/w)
        q = q + ((b & ((1 << w) - 1)).transpose(2, 3).reshape(N, -1, 32) << shift)
        off += 4 * w
        shift += w
    return q.reshape(N, -1).to(torch.uint8)


def pack_int(q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> PackedInt:
    """Pack a 2/3/4/8-bit quantized weight for `int_matmul`.

    Args:
        q: (out, in) uint8 codes in [0, 2^bits).
        scales, zeros: (out, ceil(in / group_size)) float32.
        bits: 2, 3, 4 or 8.
        group_size: a multiple of 32, or >= in (one group per row).
    """
    gi = _check_codes(q, scales, zeros, bits, group_size, (2, 3, 4, 8))
    N, K = q.shape
    Kp = scales.shape[1] * gi
    return PackedInt(pack_planes(_pad_cols(q, Kp), bits), to_half(scales, "scales"),
                     to_half(scales * zeros, "scales * zeros"), torch.empty(0), bits, gi, K, N)


def pack_codebook(q: Tensor, scales: Tensor, codebook: Tensor | str, group_size: int) -> PackedInt:
    """Pack 4-bit codebook indices (NF4, FP4, any 16 floats): W[o, i] = scales[o, g] * codebook[q[o, i]]."""
    cb = CODEBOOKS[codebook] if isinstance(codebook, str) else codebook
    if not isinstance(cb, Tensor) or cb.shape != (16,) or cb.dtype != torch.float32:
        raise ValueError("codebook must be 'nf4', 'fp4' or a float32 tensor of 16 values")
    w = pack_int(q, scales, torch.zeros_like(scales), 4, group_size)
    w.codebook = cb.contiguous()
    return w


def unpack_int(w: PackedInt) -> Tensor:
    """The (out, in) uint8 codes of a `PackedInt`."""
    return unpack_planes(w.packed, w.bits)[:, : w.in_features]


def _lut_chunks(Kp: int, gi: int) -> list[tuple[int, int]]:
    """(start, end) input ranges of the LUT chunks: groups cut into pieces of at most 64 inputs."""
    return [(s, min(s + 64, g + gi)) for g in range(0, Kp, gi) for s in range(g, g + gi, 64)]


def pack_lut(q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> PackedLUT:
    """Pack a 1-4-bit quantized weight as bit-plane indices for the T-MAC `lut_gemv`.

    Args: as `pack_int`, with bits 1 to 4.
    """
    gi = _check_codes(q, scales, zeros, bits, group_size, (1, 2, 3, 4))
    N, K = q.shape
    G = scales.shape[1]
    Kp, Np = G * gi, -(-N // 32) * 32
    qp = torch.nn.functional.pad(q.to(torch.int32), (0, Kp - K, 0, Np - N))  # (Np, Kp)
    bit = torch.stack([(qp >> b) & 1 for b in range(bits)], 1).reshape(Np, bits, Kp // 4, 4)
    idx = (bit << torch.arange(4, dtype=torch.int32)).sum(-1)  # (Np, bits, T): 4-input indices per plane
    pairs = (idx[..., 0::2] | (idx[..., 1::2] << 4)).reshape(Np // 32, 32, bits, Kp // 8)
    parts = [pairs[..., s // 8: e // 8].permute(0, 2, 3, 1).reshape(Np // 32, -1) for s, e in _lut_chunks(Kp, gi)]

    def tiles(t: Tensor, name: str) -> Tensor:  # (N, G) -> (tiles, G, 32) float16 in lane order
        t = torch.nn.functional.pad(t, (0, 0, 0, Np - N)).reshape(Np // 32, 32, G)[:, LUT_PERM]
        return to_half(t.transpose(1, 2), name)

    return PackedLUT(torch.cat(parts, 1).to(torch.uint8).contiguous(), tiles(scales, "scales"),
                     tiles(scales * zeros, "scales * zeros"), bits, gi, K, N)


def lut_row_scales(w: PackedLUT) -> tuple[Tensor, Tensor]:
    """Scales and s*z of a `PackedLUT` back in row order: (out, G) float16 each."""
    G = w.scales.shape[1]
    inv_perm = torch.argsort(torch.tensor(LUT_PERM))
    s, sz = (t[:, :, inv_perm].transpose(1, 2).reshape(-1, G)[: w.out_features] for t in (w.scales, w.szeros))
    return s, sz


def unpack_lut(w: PackedLUT) -> Tensor:
    """The (out, in) uint8 codes of a `PackedLUT`."""
    tiles, G = w.scales.shape[:2]
    Kp = G * w.group_size
    p = w.packed.to(torch.int32)
    idx = torch.zeros(tiles, 32, w.bits, Kp // 4, dtype=torch.int32)
    off = 0
    for s, e in _lut_chunks(Kp, w.group_size):
        n = (e - s) // 8
        c = p[:, off: off + w.bits * n * 32].reshape(tiles, w.bits, n, 32).permute(0, 3, 1, 2)
        idx[..., s // 4: e // 4: 2], idx[..., s // 4 + 1: e // 4: 2] = c & 15, c >> 4
        off += w.bits * n * 32
    bits = (idx[..., None] >> torch.arange(4, dtype=torch.int32)) & 1  # (tiles, 32, bits, T, 4)
    q = (bits << torch.arange(w.bits, dtype=torch.int32)[:, None, None]).sum(2)
    return q.reshape(tiles * 32, Kp)[: w.out_features, : w.in_features].to(torch.uint8)


def pack_sparse24(W: Tensor, mask: Tensor | None = None) -> Packed24:
    """Pack a 2:4 sparse weight (at most 2 kept of every 4 inputs) as values plus 2-bit positions.

    Args:
        W: (out, in) float32.
        mask: (out, in) bool of kept weights (a pruner's 2:4 mask); default W != 0.
    """
    if not isinstance(W, Tensor) or W.dtype != torch.float32 or W.dim() != 2:
        raise TypeError(f"W must be a 2-D float32 tensor, got {getattr(W, 'dtype', type(W).__name__)}")
    mask = W != 0 if mask is None else mask
    if mask.shape != W.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(W.shape)}")
    N, K = W.shape
    Kp = -(-K // 16) * 16
    Wg = _pad_cols(W * mask, Kp).reshape(N, Kp // 4, 4)
    mg = _pad_cols(mask.to(torch.int32), Kp).reshape(N, Kp // 4, 4)
    if int(mg.sum(-1).max()) > 2:
        raise ValueError("the mask is not 2:4: some group of 4 consecutive inputs keeps more than 2 weights")
    pos = torch.sort((1 - mg) * 4 + torch.arange(4), -1).values[..., :2] % 4  # kept positions first
    values = torch.gather(Wg, 2, pos).reshape(N, Kp // 2)
    code = (pos.reshape(N, Kp // 16, 8) << (2 * torch.arange(8))).sum(-1)  # (N, Kp/16) in [0, 2^16)
    index = torch.where(code >= 2**15, code - 2**16, code).to(torch.int16)
    return Packed24(values.contiguous(), index.contiguous(), K, N)


def quantize_int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8: x ≈ xq * scale[:, None], |xq| <= 127."""
    scale = x.abs().amax(1).clamp_min(1e-12) / 127
    return torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
