"""Linear mode connectivity: the loss along the straight path θ(α) = (1 − α)θ_A + αθ_B
(Frankle et al., 2020, https://arxiv.org/abs/1912.05671; for fine-tunes of one pretrained
model, Neyshabur et al., 2020, https://arxiv.org/abs/2008.11687)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]


def interpolate_state_dicts(a: StateDict, b: StateDict, alpha: float) -> StateDict:
    """(1 − α)·a + α·b for floating tensors (others from a)."""
    return {k: torch.lerp(v.float(), b[k].float(), alpha).to(v.dtype) if v.is_floating_point() else v
            for k, v in a.items()}


@torch.no_grad()
def loss_along_path(model: nn.Module, a: StateDict, b: StateDict, loss_fn: Callable[[nn.Module], float],
                    alphas: Sequence[float]) -> list[float]:
    """The loss of `model` loaded with θ(α) for each α (the model's own weights are restored).

    Args:
        model: a module of the right architecture, used as the container.
        a, b: the two endpoints' state dicts.
        loss_fn: loss of the model as it is (e.g. mean cross-entropy on held-out batches).
        alphas: the points of the path, 0 is a and 1 is b.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        losses = []
        for alpha in alphas:
            model.load_state_dict(interpolate_state_dicts(a, b, float(alpha)), strict=False)
            losses.append(float(loss_fn(model)))
        return losses
    finally:
        model.load_state_dict(saved)


def loss_barrier(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """max_α [L(θ(α)) − ((1 − α)L(θ_A) + αL(θ_B))]: the bump above the straight line between the ends."""
    l0, l1 = losses[0], losses[-1]
    return max(loss - ((1 - a) * l0 + a * l1) for a, loss in zip(alphas, losses))
