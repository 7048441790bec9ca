"""Compiled low-bit CPU kernels (packed int, T-MAC lookup tables, codebooks, W8A8, 2:4 sparse).

The C++ sources in `kernels/` are compiled on first import with torch.utils.cpp_extension and
cached under `cache_dir()/kernels/<key>`, the key hashing the torch version, the compiler
flags and the sources, so a stale build is never loaded. Every public function validates its
input in Python (clear `TypeError`/`ValueError`) before calling the kernel.

Each kernel picks its SIMD path (AVX-512/VNNI, AVX2, scalar) from the CPU at run time.
`SHRINKLIB_SIMD=avx2` (or `scalar`, `avx512-vnni`) forces a path for a whole run, and hides the
better ones from `simd_paths()`, so one machine runs as a CPU without them would (with
`ATEN_CPU_CAPABILITY` doing the same for torch's own kernels).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from ..models import cache_dir
from .pack import (  # noqa: F401  (re-exported)
    CODEBOOKS,
    FP4,
    NF4,
    Packed24,
    PackedInt,
    PackedLUT,
    pack_codebook,
    pack_int,
    pack_lut,
    pack_sparse24,
    quantize_int8_rows,
)

SOURCES = sorted((Path(__file__).resolve().parents[2] / "kernels").glob("*.cpp"))
CFLAGS = ["-O3", "-fopenmp"]  # SIMD through per-function target attributes; the C++ standard is torch's own
LDFLAGS = ["-fopenmp"]
SIMD_NAMES = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}
SIMD_ENV = "SHRINKLIB_SIMD"  # force one SIMD path for a whole run
INT_BITS = (2, 3, 4, 8)
LUT_BITS = (1, 2, 3, 4)


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def build_key() -> str:
    """Hash of the torch version, the compiler flags and the kernel sources."""
    h = hashlib.sha256(torch.__version__.encode())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    for src in SOURCES:
        h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()[:16]


def build(verbose: bool = False) -> dict:
    """Compile (or load the cached build of) the kernels; returns what was built, how long it took,
    and the extension module (its direct bindings of the per-token kernels)."""
    if not SOURCES:
        raise KernelBuildError(f"no C++ sources found in {Path(__file__).resolve().parents[2] / 'kernels'}")
    key = build_key()
    folder = cache_dir() / "kernels" / key
    folder.mkdir(parents=True, exist_ok=True)
    cached = any(folder.glob("*.so"))
    t0 = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        module = load(name=f"shrink_kernels_{key}", sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                      extra_ldflags=LDFLAGS, build_directory=str(folder), is_python_module=True, verbose=verbose)
    except Exception as e:  # compiler missing, compile error, ABI mismatch
        raise KernelBuildError(
            f"Building the shrink kernels from {[s.name for s in SOURCES]} in {folder} failed: {e}\n"
            "They need a C++20 compiler (g++ or clang++) and ninja; run `python -m shrinklib.kernels` "
            "to see the full compiler output."
        ) from e
    return {"key": key, "folder": str(folder), "cached": cached, "seconds": time.perf_counter() - t0, "module": module}


BUILD = build()
_ops = torch.ops.shrink  # every kernel, as torch operators
_lib = BUILD["module"]  # the per-token kernels bound directly (~2 us less per call than torch.ops)


def forced_simd_level(value: str | None, cpu_max: int) -> int:
    """The highest SIMD level a run may use: `cpu_max`, or the path named by `$SHRINKLIB_SIMD`.

    Raises:
        ValueError: an unknown path name, or a path this CPU cannot run.
    """
    if not value:
        return cpu_max
    names = {v: k for k, v in SIMD_NAMES.items()}
    if value not in names:
        raise ValueError(f"{SIMD_ENV}={value!r} is not a SIMD path; choose from {', '.join(reversed(SIMD_NAMES.values()))}")
    if names[value] > cpu_max:
        have = ", ".join(SIMD_NAMES[i] for i in range(cpu_max, -1, -1))
        raise ValueError(f"{SIMD_ENV}={value}: this CPU lacks it (it runs {have})")
    return names[value]


_max_level = forced_simd_level(os.environ.get(SIMD_ENV), _ops.simd_max_level())
_ops.set_simd_level(_max_level)


def simd_path() -> str:
    """The SIMD path the kernels use now: 'avx512-vnni', 'avx2' or 'scalar'."""
    return SIMD_NAMES[_ops.simd_level()]


def simd_paths() -> list[str]:
    """Every path this run can use, best first: those of the CPU, capped by `$SHRINKLIB_SIMD`."""
    return [SIMD_NAMES[i] for i in range(_max_level, -1, -1)]


@contextlib.contextmanager
def use_simd(path: str):
    """Force a SIMD path (e.g. 'scalar') inside a `with` block."""
    names = {v: k for k, v in SIMD_NAMES.items()}
    if path not in names or path not in simd_paths():
        forced = f" ({SIMD_ENV}={os.environ[SIMD_ENV]})" if os.environ.get(SIMD_ENV) else ""
        raise ValueError(f"SIMD path {path!r} is not available here{forced}; choose from {simd_paths()}")
    old = _ops.simd_level()
    _ops.set_simd_level(names[path])
    try:
        yield
    finally:
        _ops.set_simd_level(old)


def check_x(x: Tensor, in_features: int) -> Tensor:
    """x itself if it is a float32 (..., in) tensor on the CPU, else a clear error. Cheap (about a
    microsecond): a decoding model calls it for every linear of every token."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if not x.is_cpu:
        raise ValueError(f"the kernels run on the CPU: x is on {x.device}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., {in_features}), got {tuple(x.shape)}")
    return x


