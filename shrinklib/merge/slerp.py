"""SLERP: spherical linear interpolation between two models, tensor by tensor (Shoemake,
1985, https://doi.org/10.1145/325165.325242; popular for LLM merges through mergekit)."""

from __future__ import annotations

import torch
from torch import Tensor


def slerp(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1, with cos Ω = ⟨v0, v1⟩/(‖v0‖‖v1‖); a plain
    lerp where the two are (nearly) colinear.

    Args:
        t: interpolation factor, 0 gives v0 and 1 gives v1.
        v0, v1: the same tensor of the two models.
    """
    a, b = v0.float().flatten(), v1.float().flatten()  # (n,)
    cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(eps)
    if cos.abs() > 1 - 1e-6:  # colinear: the sphere's arc degenerates to the segment
        out = (1 - t) * a + t * b
    else:
        omega = torch.arccos(cos.clamp(-1, 1))
        out = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    return out.view_as(v0).to(v0.dtype)
