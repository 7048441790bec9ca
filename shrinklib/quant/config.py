"""Typed configurations of the quantization methods, validated when built."""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_fields
from .formats import MX_FORMATS, TABLES


def _check_weight_grid(name: str, bits: int, group_size, fmt: str = "int", per_tensor: bool = True) -> None:
    """Check a weight grid's fields; `per_tensor=False` for methods that fit a grid per group or row only."""
    if fmt != "int" and fmt not in TABLES:
        raise ValueError(f"{name}: unknown fmt {fmt!r}; use 'int' or one of {sorted(TABLES)}")
    if fmt == "int" and not (isinstance(bits, int) and 2 <= bits <= 8):
        raise ValueError(f"{name}: bits must be an int in 2..8, got {bits!r}")
    if not (group_size is None or group_size == "tensor" or (isinstance(group_size, int) and group_size > 0)):
        raise ValueError(f"{name}: group_size must be a positive int, None (per channel) or 'tensor', got {group_size!r}")
    if not per_tensor and group_size == "tensor":
        raise ValueError(f"{name}: per-tensor grids are not supported; use an int group_size or None")


@dataclass(frozen=True)
class RTNConfig:
    """Round to nearest, weight only."""

    bits: int = 4
    group_size: int | str | None = 64  # columns per group; None: per channel; "tensor": per tensor
    symmetric: bool = False
    fmt: str = "int"  # "int", "nf4", "fp4", "fp8_e4m3", "fp8_e5m2"

    def __post_init__(self):
        check_fields(self)
        _check_weight_grid("RTNConfig", self.bits, self.group_size, self.fmt)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ, weight only (Frantar et al. 2023)."""

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # lazy batch size B
    act_order: bool = False

    def __post_init__(self):
        check_fields(self)
        _check_weight_grid("GPTQConfig", self.bits, self.group_size, per_tensor=False)
        if not 0 <= self.damp < 1:
            raise ValueError(f"GPTQConfig: damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"GPTQConfig: block_size must be positive, got {self.block_size}")


@dataclass(frozen=True)
class AWQConfig:
    """AWQ, weight only (Lin et al. 2024)."""

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    n_grid: int = 20  # α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}
    clip: bool = True  # search a clipping ratio per group
    max_tokens: int = 512  # calibration tokens used by the searches

    def __post_init__(self):
        check_fields(self)
        _check_weight_grid("AWQConfig", self.bits, self.group_size, per_tensor=False)
        if self.n_grid < 1 or self.max_tokens < 1:
            raise ValueError(f"AWQConfig: n_grid and max_tokens must be ≥ 1, got {self.n_grid}, {self.max_tokens}")


@dataclass(frozen=True)
class SmoothQuantConfig:
    """W8A8 with (smooth=True) or without (naive) SmoothQuant's migration (Xiao et al. 2023)."""

    alpha: float = 0.5  # migration strength
    smooth: bool = True
    w_bits: int = 8
    a_bits: int = 8
    act_granularity: str = "per_token"  # dynamic activation scales: "per_token" or "per_tensor"

    def __post_init__(self):
        check_fields(self)
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"SmoothQuantConfig: alpha must be in [0, 1], got {self.alpha}")
        for name in ("w_bits", "a_bits"):
            if not 2 <= getattr(self, name) <= 8:
                raise ValueError(f"SmoothQuantConfig: {name} must be in 2..8, got {getattr(self, name)}")
        if self.act_granularity not in ("per_token", "per_tensor"):
            raise ValueError(f"SmoothQuantConfig: act_granularity must be 'per_token' or 'per_tensor', got {self.act_granularity!r}")


