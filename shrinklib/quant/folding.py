"""Folding a per-input-channel scale into the operation before a group of linears.

AWQ and SmoothQuant multiply a linear's weight columns by s and divide its input by s; the
division is folded into what produces the input (a norm's weight and bias, or the rows of a
preceding linear), so the float model computes the same function.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..arch import get_path, layout

def role_groups(roles: dict[str, str], block: nn.Module) -> dict[str, dict[str, nn.Linear]]:
    """The linears of a block grouped by role (linears in one group share their input).

    Args:
        roles: path -> role, from `shrinklib.arch.layout(model).roles()`.
    """
    groups: dict[str, dict[str, nn.Linear]] = {}
    for path, role in roles.items():
        try:
            groups.setdefault(role, {})[path] = get_path(block, path)
        except AttributeError:
            continue
    return groups


def foldable(model: nn.Module) -> dict[str, str]:
    """Role -> path of the preceding operation, for the roles whose input scale can be folded."""
    lay = layout(model).require("fold", "folding a per-channel scale (AWQ, SmoothQuant)")
    if lay.model_type == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        raise ValueError("OPT with post-layer-norm (do_layer_norm_before=False, e.g. OPT-350M) has no norm "
                         "before its linears to fold a scale into")
    return lay.prev()


@torch.no_grad()
def fold_scale_(prev: nn.Module, linears: list[nn.Linear], s: Tensor, rows: slice | None = None,
                offset: float = 0.0) -> None:
    """Divide prev's output channel j by s[j] and multiply the linears' input column j by s[j].

    Args:
        rows: the rows of a fused prev linear that produce the input (`Layout.prev_rows`), else all.
        offset: a norm computing x̂·(offset + w) (Gemma: 1, `Layout.norm_offset`).
    """
    s = s.to(next(prev.parameters()).device)
    rows = rows or slice(None)
    if isinstance(prev, nn.Linear):
        prev.weight[rows].div_(s[:, None])  # (out, in): rows
    else:
        prev.weight.copy_((prev.weight + offset) / s - offset)
    if getattr(prev, "bias", None) is not None:
        prev.bias[rows].div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])  # (out, in): columns
