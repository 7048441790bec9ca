"""The kernel backends of `shrinklib.quant.QuantLinear` ("int", "codebook", "lut") and of
`shrinklib.quant.W8A8Linear` ("int"), the 2:4 sparse layer, and model-level swaps.

Packed weights are registered as buffers, so `model_size_bytes` counts their real size. Eager
calls go through the kernels' direct bindings; a traced or compiled model (`torch.compile`,
`shrinklib.decode`) calls the same kernels as `torch.ops.shrink.*` operators.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import arch
from ..quant.formats import QTensor, expand_groups, grouped, nearest, quantize_weight, storage_grid
from ..quant.qlinear import QuantLinear
from ..quant.smoothquant import W8A8Linear
from ..units import MiB
from . import (check_x, dequantize, ext, lut_dequantize, lut_dequantize_into_scratch,
               sparse24_dense)
from .pack import (CODEBOOKS, Packed24, PackedInt, PackedLUT, lut_row_scales, pack_codebook, pack_int, pack_lut,
                   pack_sparse24, unpack_int, unpack_lut)

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


def native_bf16() -> bool:
    """Whether torch multiplies bfloat16 natively here (AVX-512 BF16 or AMX, and torch not forced down
    to AVX2 by ATEN_CPU_CAPABILITY); elsewhere bfloat16 GEMMs are emulated and slower than float32."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "NO AVX"):
        return False
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


# Many rows of x on a LUT layer (prefill): the GEMM in bfloat16 where the CPU has it natively, on
# the weight dequantized from the LUT layout. Measured (1 thread, 256 rows, 1536x576, Xeon with AMX):
# float32 GEMM 3.1 ms, bfloat16 0.61 ms (dequantization 0.33 ms). bfloat16 rounds activations to 8
# significant bits (0.2%), below the LUT decode path's own int8 table rounding (0.4%), so a LUT layer
# keeps its tolerance against the reference backend; the "int" backend, equal to the reference to
# float32 rounding, always stays in float32.
LUT_PREFILL_BF16 = native_bf16()


def keeps_weight(x: Tensor) -> bool:
    """Whether the float weight of a many-row call must be a tensor of its own rather than the reused
    buffer: in a traced graph (which allocates its own), or when autograd keeps it for x's gradient
    (the next layer would overwrite it before the backward pass)."""
    return torch.compiler.is_compiling() or needs_grad(x)


def needs_grad(x: Tensor) -> bool:
    """Whether autograd will ask for x's gradient (the kernels have none: the layer then runs F.linear
    on its float weight)."""
    return x.requires_grad and torch.is_grad_enabled()


def kernel(name: str):
    """The kernel `name`: its direct binding when eager, the torch operator while tracing or compiling."""
    return getattr(torch.ops.shrink, name) if torch.compiler.is_compiling() else getattr(ext(), name)


def rtn_codes(W: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest (q uint8, scales, zeros (out, G)) of W (out, in): `shrinklib.quant.quantize_weight`."""
    return quantize_weight(W, bits, group_size, symmetric=False)


def codebook_codes(W: Tensor, codebook: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Nearest-entry codes of a sorted 16-entry codebook after per-group absmax scaling -> (q uint8, scales (out, G))."""
    amax = grouped(W.float().abs(), group_size).amax(-1)  # (out, G)
    scales, _ = storage_grid(torch.where(amax > 0, amax / codebook.abs().max(), torch.ones_like(amax)), torch.zeros_like(amax))
    return nearest(W.float() / expand_groups(scales, group_size, W.shape[1]), codebook).to(torch.uint8), scales


class IntLinear(QuantLinear):
    """The "int" and "codebook" backends: a QTensor as bit planes for the packed-int kernel (2/3/4/8-bit
    integer grids, or 4-bit indices into a 16-entry table such as NF4/FP4) on the packed-int kernel,
    which serves every batch: a GEMV for up to 4 rows, tiles of the dequantized weight and the BLAS
    for more (float32 throughout, so equal to the reference backend to float32 rounding)."""

    backend = "int"

    def pack_(self, qt: QTensor) -> None:
        ext()  # the kernels build on first use
        if qt.fmt == "int":
            w = pack_int(qt.q, qt.scales, qt.zeros, qt.bits, qt.group_size)
        elif qt.fmt in CODEBOOKS:
            w = pack_codebook(qt.q, qt.scales, qt.fmt, qt.group_size)
        else:
            raise ValueError(f"the int kernel runs integer grids and the tables {sorted(CODEBOOKS)}, not {qt.fmt!r}")
        self.kernel_group = w.group_size  # a multiple of 32 (the row rounded up for one group per row)
        for name in ("packed", "scales", "szeros", "codebook"):
            self.register_buffer(name, getattr(w, name))

    @property
    def weight_format(self) -> PackedInt:
        return PackedInt(self.packed, self.scales, self.szeros, self.codebook, self.bits, self.kernel_group,
                         self.in_features, self.out_features)

    def qtensor(self) -> QTensor:
        s = self.scales.float()
        return QTensor(unpack_int(self.weight_format), s, self.szeros.float() / s, self.group_size, self.fmt, self.bits)

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.weight_format)

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers  # one dict instead of nn.Module's __getattr__ per buffer: decode calls this ~200 times a token
        if needs_grad(check_x(x, self.in_features)):  # the kernels have no backward: F.linear on the float weight
            return F.linear(x, dequantize(self.weight_format), b["bias"])
        # any number of rows: the kernel's GEMV for a few, tiles of the dequantized weight and the BLAS for more
        y = kernel("qmatmul")(x, b["packed"], b["scales"], b["szeros"], b["codebook"], self.bits, self.kernel_group)
        return y if b["bias"] is None else y + b["bias"]