def int_matmul(x: Tensor, w: PackedInt) -> Tensor:
    """y = x Wᵀ for a packed integer or codebook weight (dequantize-in-registers GEMV/GEMM).

    Args:
        x: (..., in) float32.
        w: from `pack_int` or `pack_codebook`.
    """
    return _lib.qmatmul(check_x(x, w.in_features), w.packed, w.scales, w.szeros, w.codebook, w.bits, w.group_size)


def dequantize(w: PackedInt) -> Tensor:
    """The float32 (out, in) weight of a packed integer or codebook weight."""
    return _ops.qdequant(w.packed, w.scales, w.szeros, w.codebook, w.bits, w.group_size, w.in_features)


def lut_gemv(x: Tensor, w: PackedLUT) -> Tensor:
    """y = x Wᵀ by T-MAC table lookups (activation tables quantized to int8 per 64 inputs).

    Args:
        x: (..., in) float32; each row is a separate GEMV.
        w: from `pack_lut`.
    """
    return _lib.lut_gemv(check_x(x, w.in_features), w.packed, w.scales, w.szeros, w.bits, w.group_size, w.out_features)


def lut_dequantize(w: PackedLUT) -> Tensor:
    """The float32 (out, in) weight of a LUT-packed weight, W = s * q - s*z (for the float GEMM of prefill)."""
    return _ops.lut_dequant(w.packed, w.scales, w.szeros, w.bits, w.group_size, w.out_features, w.in_features)


def int8_gemm(xq: Tensor, wq: Tensor) -> Tensor:
    """Exact int32 C = xq wqᵀ of int8 (M, K) and int8 (N, K)."""
    for name, t in (("xq", xq), ("wq", wq)):
        if not isinstance(t, Tensor) or t.dtype != torch.int8:
            raise TypeError(f"{name} must be an int8 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2 or t.device.type != "cpu":
            raise ValueError(f"{name} must be 2-D on the CPU, got shape {tuple(t.shape)} on {t.device}")
    if xq.shape[1] != wq.shape[1]:
        raise ValueError(f"xq {tuple(xq.shape)} and wq {tuple(wq.shape)} disagree on K")
    return _ops.int8_gemm(xq.contiguous(), wq.contiguous())


def w8a8_linear(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """SmoothQuant-style W8A8: per-token int8 activations, per-channel int8 weights, int32 GEMM."""
    xq, x_scale = quantize_int8_rows(check_x(x, wq.shape[1]).reshape(-1, wq.shape[1]))
    y = int8_gemm(xq, wq).float() * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], wq.shape[0])


def sparse24_matmul(x: Tensor, w: Packed24) -> Tensor:
    """y = x Wᵀ for a 2:4 sparse weight stored as values plus 2-bit positions."""
    return _lib.sparse24_matmul(check_x(x, w.in_features), w.values, w.index)


def sparse24_dense(w: Packed24) -> Tensor:
    """The dense float32 (out, in) weight of a 2:4 sparse weight (for the float GEMM of prefill)."""
    return _ops.sparse24_dense(w.values, w.index, w.in_features)
