"""Model soups: the uniform soup averages every fine-tune; the greedy soup adds fine-tunes in
order of their held-out score and keeps each only if the soup's score does not drop
(Wortsman et al., 2022, https://arxiv.org/abs/2203.05482, Recipe 1)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .lazy import merge_state_dicts

StateDict = dict[str, Tensor]


def uniform_soup(state_dicts: list[StateDict]) -> StateDict:
    """The mean of every floating tensor (other tensors from the first model)."""
    return merge_state_dicts("linear", state_dicts)


def greedy_soup(state_dicts: list[StateDict], score: Callable[[StateDict], float]) -> tuple[StateDict, list[int]]:
    """Greedy soup: returns the soup and the indices of the ingredients it kept.

    Args:
        state_dicts: the fine-tuned models (same architecture).
        score: held-out score of a state dict, higher is better.
    """
    order = sorted(range(len(state_dicts)), key=lambda i: score(state_dicts[i]), reverse=True)
    kept = [order[0]]
    best = score(state_dicts[order[0]])
    for i in order[1:]:
        trial = uniform_soup([state_dicts[j] for j in kept + [i]])
        s = score(trial)
        if s >= best:
            kept, best = kept + [i], s
    return uniform_soup([state_dicts[j] for j in kept]), kept
