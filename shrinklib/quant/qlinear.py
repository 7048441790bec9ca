"""QuantLinear: a linear layer whose weight is a `QTensor`, on one of several backends.

Every backend stores the same representation (codes, float16 scales and s·z, group size,
format, bits) in its own layout and computes y = x Wᵀ its own way:

    "reference"  QuantLinear: codes packed as a bit stream; dequantize, then `F.linear`
    "int"        kernels.modules.IntLinear: bit planes for the packed-int GEMV (qmatmul)
    "codebook"   the same kernel with a 16-entry table (NF4, FP4)
    "lut"        kernels.modules.LUTLinear: T-MAC lookup-table GEMV (1-4 bits)

Each backend is a subclass of QuantLinear with the same constructor `(qt, bias)` and the same
`qtensor()`, so `shrinklib.quant.set_backend_` moves a quantized model between them without
loss. The buffers are persistent, so `model_size_bytes` counts what each backend stores.
The reference keeps its dequantized weight as a runtime cache between calls (invalidated
when a buffer changes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import MX_FORMATS, QTensor, dequantize, quantize
from .mx import decode_scales, encode_scales


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
    """A weight-only quantized linear layer on the reference backend (dequantize, then F.linear),
    and the base class of every backend."""

    backend = "reference"

    def __init__(self, qt: QTensor, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qt.q.shape
        self.bits, self.group_size, self.fmt = qt.bits, qt.group_size, qt.fmt
        self.pack_(qt)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def empty(cls, in_features: int, out_features: int, bits: int, group_size: int, fmt: str = "int",
              bias: bool = False) -> QuantLinear:
        """A layer of the right shapes holding zeros, to load a state dict into."""
        G = -(-in_features // group_size)
        qt = QTensor(torch.zeros(out_features, in_features, dtype=torch.uint8), torch.ones(out_features, G),
                     torch.zeros(out_features, G), group_size, fmt, bits)
        return cls(qt, torch.zeros(out_features) if bias else None)

    @classmethod
    def from_qtensor(cls, qt: QTensor, bias: Tensor | None = None) -> QuantLinear:
        return cls(qt, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 64, fmt: str = "int",
                    symmetric: bool = False) -> QuantLinear:
        """Round-to-nearest of an nn.Linear's weight, on this backend."""
        return cls(quantize(linear.weight.detach().float(), fmt, bits, group_size, symmetric), linear.bias)

    @classmethod
    def from_codes(cls, q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int,
                   bias: Tensor | None = None) -> QuantLinear:
        """From integer codes q (out, in) and scales/zeros (out, n_groups) (see `storage_grid`)."""
        return cls(QTensor(q, scales, zeros, group_size, "int", bits), bias)

    def pack_(self, qt: QTensor) -> None:
        """Store qt in this backend's layout (buffers)."""
        self.register_buffer("qweight", pack_codes(qt.q, qt.bits))
        if qt.fmt in MX_FORMATS:  # 8-bit scale codes (E8M0 or E4M3); NVFP4 adds its FP32 tensor scale
            self.register_buffer("scales", encode_scales(qt))
            if qt.fmt == "nvfp4":
                self.register_buffer("global_scale", torch.tensor([qt.global_scale], dtype=torch.float32))
            return
        self.register_buffer("scales", qt.scales.to(torch.float16))
        self.register_buffer("szeros", (qt.scales * qt.zeros).to(torch.float16))

    def qtensor(self) -> QTensor:
        """The representation this layer stores (exactly the quantizer's output)."""
        q = unpack_codes(self.qweight, self.bits, self.in_features)
        if self.fmt in MX_FORMATS:
            s = decode_scales(self.scales, self.fmt)
            gs = self.global_scale.item() if self.fmt == "nvfp4" else 1.0
            return QTensor(q, s, torch.zeros_like(s), self.group_size, self.fmt, self.bits, gs)
        s = self.scales.float()
        return QTensor(q, s, self.szeros.float() / s, self.group_size, self.fmt, self.bits)

    def unpacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """(q, scales, zeros): q uint8 (out, in), scales/zeros float32 (out, n_groups)."""
        qt = self.qtensor()
        return qt.q, qt.scales, qt.zeros

    def dequantized_weight(self) -> Tensor:
        """The float32 weight (out, in) this layer applies."""
        return dequantize(self.qtensor())

    def _weight_cached(self) -> Tensor:
        """The dequantized weight, recomputed only when a buffer changed (a runtime cache,
        not part of the state dict, so sizes count the packed form)."""
        key = tuple(b._version for b in self._buffers.values() if b is not None) + (self.qweight.data_ptr(),
                                                                                   self.qweight.device)
        if getattr(self, "_cache_key", None) != key:
            self._cache, self._cache_key = self.dequantized_weight(), key
        return self._cache

    def forward(self, x: Tensor) -> Tensor:
        W = self._weight_cached().to(x.dtype)  # (out, in)
        return F.linear(x, W, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        kind = f"int{self.bits}" if self.fmt == "int" else self.fmt
        return f"in={self.in_features}, out={self.out_features}, {kind}, group_size={self.group_size}, backend={self.backend}"


BACKENDS = ("reference", "int", "codebook", "lut")


def backend_class(backend: str) -> type[QuantLinear]:
    """The QuantLinear subclass of a backend name (the kernels compile on first use)."""
    if backend == "reference":
        return QuantLinear
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {list(BACKENDS)}")
    from ..kernels import modules  # the compiled kernels: imported only when a kernel backend is asked for

    return {"int": modules.IntLinear, "codebook": modules.IntLinear, "lut": modules.LUTLinear}[backend]
