"""DARE: drop each task-vector entry with probability p and rescale the survivors by
1/(1 − p), then merge (Yu et al., 2024, "Language Models are Super Mario",
https://arxiv.org/abs/2311.03099): `merge_task_vectors(sparsify="random")`, with TIES' sign
consensus for `dare_ties`."""

from __future__ import annotations

from torch import Tensor

from .task_vectors import drop_and_rescale, merge_task_vectors  # noqa: F401 (drop_and_rescale re-exported)


def merge_dare(base: Tensor, tensors: list[Tensor], weights: list[float] | None = None, density: float = 0.5,
               scale: float = 1.0, seed: int = 0, sign_consensus: bool = False) -> Tensor:
    """DARE then task arithmetic (`dare_linear`), or then TIES' sign election and disjoint
    mean (`dare_ties`, with `sign_consensus=True`).

    Args:
        density: keep rate 1 − p of each task vector's entries.
        seed: seed of the drop masks (model i uses seed + i), drawn on the CPU so that a merge is
            the same on every device.
        sign_consensus: elect a sign and average the agreeing entries, as in TIES.
    """
    return merge_task_vectors(base, tensors, weights, density, scale, "random", "sign" if sign_consensus else None, seed)
