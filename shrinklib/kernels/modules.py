"""nn.Modules that replace nn.Linear with a compiled low-bit format, and model-level swaps.

Packed weights are registered as buffers, so `model_size_bytes` counts their real size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arch
from ..units import MiB
from . import _lib, check_x, dequantize, lut_dequantize, sparse24_dense, w8a8_linear
from .pack import (CODEBOOKS, Packed24, PackedInt, PackedLUT, pack_codebook, pack_int, pack_lut,
                   pack_sparse24, quantize_int8_rows)

GEMV_MAX_ROWS = 8  # above this many rows of x, IntLinear (and Sparse24Linear) build the float weight and call the float GEMM
# Above this many rows LUTLinear dequantizes and calls the float GEMM. Measured (2 AVX2 cores, lut4,
# ms: LUT kernel / lut_dequantize + F.linear): 576x576 at 16 rows 0.104 / 0.109, 24 rows 0.152 / 0.132;
# 576x1536 (down) 16 rows 0.248 / 0.259, 32 rows 0.586 / 0.378; 1536x576 (up) 32 rows 0.352 / 0.414,
# 64 rows 0.73 / 0.665; at 512 rows the GEMM wins 3.5x on 576x576. lut2 crosses a few rows later.
LUT_GEMV_MAX_ROWS = 16
# A float weight larger than this is never materialized: the LUT kernel serves every batch. For
# SmolLM2's 49152x576 head (113 MB in float32) the LUT kernel wins at every batch measured: ms at
# 128 rows 64 (LUT) / 152 (dequantize + GEMM) / 100 (float32 F.linear), at 512 rows 299 / 394 / 364,
# the dequantization's page faults alone costing ~50 ms; and 4 bits are for saving memory.
DEQUANT_MAX_BYTES = 32 * MiB


def rtn_codes(W: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest codes of W (out, in) -> (q uint8, scales, zeros (out, G)); a stand-in quantizer."""
    N, K = W.shape
    G = -(-K // group_size)
    Wp = F.pad(W.float(), (0, G * group_size - K), value=float("nan")).reshape(N, G, group_size)
    lo = Wp.nan_to_num(float("inf")).amin(2).clamp(max=0)
    hi = Wp.nan_to_num(float("-inf")).amax(2).clamp(min=0)
    scales = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)  # (N, G)
    zeros = torch.round(-lo / scales)
    q = torch.round(W.float() / scales.repeat_interleave(group_size, 1)[:, :K] + zeros.repeat_interleave(group_size, 1)[:, :K])
    return q.clamp(0, 2**bits - 1).to(torch.uint8), scales, zeros