@dataclass(frozen=True)
class RotationConfig:
    """QuaRot's rotation folded into a float model (Ashkboos et al. 2024): a seeded randomized
    Hadamard of the residual stream, optionally each head's values and an online Hadamard before
    every down projection."""

    seed: int = 0  # signs of the randomized Hadamard H·diag(±1)/√d
    heads: bool = True  # a Hadamard of the head dimension folded into v_proj rows and o_proj columns
    online: bool = True  # an online Hadamard on the input of every down projection

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class MXConfig:
    """Microscaling formats: MXFP4, MXFP8 (OCP MX v1.0, 2023) and NVFP4 (NVIDIA, 2025), rounded to
    nearest or with GPTQ's column loop on the format's grid (calibrated)."""

    fmt: str = "mxfp4"  # "mxfp4", "mxfp8" or "nvfp4"
    block_size: int | None = None  # elements per scale; None: the format's own (32, 32, 16)
    method: str = "rtn"  # "rtn" (no data) or "gptq" (needs calibration ids)
    damp: float = 0.01  # GPTQ only: fraction of mean(diag H) added to the diagonal

    def __post_init__(self):
        check_fields(self)
        if self.fmt not in MX_FORMATS:
            raise ValueError(f"MXConfig: unknown fmt {self.fmt!r}; use one of {list(MX_FORMATS)}")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"MXConfig: block_size must be positive or None, got {self.block_size}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"MXConfig: method must be 'rtn' or 'gptq', got {self.method!r}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"MXConfig: damp must be in [0, 1), got {self.damp}")


@dataclass(frozen=True)
class HQQConfig:
    """HQQ, calibration-free half-quadratic zero-point search (Badri & Shaji 2023)."""

    bits: int = 4
    group_size: int | None = 64
    p: float = 0.7  # the l_p norm of the weight error (p < 1 promotes sparse errors)
    beta: float = 10.0  # initial penalty β
    kappa: float = 1.01  # β ← κβ each iteration
    iters: int = 20

    def __post_init__(self):
        check_fields(self)
        _check_weight_grid("HQQConfig", self.bits, self.group_size, per_tensor=False)
        if not 0 < self.p <= 2 or self.beta <= 0 or self.kappa < 1 or self.iters < 0:
            raise ValueError(f"HQQConfig: need 0 < p ≤ 2, beta > 0, kappa ≥ 1, iters ≥ 0; got {self.p}, {self.beta}, "
                             f"{self.kappa}, {self.iters}")


@dataclass(frozen=True)
class GPTAQConfig:
    """GPTAQ: GPTQ with asymmetric calibration against the float model's inputs (Li et al. 2025)."""

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    damp: float = 0.01
    block_size: int = 128
    alpha: float = 0.25  # weight of the asymmetry term (the authors' default; 1 = exact least squares)

    def __post_init__(self):
        check_fields(self)
        GPTQConfig(self.bits, self.group_size, self.symmetric, self.damp, self.block_size)  # the same checks
        if self.alpha < 0:
            raise ValueError(f"GPTAQConfig: alpha must be ≥ 0, got {self.alpha}")


@dataclass(frozen=True)
class AutoRoundConfig:
    """AutoRound-style learned rounding and clipping by signed gradient descent (Cheng et al. 2023)."""

    bits: int = 3
    group_size: int | None = 64
    steps: int = 50  # sign-SGD steps per linear
    lr: float | None = None  # None: 1 / steps, decayed linearly
    max_tokens: int = 512  # calibration tokens per linear

    def __post_init__(self):
        check_fields(self)
        _check_weight_grid("AutoRoundConfig", self.bits, self.group_size, per_tensor=False)
        if self.steps < 0 or self.max_tokens < 1 or (self.lr is not None and self.lr <= 0):
            raise ValueError(f"AutoRoundConfig: need steps ≥ 0, max_tokens ≥ 1, lr > 0; got {self.steps}, "
                             f"{self.max_tokens}, {self.lr}")


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware training with a straight-through estimator, then RTN (weight only)."""

    bits: int = 2
    group_size: int | None = 64
    symmetric: bool = False
    steps: int = 20  # optimizer steps on the calibration windows (0: plain RTN)
    lr: float = 1e-5  # peak learning rate (AdamW, cosine decay)
    batch_size: int = 4  # calibration sequences per step
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        _check_weight_grid("QATConfig", self.bits, self.group_size, per_tensor=False)
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"QATConfig: need steps ≥ 0, lr > 0, batch_size ≥ 1; got {self.steps}, {self.lr}, "
                             f"{self.batch_size}")
