"""Quantization: number formats, RTN, GPTQ, AWQ and SmoothQuant behind one entry point.

    quantize_(model, GPTQConfig(bits=3, group_size=64), calib_ids)

    quantize_(model, GPTQConfig(bits=4, group_size=64), calib_ids, backend="lut")

Every weight-only method produces one representation, `QTensor` (codes, float16-exact scales
and zeros, group size, format, bits; see `formats`), and replaces each linear of the decoder
blocks with a `QuantLinear` on a backend: "reference" (dequantize, then `F.linear`), "int"
(packed-int kernel), "codebook" (NF4/FP4 tables on the same kernel) or "lut" (T-MAC lookup
tables). `set_backend_(model, backend)` moves a quantized model between backends without loss:

    q       uint8 (out, in), codes in [0, 2^bits - 1]
    scales  (out, n_groups), n_groups = ceil(in / group_size) (a short last group is allowed)
    zeros   (out, n_groups)
    W[o, i] = scales[o, i // g] * (q[o, i] - zeros[o, i // g])
"""

from __future__ import annotations

import time

from torch import Tensor, nn

from ..checks import check_not_quantized
from .apply import awq_, gptq_, gptq_step, quant_layers, quantize_inputs_, rtn_, set_backend_, smoothquant_
from .awq import awq_search_clip, awq_search_scale
from .checkpoint import load_quantized, quantize_from_disk, save_quantized
from .autoround import autoround_, autoround_quantize
from .config import (AutoRoundConfig, AWQConfig, GPTAQConfig, GPTQConfig, HQQConfig, MXConfig, QATConfig, RotationConfig,
                     RTNConfig, SmoothQuantConfig)
from .formats import (TABLES, QTensor, dequantize, dequantize_codes, int_params, quantize, quantize_codes,
                      quantize_rtn, quantize_weight, storage_grid)
from .gptaq import gptaq_, gptaq_quantize
from .gptq import gptq_quantize, gptq_quantize_mx
from .hqq import hqq_, hqq_quantize
from .mx import mx_, quantize_mx
from .qat import FakeQuant, qat_
from .qlinear import BACKENDS, QuantLinear, backend_class, pack_codes, unpack_codes
from .rotation import hadamard, random_hadamard, rotate_
from .smoothquant import W8A8Linear, quantize_activations, smooth_scales, w8a8_class

# method -> (config class, paper URL)
METHODS = {
    "rtn": (RTNConfig, "https://arxiv.org/abs/2208.07339"),  # LLM.int8() discusses absmax/zero-point RTN
    "gptq": (GPTQConfig, "https://arxiv.org/abs/2210.17323"),
    "awq": (AWQConfig, "https://arxiv.org/abs/2306.00978"),
    "smoothquant": (SmoothQuantConfig, "https://arxiv.org/abs/2211.10438"),
    "mx": (MXConfig, "https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf"),
    "hqq": (HQQConfig, "https://mobiusml.github.io/hqq_blog/"),
    "gptaq": (GPTAQConfig, "https://arxiv.org/abs/2504.02692"),
    "autoround": (AutoRoundConfig, "https://arxiv.org/abs/2309.05516"),
    "qat": (QATConfig, "https://arxiv.org/abs/2305.17888"),
}
Config = RTNConfig | GPTQConfig | AWQConfig | SmoothQuantConfig | MXConfig | HQQConfig | GPTAQConfig | AutoRoundConfig | QATConfig


def reads_calibration(config: Config) -> bool:
    """Whether `quantize_` with this config reads calibration ids: every method but round to nearest
    (RTN, a microscaling format rounded to nearest) and HQQ."""
    if isinstance(config, MXConfig):
        return config.method == "gptq"
    return not isinstance(config, (RTNConfig, HQQConfig))


def quantize_(model: nn.Module, config: Config, calib_ids: Tensor | None = None, pack: bool = True, device=None,
              progress: bool = True, backend: str = "reference") -> float:
    """Quantize a model in place with the method its config names; returns the seconds it took.

    Args:
        config: an RTNConfig, GPTQConfig, AWQConfig, SmoothQuantConfig, MXConfig, HQQConfig, GPTAQConfig,
            AutoRoundConfig or QATConfig (QAT trains on the calibration windows).
        calib_ids: (n, L) calibration token ids (GPTQ, AWQ, SmoothQuant, MXConfig with method "gptq").
        pack: store weight-only results as QuantLinear (packed codes) instead of float weights.
        device: compute device for layer-wise calibration (default: the model's).
        backend: where the QuantLinear layers run: "reference", "int", "codebook" or "lut"
            (the kernels run on the CPU; calibration still runs on `device`); W8A8 layers run on
            "reference" or "int".
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {list(BACKENDS)}")
    t0 = time.perf_counter()
    check_not_quantized(model, f"quantize_ with {type(config).__name__}")
    # Calibration runs the already-quantized blocks on the reference backend, so the result does not
    # depend on where the layers run afterwards; they move to `backend` at the end.
    target = "reference" if pack else None
    if isinstance(config, RTNConfig):
        rtn_(model, config, target, progress)
    elif isinstance(config, (GPTQConfig, AWQConfig)) or (isinstance(config, MXConfig) and reads_calibration(config)):
        if calib_ids is None:
            raise ValueError(f"{type(config).__name__} needs calib_ids, an (n, L) tensor of calibration token ids")
        (awq_ if isinstance(config, AWQConfig) else gptq_)(model, calib_ids, config, target, device, progress)
    elif isinstance(config, SmoothQuantConfig):
        smoothquant_(model, calib_ids, config, device, progress)
    elif isinstance(config, (MXConfig, HQQConfig)):
        (mx_ if isinstance(config, MXConfig) else hqq_)(model, config, target, progress)
    elif isinstance(config, (GPTAQConfig, AutoRoundConfig, QATConfig)):
        if calib_ids is None:
            raise ValueError(f"{type(config).__name__} needs calib_ids, an (n, L) tensor of calibration token ids")
        fn = {GPTAQConfig: gptaq_, AutoRoundConfig: autoround_, QATConfig: qat_}[type(config)]
        fn(model, calib_ids, config, target, device, progress)
    else:
        raise TypeError(f"unknown config {type(config).__name__}; use one of {[c.__name__ for c, _ in METHODS.values()]}")
    if pack and backend != "reference":
        set_backend_(model, backend)
    return time.perf_counter() - t0


__all__ = [
    "AutoRoundConfig", "FakeQuant", "GPTAQConfig", "HQQConfig", "MXConfig", "QATConfig", "qat_", "autoround_", "autoround_quantize", "gptaq_",
    "gptaq_quantize", "hqq_", "hqq_quantize", "mx_", "quantize_mx",
    "AWQConfig", "BACKENDS", "GPTQConfig", "METHODS", "QTensor", "QuantLinear", "RTNConfig", "SmoothQuantConfig", "TABLES",
    "W8A8Linear", "awq_", "awq_search_clip", "awq_search_scale", "backend_class", "dequantize", "dequantize_codes", "gptq_",
    "gptq_quantize", "gptq_quantize_mx", "gptq_step", "int_params", "load_quantized", "pack_codes", "quant_layers", "quantize", "quantize_", "reads_calibration",
    "quantize_codes", "quantize_from_disk", "quantize_rtn", "quantize_weight", "storage_grid", "rtn_", "save_quantized", "set_backend_", "smooth_scales",
    "smoothquant_", "unpack_codes", "quantize_activations", "w8a8_class",
    "RotationConfig", "hadamard", "quantize_inputs_", "random_hadamard", "rotate_",
]
