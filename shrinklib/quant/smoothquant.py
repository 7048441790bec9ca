"""SmoothQuant (Xiao et al., 2023, https://arxiv.org/abs/2211.10438): move activation outliers
into the weights with s_j = max|X_j|^α / max|W_j|^(1-α) (Eq. 4), then quantize both weights
(per channel) and activations (per token, dynamic) to 8 bits: W8A8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import QTensor, quantize, quantize_activations_per_token


def smooth_scales(act_max: Tensor, weights: list[Tensor], alpha: float = 0.5) -> Tensor:
    """s_j = max|X_j|^α / max_k max|W_k[:, j]|^(1-α), (in,) (SmoothQuant Eq. 4)."""
    w_max = torch.stack([W.abs().amax(0) for W in weights]).amax(0)  # (in,)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


class W8A8Linear(nn.Module):
    """W8A8: a per-channel symmetric integer weight (the one representation, `quantize(W, "int",
    w_bits, None, symmetric=True)`, stored as signed codes and a scale per row) and activations
    quantized dynamically to `a_bits` (per token or per tensor) at every call.

    Backends, as for `QuantLinear` (`shrinklib.quant.set_backend_` moves between them):
        "reference"  simulated: the activations rounded to their grid, then `F.linear` on the
                     dequantized weight (any w_bits, a_bits 2..8, per token or per tensor)
        "int"        the compiled W8A8 kernel (`shrinklib.kernels.w8a8_linear`): int8 activations
                     per token, int32 dot products (a_bits = 8 and per-token activations only)
    """

    def __init__(self, qt: QTensor, bias: Tensor | None = None, a_bits: int = 8, act_granularity: str = "per_token",
                 backend: str = "reference"):
        super().__init__()
        if qt.fmt != "int" or qt.scales.shape[1] != 1 or not torch.all(qt.zeros == 2.0 ** (qt.bits - 1)):
            raise ValueError("W8A8Linear takes a per-channel symmetric integer grid (quantize(W, 'int', bits, None, "
                             "symmetric=True))")
        self.out_features, self.in_features = qt.q.shape
        self.bits, self.a_bits, self.act_granularity = qt.bits, a_bits, act_granularity
        self.register_buffer("wq", (qt.q.to(torch.int16) - 2 ** (qt.bits - 1)).to(torch.int8))  # |code| ≤ 2^(bits-1)-1
        self.register_buffer("w_scale", qt.scales[:, 0].float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.set_backend(backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_bits: int = 8, a_bits: int = 8, act_granularity: str = "per_token",
                    backend: str = "reference") -> W8A8Linear:
        qt = quantize(linear.weight.detach().float(), "int", w_bits, None, symmetric=True)
        return cls(qt, linear.bias, a_bits, act_granularity, backend)

    def set_backend(self, backend: str) -> None:
        if backend not in W8A8_BACKENDS:
            raise ValueError(f"W8A8Linear has the backends {list(W8A8_BACKENDS)}, got {backend!r}")
        if backend == "int" and (self.a_bits != 8 or self.act_granularity != "per_token"):
            raise ValueError(f"the int W8A8 kernel quantizes activations to 8 bits per token; this layer quantizes them to "
                             f"{self.a_bits} bits {self.act_granularity.replace('_', ' ')}: use the reference backend")
        self.backend = backend

    def qtensor(self) -> QTensor:
        """The weight's representation (exactly the quantizer's output)."""
        z = 2.0 ** (self.bits - 1)
        ones = torch.ones_like(self.w_scale)[:, None]
        return QTensor((self.wq.to(torch.int16) + int(z)).to(torch.uint8), self.w_scale[:, None].clone(), z * ones,
                       self.in_features, "int", self.bits)

    def dequantized_weight(self) -> Tensor:
        """The float32 weight (out, in) this layer applies: s · (signed code)."""
        return self.w_scale[:, None] * self.wq.float()

    def _weight_cached(self) -> Tensor:
        """The dequantized weight, recomputed only when a buffer changed (a runtime cache, not part
        of the state dict, so sizes count the int8 codes)."""
        key = (self.wq._version, self.w_scale._version, self.wq.data_ptr(), self.wq.device)
        if getattr(self, "_cache_key", None) != key:
            self._cache, self._cache_key = self.dequantized_weight(), key
        return self._cache

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "int":
            from ..kernels import w8a8_linear

            return w8a8_linear(x, self.wq, self.w_scale, self.bias).to(x.dtype)
        if self.act_granularity == "per_token":
            xq = quantize_activations_per_token(x, self.a_bits)
        else:  # one dynamic scale for the whole tensor
            xq = quantize_activations_per_token(x.reshape(1, -1), self.a_bits).reshape(x.shape)
        return F.linear(xq, self._weight_cached().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, w{self.bits}a{self.a_bits} "
                f"({self.act_granularity.replace('_', ' ')} activations), backend={self.backend}")


W8A8_BACKENDS = ("reference", "int")
