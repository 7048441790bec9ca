"""SmoothQuant (Xiao et al., 2023, https://arxiv.org/abs/2211.10438): move activation outliers
into the weights with s_j = max|X_j|^α / max|W_j|^(1-α) (Eq. 4), then quantize both weights
(per channel) and activations (per token, dynamic) to 8 bits: W8A8.

One W8A8 representation, two backends (as `QuantLinear` for weight-only formats):

    wq       int8 (out, in): the weight's codes on a symmetric per-channel grid, |wq| <= 2^(w_bits-1) - 1
    w_scale  float32 (out,), float16-exact: W = w_scale[:, None] * wq
    a_bits, act_granularity: activations x ≈ s_x · clamp(round(x / s_x), ±(2^(a_bits-1) - 1)),
             s_x = max(max|x|, 1e-8) / (2^(a_bits-1) - 1) per token (or over the whole tensor)

    "reference"  W8A8Linear: the activation codes times s_x, then float `F.linear` with W
    "int"        kernels.modules.W8A8IntLinear: the int32 GEMM of the codes (VNNI where the CPU
                 has it), times s_x · w_scale

Both round x to the same codes (the same float operations); they differ only in float32 summation
order, so their outputs agree to ~K·2⁻²⁴ of Σ|x̂||ŵ| per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import QTensor, quantize

ACT_GRANULARITIES = ("per_token", "per_tensor")


def smooth_scales(act_max: Tensor, weights: list[Tensor], alpha: float = 0.5) -> Tensor:
    """s_j = max|X_j|^α / max_k max|W_k[:, j]|^(1-α), (in,) (SmoothQuant Eq. 4)."""
    w_max = torch.stack([W.abs().amax(0) for W in weights]).amax(0)  # (in,)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


def quantize_activations(x: Tensor, bits: int = 8, per_token: bool = True) -> tuple[Tensor, Tensor]:
    """Dynamic symmetric codes (float, integer-valued, same shape as x) and scales s_x, (..., 1) per
    token or () for the whole tensor: x ≈ codes · s_x."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True) if per_token else x.abs().amax()
    s = amax.clamp_min(1e-8) / qmax
    return torch.clamp(torch.round(x / s), -qmax, qmax), s


class W8A8Linear(nn.Module):
    """W8A8 on the reference backend: int8 per-channel weight, dynamic int8 activations, float GEMM;
    the base class of the kernel backend."""

    backend = "reference"

    def __init__(self, qt: QTensor, bias: Tensor | None = None, a_bits: int = 8, act_granularity: str = "per_token"):
        super().__init__()
        if qt.fmt != "int" or qt.group_size != qt.q.shape[1] or qt.bits > 8:
            raise ValueError("W8A8 takes a per-channel integer grid of at most 8 bits (quantize(W, 'int', bits, None, symmetric=True))")
        z = 2.0 ** (qt.bits - 1)
        if not torch.equal(qt.zeros, torch.full_like(qt.zeros, z)):
            raise ValueError("W8A8 takes a symmetric grid (zeros 2^(bits-1))")
        if act_granularity not in ACT_GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {ACT_GRANULARITIES}, got {act_granularity!r}")
        self.out_features, self.in_features = qt.q.shape
        self.w_bits, self.a_bits, self.act_granularity = qt.bits, a_bits, act_granularity
        self.register_buffer("wq", (qt.q.to(torch.int16) - int(z)).to(torch.int8))
        self.register_buffer("w_scale", qt.scales[:, 0].float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.prepare_()

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_bits: int = 8, a_bits: int = 8, act_granularity: str = "per_token") -> W8A8Linear:
        """Symmetric per-channel RTN of an nn.Linear's weight, on this backend."""
        qt = quantize(linear.weight.detach().float(), "int", w_bits, None, symmetric=True)
        return cls(qt, linear.bias, a_bits, act_granularity)

    @classmethod
    def from_w8a8(cls, other: W8A8Linear) -> W8A8Linear:
        """The same layer on this backend (without loss)."""
        return cls(other.qtensor(), other.bias, other.a_bits, other.act_granularity)

    def prepare_(self) -> None:
        """Derive this backend's runtime data from the buffers (the reference: nothing)."""

    def qtensor(self) -> QTensor:
        """The weight as a QTensor (symmetric per-channel grid)."""
        z = 2 ** (self.w_bits - 1)
        q = (self.wq.to(torch.int16) + z).to(torch.uint8)
        return QTensor(q, self.w_scale[:, None].clone(), torch.full((self.out_features, 1), float(z)), self.in_features,
                       "int", self.w_bits)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight (out, in) W = w_scale · wq."""
        return self.wq.float() * self.w_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        codes, s = quantize_activations(x, self.a_bits, self.act_granularity == "per_token")
        return F.linear(codes * s, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w{self.w_bits}a{self.a_bits}, {self.act_granularity}, "
                f"backend={self.backend}")


W8A8_BACKENDS = ("reference", "int")


def w8a8_class(backend: str) -> type[W8A8Linear]:
    """The W8A8Linear subclass of a backend name (the kernels compile on first use)."""
    if backend == "reference":
        return W8A8Linear
    if backend != "int":
        raise ValueError(f"W8A8 layers run on the backends {list(W8A8_BACKENDS)}, not {backend!r}")
    from ..kernels.modules import W8A8IntLinear  # the compiled kernels: imported only when asked for

    return W8A8IntLinear
