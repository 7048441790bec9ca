"""Quantization: number formats, RTN, GPTQ, AWQ and SmoothQuant behind one entry point.

    quantize_(model, GPTQConfig(bits=3, group_size=64), calib_ids)

Weight-only methods replace each linear of the decoder blocks with a `QuantLinear` holding
packed integer codes and per-group scales/zeros in the kernels' layout:

    q       uint8 (out, in), codes in [0, 2^bits - 1]
    scales  float32 (out, n_groups), n_groups = ceil(in / group_size) (a short last group is allowed)
    zeros   float32 (out, n_groups)
    W[o, i] = scales[o, i // g] * (q[o, i] - zeros[o, i // g])

Symmetric grids use zeros = 2^(bits-1) (codes 1 .. 2^bits - 1); asymmetric grids use a float
zero -min/scale. `quantize_weight(W, bits, group_size, symmetric)` returns (q, scales, zeros)
for a weight by RTN, `gptq_quantize(W, H, ...)` by GPTQ, and `QuantLinear.unpacked()` for a
layer already quantized: the kernels are built from these.
"""

from __future__ import annotations

import time

from torch import Tensor, nn

from ..checks import check_not_quantized
from .apply import awq_, gptq_, quant_layers, rtn_, smoothquant_
from .awq import awq_search_clip, awq_search_scale
from .checkpoint import load_quantized, save_quantized
from .config import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig
from .formats import (TABLES, QTensor, dequantize, dequantize_codes, int_params, quantize, quantize_codes,
                      quantize_rtn, quantize_weight)
from .gptq import gptq_quantize
from .qlinear import QuantLinear, pack_codes, unpack_codes
from .smoothquant import W8A8Linear, smooth_scales

# method -> (config class, paper URL)
METHODS = {
    "rtn": (RTNConfig, "https://arxiv.org/abs/2208.07339"),  # LLM.int8() discusses absmax/zero-point RTN
    "gptq": (GPTQConfig, "https://arxiv.org/abs/2210.17323"),
    "awq": (AWQConfig, "https://arxiv.org/abs/2306.00978"),
    "smoothquant": (SmoothQuantConfig, "https://arxiv.org/abs/2211.10438"),
}
Config = RTNConfig | GPTQConfig | AWQConfig | SmoothQuantConfig


def quantize_(model: nn.Module, config: Config, calib_ids: Tensor | None = None, pack: bool = True, device=None,
              progress: bool = True) -> float:
    """Quantize a model in place with the method its config names; returns the seconds it took.

    Args:
        config: an RTNConfig, GPTQConfig, AWQConfig or SmoothQuantConfig.
        calib_ids: (n, L) calibration token ids (GPTQ, AWQ, SmoothQuant).
        pack: store weight-only results as QuantLinear (packed codes) instead of float weights.
        device: compute device for layer-wise calibration (default: the model's).
    """
    t0 = time.perf_counter()
    check_not_quantized(model, f"quantize_ with {type(config).__name__}")
    if isinstance(config, RTNConfig):
        rtn_(model, config, pack, progress)
    elif isinstance(config, (GPTQConfig, AWQConfig)):
        if calib_ids is None:
            raise ValueError(f"{type(config).__name__} needs calib_ids, an (n, L) tensor of calibration token ids")
        (gptq_ if isinstance(config, GPTQConfig) else awq_)(model, calib_ids, config, pack, device, progress)
    elif isinstance(config, SmoothQuantConfig):
        smoothquant_(model, calib_ids, config, device, progress)
    else:
        raise TypeError(f"unknown config {type(config).__name__}; use one of {[c.__name__ for c, _ in METHODS.values()]}")
    return time.perf_counter() - t0


__all__ = [
    "AWQConfig", "GPTQConfig", "METHODS", "QTensor", "QuantLinear", "RTNConfig", "SmoothQuantConfig", "TABLES",
    "W8A8Linear", "awq_", "awq_search_clip", "awq_search_scale", "dequantize", "dequantize_codes", "gptq_",
    "gptq_quantize", "int_params", "load_quantized", "pack_codes", "quant_layers", "quantize", "quantize_",
    "quantize_codes", "quantize_rtn", "quantize_weight", "rtn_", "save_quantized", "smooth_scales",
    "smoothquant_", "unpack_codes",
]