def codebook_codes(W: Tensor, codebook: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Nearest-codebook-entry codes after per-group absmax scaling (NF4/FP4) -> (q uint8, scales)."""
    N, K = W.shape
    G = -(-K // group_size)
    Wp = F.pad(W.float(), (0, G * group_size - K)).reshape(N, G, group_size)
    scales = Wp.abs().amax(2).clamp_min(1e-8)  # (N, G)
    q = (Wp / scales[..., None])[..., None].sub(codebook).abs().argmin(-1)
    return q.reshape(N, -1)[:, :K].to(torch.uint8), scales


class IntLinear(nn.Module):
    """Linear layer on a packed 2/3/4/8-bit (or NF4/FP4 codebook) weight: GEMV kernel for few rows, dequantize + GEMM for many."""

    def __init__(self, w: PackedInt, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = w.in_features, w.out_features, w.bits, w.group_size
        for name in ("packed", "scales", "szeros", "codebook"):
            self.register_buffer(name, getattr(w, name))
        self.register_buffer("bias", bias)

    @property
    def weight_format(self) -> PackedInt:
        return PackedInt(self.packed, self.scales, self.szeros, self.codebook, self.bits, self.group_size,
                         self.in_features, self.out_features)

    @classmethod
    def from_codes(cls, q, scales, zeros, bits, group_size, bias=None) -> "IntLinear":
        return cls(pack_int(q, scales, zeros, bits, group_size), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64, codebook: str | None = None) -> "IntLinear":
        W = linear.weight.detach().float()
        if codebook:
            q, s = codebook_codes(W, CODEBOOKS[codebook], group_size)
            return cls(pack_codebook(q, s, codebook, group_size), _bias(linear))
        return cls.from_codes(*rtn_codes(W, bits, group_size), bits, group_size, _bias(linear))

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers  # one dict instead of nn.Module's __getattr__ per buffer: decode calls this ~200 times a token
        if check_x(x, self.in_features).numel() > GEMV_MAX_ROWS * self.in_features:
            return F.linear(x, dequantize(self.weight_format), b["bias"])
        y = _lib.qmatmul(x, b["packed"], b["scales"], b["szeros"], b["codebook"], self.bits, self.group_size)
        return y if b["bias"] is None else y + b["bias"]

    def extra_repr(self) -> str:
        kind = "codebook" if self.codebook.numel() else f"int{self.bits}"
        return f"{self.in_features}, {self.out_features}, {kind}, group_size={self.group_size}"


class LUTLinear(nn.Module):
    """Linear layer on a 1-4-bit weight: T-MAC lookup-table kernel for few rows (or a huge weight), dequantize + GEMM for many."""

    def __init__(self, w: PackedLUT, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = w.in_features, w.out_features, w.bits, w.group_size
        for name in ("packed", "scales", "szeros"):
            self.register_buffer(name, getattr(w, name))
        self.register_buffer("bias", bias)

    @classmethod
    def from_codes(cls, q, scales, zeros, bits, group_size, bias=None) -> "LUTLinear":
        return cls(pack_lut(q, scales, zeros, bits, group_size), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 64) -> "LUTLinear":
        return cls.from_codes(*rtn_codes(linear.weight.detach().float(), bits, group_size), bits, group_size, _bias(linear))

    @property
    def weight_format(self) -> PackedLUT:
        return PackedLUT(self.packed, self.scales, self.szeros, self.bits, self.group_size, self.in_features, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers  # as in IntLinear.forward: few Python steps per call
        rows = check_x(x, self.in_features).numel() // self.in_features
        if rows > LUT_GEMV_MAX_ROWS and 4 * self.in_features * self.out_features <= DEQUANT_MAX_BYTES:
            return F.linear(x, lut_dequantize(self.weight_format), b["bias"])
        y = _lib.lut_gemv(x, b["packed"], b["scales"], b["szeros"], self.bits, self.group_size, self.out_features)
        return y if b["bias"] is None else y + b["bias"]

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, lut{self.bits}, group_size={self.group_size}"


class W8A8Linear(nn.Module):
    """SmoothQuant-style W8A8 layer: per-channel int8 weight, per-token int8 activations, int32 GEMM."""

    def __init__(self, wq: Tensor, w_scale: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = wq.shape[1], wq.shape[0]
        self.register_buffer("wq", wq.contiguous())
        self.register_buffer("w_scale", w_scale.float())
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "W8A8Linear":
        wq, s = quantize_int8_rows(linear.weight.detach().float())
        return cls(wq, s, _bias(linear))

    def forward(self, x: Tensor) -> Tensor:
        return w8a8_linear(x, self.wq, self.w_scale, self.bias)


class Sparse24Linear(nn.Module):
    """Linear layer on a 2:4 sparse weight (values plus 2-bit positions): GEMV kernel for few rows, densify + GEMM for many."""

    def __init__(self, w: Packed24, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = w.in_features, w.out_features
        self.register_buffer("values", w.values)
        self.register_buffer("index", w.index)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: Tensor | None = None) -> "Sparse24Linear":
        """From a pruned linear and its 2:4 mask (default: the nonzeros of the weight)."""
        return cls(pack_sparse24(linear.weight.detach().float(), mask), _bias(linear))

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers
        if check_x(x, self.in_features).numel() > GEMV_MAX_ROWS * self.in_features:  # crossover 8-16 rows, as IntLinear's
            return F.linear(x, sparse24_dense(Packed24(b["values"], b["index"], self.in_features, self.out_features)), b["bias"])
        y = _lib.sparse24_matmul(x, b["values"], b["index"])
        return y if b["bias"] is None else y + b["bias"]


def _bias(linear: nn.Linear) -> Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float().clone()


FORMATS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "int4": lambda l: IntLinear.from_linear(l, 4, 64),
    "int3": lambda l: IntLinear.from_linear(l, 3, 64),
    "int2": lambda l: IntLinear.from_linear(l, 2, 64),
    "int8": lambda l: IntLinear.from_linear(l, 8, 64),
    "nf4": lambda l: IntLinear.from_linear(l, 4, 64, codebook="nf4"),
    "fp4": lambda l: IntLinear.from_linear(l, 4, 64, codebook="fp4"),
    "lut4": lambda l: LUTLinear.from_linear(l, 4, 64),
    "lut2": lambda l: LUTLinear.from_linear(l, 2, 64),
    "w8a8": W8A8Linear.from_linear,
}  # RTN g64 stand-ins; pass your own `make` to use a real quantizer's codes


@torch.no_grad()
def replace_linears_(model: nn.Module, make: Callable[[nn.Linear], nn.Module] | str, lm_head: bool = False) -> nn.Module:
    """Swap every block linear of `model` (and optionally the output head) for `make(linear)`, in place.

    Args:
        model: a model `shrinklib.arch` supports.
        make: a format name of FORMATS or a function nn.Linear -> nn.Module (e.g. built from a
            quantizer's codes).
        lm_head: also replace `model.lm_head` (the input embedding stays float for lookups).
    """
    make = FORMATS[make] if isinstance(make, str) else make
    for block in arch.blocks(model):
        for path, linear in arch.linears(block).items():
            arch.set_module(block, path, make(linear))
    if lm_head and isinstance(getattr(model, "lm_head", None), nn.Linear):
        head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
        head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.lm_head = make(head)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    return model
