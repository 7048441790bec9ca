"""QuantLinear: a linear layer stored as packed integer codes plus per-group scales and zeros.

The codes, scales and zeros are persistent buffers, so `model_size_bytes` counts them at
their stored size. The forward pass dequantizes (W = s * (q - z), the kernels' layout) and
calls `F.linear`: a pure-PyTorch reference, not a fast kernel. The dequantized weight is
kept as a runtime cache between calls (invalidated when a buffer changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import dequantize_codes


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (out, in) of `bits` bits into a bit stream per row, uint8 (out, ceil(in*bits/8)).

    Bit k of code i of a row is stream bit i*bits + k; stream bit t is bit t % 8 of byte t // 8.
    Every 8 codes fill exactly `bits` bytes.
    """
    out, d = q.shape
    n_bytes = -(-d * bits // 8)
    if bits == 8:
        return q.to(torch.uint8).clone()
    if bits in (2, 4):  # fast path: whole codes per byte, same bit order as the general case
        per = 8 // bits
        padded = torch.cat([q, q.new_zeros(out, (-d) % per)], 1).to(torch.uint8).reshape(out, -1, per)
        packed = padded[..., 0].clone()
        for k in range(1, per):
            packed |= padded[..., k] << (bits * k)
        return packed
    pad = (-d) % 8
    codes = torch.cat([q, q.new_zeros(out, pad)], 1).to(torch.int64).reshape(out, -1, 8)  # (out, n8, 8)
    v = (codes << (bits * torch.arange(8, device=q.device))).sum(-1, keepdim=True)  # (out, n8, 1): 8·bits bits
    stream = (v >> (8 * torch.arange(bits, device=q.device))) & 255  # (out, n8, bits) bytes
    return stream.reshape(out, -1)[:, :n_bytes].to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of `pack_codes`: uint8 codes (out, in)."""
    if bits == 8:
        return packed[:, :in_features]
    out = packed.shape[0]
    if bits in (2, 4):
        per, mask = 8 // bits, 2**bits - 1
        codes = torch.stack([(packed >> (bits * k)) & mask for k in range(per)], -1)  # (out, bytes, per)
        return codes.reshape(out, -1)[:, :in_features]
    n8 = -(-in_features // 8)
    stream = torch.cat([packed, packed.new_zeros(out, n8 * bits - packed.shape[1])], 1).to(torch.int64)
    v = (stream.reshape(out, n8, bits) << (8 * torch.arange(bits, device=packed.device))).sum(-1, keepdim=True)
    codes = (v >> (bits * torch.arange(8, device=packed.device))) & (2**bits - 1)  # (out, n8, 8)
    return codes.reshape(out, -1)[:, :in_features].to(torch.uint8)


class QuantLinear(nn.Module):
    """A weight-only quantized linear layer (integer grid, per-group scales and zeros)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        n_groups = -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(out_features, -(-in_features * bits // 8), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, n_groups, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_codes(cls, q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int, bias: Tensor | None = None) -> QuantLinear:
        """Build from codes q (out, in) and scales/zeros (out, n_groups)."""
        out, d = q.shape
        m = cls(d, out, bits, group_size, bias is not None, device=q.device)
        m.qweight.copy_(pack_codes(q, bits))
        m.scales.copy_(scales.float())
        m.zeros.copy_(zeros.float())
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def unpacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """(q, scales, zeros) in the kernels' layout: q uint8 (out, in), scales/zeros (out, n_groups)."""
        return unpack_codes(self.qweight, self.bits, self.in_features), self.scales, self.zeros

    def _weight_cached(self) -> Tensor:
        """The dequantized weight, recomputed only when a buffer changed (a runtime cache,
        not part of the state dict, so sizes count the packed form)."""
        key = (self.qweight._version, self.scales._version, self.zeros._version, self.qweight.data_ptr(), self.qweight.device)
        if getattr(self, "_cache_key", None) != key:
            self._cache, self._cache_key = self.dequantized_weight(), key
        return self._cache

    def dequantized_weight(self) -> Tensor:
        q, s, z = self.unpacked()
        return dequantize_codes(q, s, z, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        W = self._weight_cached().to(x.dtype)  # (out, in)
        return F.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