class LUTLinear(QuantLinear):
    """The "lut" backend: a 1-4-bit QTensor as T-MAC bit-plane indices; the lookup-table kernel for few
    rows (or a huge weight), dequantize + GEMM for many."""

    backend = "lut"

    def pack_(self, qt: QTensor) -> None:
        ext()
        if qt.fmt != "int":
            raise ValueError(f"the LUT kernel runs integer grids of 1-4 bits, not {qt.fmt!r}")
        w = pack_lut(qt.q, qt.scales, qt.zeros, qt.bits, qt.group_size)
        self.kernel_group = w.group_size
        for name in ("packed", "scales", "szeros"):
            self.register_buffer(name, getattr(w, name))

    @property
    def weight_format(self) -> PackedLUT:
        return PackedLUT(self.packed, self.scales, self.szeros, self.bits, self.kernel_group, self.in_features,
                         self.out_features)

    def qtensor(self) -> QTensor:
        s, sz = (t.float() for t in lut_row_scales(self.weight_format))
        return QTensor(unpack_lut(self.weight_format), s, sz / s, self.group_size, self.fmt, self.bits)

    def dequantized_weight(self) -> Tensor:
        return lut_dequantize(self.weight_format)

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers  # as in IntLinear.forward: few Python steps per call
        rows = check_x(x, self.in_features).numel() // self.in_features
        if rows > LUT_GEMV_MAX_ROWS and 4 * self.in_features * self.out_features <= DEQUANT_MAX_BYTES:
            wf = self.weight_format  # (out, in) float32, in the reused buffer when eager
            W = lut_dequantize(wf) if keeps_weight(x) else lut_dequantize_into_scratch(wf)
            if LUT_PREFILL_BF16:
                bias = None if b["bias"] is None else b["bias"].bfloat16()
                return F.linear(x.bfloat16(), W.bfloat16(), bias).float()
            return F.linear(x, W, b["bias"])
        y = kernel("lut_gemv")(x, b["packed"], b["scales"], b["szeros"], self.bits, self.kernel_group, self.out_features)
        return y if b["bias"] is None else y + b["bias"]


class W8A8IntLinear(W8A8Linear):
    """The "int" backend of W8A8: the activation codes and the weight's int8 codes in an exact int32
    GEMM (AVX-512 VNNI where the CPU has it), then the scales; one kernel call per layer."""

    backend = "int"

    def prepare_(self) -> None:
        ext()  # the kernels build on first use
        self.register_buffer("wsum", self.wq.sum(1, dtype=torch.int32), persistent=False)  # for VNNI's unsigned operand

    def forward(self, x: Tensor) -> Tensor:
        b = self._buffers
        y = kernel("w8a8_linear")(check_x(x, self.in_features), b["wq"], b["wsum"], b["w_scale"], 2 ** (self.a_bits - 1) - 1,
                                  self.act_granularity == "per_token")
        return y if b["bias"] is None else y + b["bias"]


class Sparse24Linear(nn.Module):
    """Linear layer on a 2:4 sparse weight (values plus 2-bit positions): GEMV kernel for few rows, densify + GEMM for many."""

    def __init__(self, w: Packed24, bias: Tensor | None = None):
        super().__init__()
        ext()
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
        if needs_grad(check_x(x, self.in_features)):
            return F.linear(x, sparse24_dense(Packed24(b["values"], b["index"], self.in_features, self.out_features)), b["bias"])
        y = kernel("sparse24_matmul")(x, b["values"], b["index"])  # any number of rows: the kernel picks its path
        return y if b["bias"] is None else y + b["bias"]


def _bias(linear: nn.Linear) -> Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float().clone()


def rtn_layer(backend: str, bits: int, fmt: str = "int", group_size: int = 64) -> Callable[[nn.Linear], nn.Module]:
    """nn.Linear -> its asymmetric RTN QTensor (`shrinklib.quant.quantize`) on a kernel backend."""
    from ..quant import backend_class

    return lambda linear: backend_class(backend).from_linear(linear, bits, group_size, fmt)


FORMATS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "int4": rtn_layer("int", 4),
    "int3": rtn_layer("int", 3),
    "int2": rtn_layer("int", 2),
    "int8": rtn_layer("int", 8),
    "nf4": rtn_layer("codebook", 4, "nf4"),
    "fp4": rtn_layer("codebook", 4, "fp4"),
    "lut4": rtn_layer("lut", 4),
    "lut2": rtn_layer("lut", 2),
    "w8a8": W8A8IntLinear.from_linear,
}  # RTN g64; for GPTQ/AWQ weights quantize with `shrinklib.quant.quantize_(..., backend=...)`


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
