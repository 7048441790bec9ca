"""`python -m shrinklib.kernels`: build (or load the cached build of) the kernels and say what runs."""

import torch

from . import build, simd_path, simd_paths

info = build(verbose=False)
print(f"shrink kernels {info['key']} ({'cached' if info['cached'] else 'built'} in {info['seconds']:.1f} s) at {info['folder']}")
print(f"CPU capability (torch): {torch.backends.cpu.get_cpu_capability()}; SIMD path: {simd_path()} (available: {', '.join(simd_paths())})")
