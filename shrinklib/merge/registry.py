"""The merge methods by name (mergekit's names where they exist), each with its paper."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .checks import check_finite, check_shapes, check_weights
from .linear import merge_linear
from .slerp import slerp
from .task_vectors import merge_task_vectors


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its per-tensor function, whether it needs a base model, its paper."""

    name: str
    fn: Callable[..., Tensor]  # fn(tensors, weights, densities, base, params, tensor_name) -> Tensor
    needs_base: bool
    paper: str
    url: str
    n_models: int | None = None  # exact number of models besides the base (None: any)


def _linear(tensors, weights, densities, base, params, name):
    return merge_linear(tensors, weights, normalize=params.get("normalize", True))


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the merge's seed and the tensor's name (masks differ across tensors)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def _task_vectors(sparsify: str | None, consensus: str | None):
    """A task-vector method as a choice of sparsification and consensus (`merge_task_vectors`)."""

    def fn(tensors, weights, densities, base, params, name):
        return merge_task_vectors(base, tensors, weights, densities, params.get("lambda", 1.0), sparsify, consensus,
                                  tensor_seed(params.get("seed", 0), name))

    return fn


def _slerp(tensors, weights, densities, base, params, name):
    # mergekit: t = 0 gives the base model, t = 1 the other one (`tensors` excludes the base)
    return slerp(params.get("t", 0.5), base, tensors[-1])


METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("linear", _linear, False, "Model soups (Wortsman et al., 2022)", "https://arxiv.org/abs/2203.05482"),
        MergeMethod("task_arithmetic", _task_vectors(None, None), True, "Task arithmetic (Ilharco et al., 2023)",
                    "https://arxiv.org/abs/2212.04089"),
        MergeMethod("ties", _task_vectors("magnitude", "sign"), True, "TIES-merging (Yadav et al., 2023)", "https://arxiv.org/abs/2306.01708"),
        MergeMethod("dare_linear", _task_vectors("random", None), True, "DARE (Yu et al., 2024)", "https://arxiv.org/abs/2311.03099"),
        MergeMethod("dare_ties", _task_vectors("random", "sign"), True, "DARE + TIES (Yu et al., 2024)", "https://arxiv.org/abs/2311.03099"),
        MergeMethod("slerp", _slerp, True, "SLERP (Shoemake, 1985)", "https://doi.org/10.1145/325165.325242", n_models=1),
    ]
}


def merge_tensor(method: str, tensors: list[Tensor], weights: list[float], densities: list[float],
                 base: Tensor | None, params: dict, name: str = "", labels: list[str] | None = None) -> Tensor:
    """Merge one tensor (the same name in every model) with a registered method.

    Args:
        method: a key of `METHODS`.
        tensors: the tensor of each model other than the base.
        weights, densities: one per model.
        base: the base model's tensor (None for methods without a base).
        params: method parameters (normalize, lambda, t, seed).
        name: the tensor's name (seeds DARE's masks).
        labels: how errors name the models (default "model 0", "model 1", ...).

    Raises:
        ValueError: unknown method, a weight or density list of another length than the models,
            tensors of different shapes (naming the tensor and both shapes), a non-finite result.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown merge method {method!r}; known: {sorted(METHODS)}")
    m = METHODS[method]
    if m.needs_base and base is None:
        raise ValueError(f"Merge method {method!r} needs a base model")
    if m.n_models is not None and len(tensors) != m.n_models:
        raise ValueError(f"Merge method {method!r} merges the base with exactly {m.n_models} model(s), got {len(tensors)}")
    weights = check_weights(weights, len(tensors), normalize=method == "linear" and params.get("normalize", True))
    densities = check_weights(densities, len(tensors), "densities")
    check_shapes(name, tensors, base, labels)
    return check_finite(name, m.fn(tensors, weights, densities, base, params, name))
