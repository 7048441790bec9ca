"""Compiled low-bit CPU kernels (packed int, T-MAC lookup tables, codebooks, W8A8, 2:4 sparse).

The C++ sources in `kernels/` (one file per kernel family, plus the SIMD dispatch and the operator
registrations) are compiled on first use, not on import: the first call of a kernel, of `ext()`
or `build()`, or `python -m shrinklib.kernels`. The build is cached under
`cache_dir()/kernels/<key>`, the key hashing the torch version, the compiler flags and the
sources, so a stale build is never loaded. Every public function validates its input in Python
(clear `TypeError`/`ValueError`) before calling the kernel.

Each kernel is a PyTorch custom operator, `torch.ops.shrink.*`, with a fake (meta)
implementation registered here, so a model on the kernels can be traced and compiled
(`torch.compile`); eager code calls the per-token kernels through direct bindings, which skip
about 2 us of dispatch per call.

Each kernel picks its SIMD path (AVX-512/VNNI, AVX2, scalar) from the CPU at run time.
`SHRINKLIB_SIMD=avx2` (or `scalar`, `avx512-vnni`) forces a path for a whole run, and hides the
better ones from `simd_paths()`, so one machine runs as a CPU without them would (with
`ATEN_CPU_CAPABILITY` doing the same for torch's own kernels).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from ..io import cache_dir
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

SOURCE_DIR = Path(__file__).resolve().parents[2] / "kernels"
SOURCES = sorted(SOURCE_DIR.glob("*.cpp"))  # compiled; the headers beside them enter the build key
CFLAGS = ["-O3", "-fopenmp"]  # SIMD through per-function target attributes; the C++ standard is torch's own
LDFLAGS = ["-fopenmp"]
SIMD_NAMES = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}
SIMD_ENV = "SHRINKLIB_SIMD"  # force one SIMD path for a whole run
INT_BITS = (2, 3, 4, 8)
LUT_BITS = (1, 2, 3, 4)


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded."""


def build_key() -> str:
    """Hash of the torch version, the compiler flags and the kernel sources (and headers)."""
    h = hashlib.sha256(torch.__version__.encode())
    h.update(" ".join(CFLAGS + LDFLAGS).encode())
    for src in sorted(SOURCES + sorted(SOURCE_DIR.glob("*.h"))):
        h.update(src.name.encode() + src.read_bytes())
    return h.hexdigest()[:16]


_BUILT: dict = {}


def build(verbose: bool = False) -> dict:
    """Compile (or load the cached build of) the kernels, once per process; returns what was built,
    how long it took, and the extension module (its direct bindings of the per-token kernels)."""
    if not _BUILT:
        _BUILT.update(_build(verbose))
    return _BUILT


def _build(verbose: bool) -> dict:
    if not SOURCES:
        raise KernelBuildError(f"no C++ sources found in {SOURCE_DIR}")
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
    _register_fakes()
    ops = torch.ops.shrink
    ops.set_simd_level(forced_simd_level(os.environ.get(SIMD_ENV), ops.simd_max_level()))
    return {"key": key, "folder": str(folder), "cached": cached, "seconds": time.perf_counter() - t0, "module": module}


def ext():
    """The extension module (built on first use): direct bindings of the per-token kernels."""
    return (_BUILT or build())["module"]


def ops():
    """`torch.ops.shrink`, every kernel as a torch operator (built on first use)."""
    build()
    return torch.ops.shrink


def __getattr__(name: str):
    if name == "BUILD":  # the build's description, building on first access
        return build()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _rows_like(x: Tensor, n: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], n))


def _register_fakes() -> None:
    """Fake implementations (output shape and dtype from the inputs alone) for tracing and compiling."""
    fakes = {
        "qmatmul": lambda x, packed, scales, szeros, codebook, bits, group_size: _rows_like(x, packed.shape[0]),
        "qdequant": lambda packed, scales, szeros, codebook, bits, group_size, in_features:
            packed.new_empty((packed.shape[0], in_features), dtype=torch.float32),
        "lut_gemv": lambda x, packed, scales, szeros, bits, group_size, out_features: _rows_like(x, out_features),
        "lut_dequant": lambda packed, scales, szeros, bits, group_size, out_features, in_features:
            packed.new_empty((out_features, in_features), dtype=torch.float32),
        "int8_gemm": lambda xq, wq: xq.new_empty((xq.shape[0], wq.shape[0]), dtype=torch.int32),
        "w8a8_linear": lambda x, wq, wsum, w_scale, a_qmax, per_token: _rows_like(x, wq.shape[0]),
        "sparse24_dense": lambda values, index, in_features: values.new_empty((values.shape[0], in_features)),
        "sparse24_matmul": lambda x, values, index: _rows_like(x, values.shape[0]),
    }
    for name, fn in fakes.items():
        torch.library.register_fake(f"shrink::{name}", fn)


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


def simd_path() -> str:
    """The SIMD path the kernels use now: 'avx512-vnni', 'avx2' or 'scalar'."""
    return SIMD_NAMES[ops().simd_level()]


