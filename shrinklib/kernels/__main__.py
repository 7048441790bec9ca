"""`python -m shrinklib.kernels`: build (or load the cached build of) the kernels and say what runs."""

from . import BUILD, simd_path, simd_paths

import torch

print(f"shrink kernels {BUILD['key']} ({'cached' if BUILD['cached'] else 'built'} in {BUILD['seconds']:.1f} s) at {BUILD['folder']}")
print(f"CPU capability (torch): {torch.backends.cpu.get_cpu_capability()}; SIMD path: {simd_path()} (available: {', '.join(simd_paths())})")
