"""SmoothQuant (Xiao et al., 2023, https://arxiv.org/abs/2211.10438): move activation outliers
into the weights with s_j = max|X_j|^α / max|W_j|^(1-α) (Eq. 4), then quantize both weights
(per channel) and activations (per token, dynamic) to 8 bits: W8A8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .formats import quantize_activations_per_token, quantize_rtn


def smooth_scales(act_max: Tensor, weights: list[Tensor], alpha: float = 0.5) -> Tensor:
    """s_j = max|X_j|^α / max_k max|W_k[:, j]|^(1-α), (in,) (SmoothQuant Eq. 4)."""
    w_max = torch.stack([W.abs().amax(0) for W in weights]).amax(0)  # (in,)
    s = act_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


class W8A8Linear(nn.Module):
    """Simulated W8A8: int8 per-channel weight, int8 dynamic activations (per token or per tensor)."""

    def __init__(self, linear: nn.Linear, w_bits: int = 8, a_bits: int = 8, act_granularity: str = "per_token"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.a_bits, self.act_granularity = a_bits, act_granularity
        self.weight = nn.Parameter(quantize_rtn(linear.weight.data.float(), w_bits, None, symmetric=True).to(linear.weight.dtype),
                                   requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.act_granularity == "per_token":
            xq = quantize_activations_per_token(x, self.a_bits)
        else:  # one dynamic scale for the whole tensor
            xq = quantize_activations_per_token(x.reshape(1, -1), self.a_bits).reshape(x.shape)
        return F.linear(xq, self.weight, self.bias)