def simd_paths() -> list[str]:
    """Every path this run can use, best first: those of the CPU, capped by `$SHRINKLIB_SIMD`."""
    top = forced_simd_level(os.environ.get(SIMD_ENV), ops().simd_max_level())
    return [SIMD_NAMES[i] for i in range(top, -1, -1)]


@contextlib.contextmanager
def use_simd(path: str):
    """Force a SIMD path (e.g. 'scalar') inside a `with` block."""
    names = {v: k for k, v in SIMD_NAMES.items()}
    if path not in names or path not in simd_paths():
        forced = f" ({SIMD_ENV}={os.environ[SIMD_ENV]})" if os.environ.get(SIMD_ENV) else ""
        raise ValueError(f"SIMD path {path!r} is not available here{forced}; choose from {simd_paths()}")
    old = ops().simd_level()
    ops().set_simd_level(names[path])
    try:
        yield
    finally:
        ops().set_simd_level(old)


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
    return ext().qmatmul(check_x(x, w.in_features), w.packed, w.scales, w.szeros, w.codebook, w.bits, w.group_size)


def dequantize(w: PackedInt) -> Tensor:
    """The float32 (out, in) weight of a packed integer or codebook weight."""
    return ops().qdequant(w.packed, w.scales, w.szeros, w.codebook, w.bits, w.group_size, w.in_features)


_SCRATCH = threading.local()


def scratch(rows: int, cols: int) -> Tensor:
    """A float32 (rows, cols) buffer reused across calls (one per thread, grown to the largest asked
    for): a fresh weight-sized tensor on every prefill call costs a page fault per 4 KiB (16,000
    for a 4096x4096 float32 weight). Its size is memory the model uses beside its own weights while
    it runs many rows. The next call overwrites it: use the result before that."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < rows * cols:
        _SCRATCH.buf = buf = torch.empty(rows * cols)
    return buf[: rows * cols].view(rows, cols)


def scratch_bytes() -> int:
    """Bytes held by this thread's reused dequantization buffer (0 before the first many-row call)."""
    buf = getattr(_SCRATCH, "buf", None)
    return 0 if buf is None else buf.numel() * 4


def lut_dequantize_into_scratch(w: PackedLUT) -> Tensor:
    """`lut_dequantize(w)` written into the reused buffer (eager only). Valid until the next call."""
    W = scratch(w.out_features, w.in_features)
    ext().lut_dequant_into(w.packed, w.scales, w.szeros, w.bits, w.group_size, w.out_features, w.in_features, W)
    return W


def lut_gemv(x: Tensor, w: PackedLUT) -> Tensor:
    """y = x Wᵀ by T-MAC table lookups (activation tables quantized to int8 per 64 inputs).

    Args:
        x: (..., in) float32; each row is a separate GEMV.
        w: from `pack_lut`.
    """
    return ext().lut_gemv(check_x(x, w.in_features), w.packed, w.scales, w.szeros, w.bits, w.group_size, w.out_features)


def lut_dequantize(w: PackedLUT) -> Tensor:
    """The float32 (out, in) weight of a LUT-packed weight, W = s * q - s*z (for the float GEMM of prefill)."""
    return ops().lut_dequant(w.packed, w.scales, w.szeros, w.bits, w.group_size, w.out_features, w.in_features)


def int8_gemm(xq: Tensor, wq: Tensor) -> Tensor:
    """Exact int32 C = xq wqᵀ of int8 (M, K) and int8 (N, K)."""
    for name, t in (("xq", xq), ("wq", wq)):
        if not isinstance(t, Tensor) or t.dtype != torch.int8:
            raise TypeError(f"{name} must be an int8 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 2 or t.device.type != "cpu":
            raise ValueError(f"{name} must be 2-D on the CPU, got shape {tuple(t.shape)} on {t.device}")
    if xq.shape[1] != wq.shape[1]:
        raise ValueError(f"xq {tuple(xq.shape)} and wq {tuple(wq.shape)} disagree on K")
    return ops().int8_gemm(xq.contiguous(), wq.contiguous())


def w8a8_linear(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Tensor | None = None, a_bits: int = 8,
                per_token: bool = True) -> Tensor:
    """W8A8 (SmoothQuant): dynamic symmetric int8 activations (per token, or one scale for all of x),
    per-channel int8 weights `wq` (out, in) with float32 scales `w_scale` (out,), exact int32 GEMM."""
    wsum = wq.sum(1, dtype=torch.int32)
    y = ext().w8a8_linear(check_x(x, wq.shape[1]), wq.contiguous(), wsum, w_scale.float().contiguous(),
                          2 ** (a_bits - 1) - 1, per_token)
    return y if bias is None else y + bias


def sparse24_matmul(x: Tensor, w: Packed24) -> Tensor:
    """y = x Wᵀ for a 2:4 sparse weight stored as values plus 2-bit positions."""
    return ext().sparse24_matmul(check_x(x, w.in_features), w.values, w.index)


def sparse24_dense(w: Packed24) -> Tensor:
    """The dense float32 (out, in) weight of a 2:4 sparse weight (for the float GEMM of prefill)."""
    return ops().sparse24_dense(w.values, w.index, w.in_features)
