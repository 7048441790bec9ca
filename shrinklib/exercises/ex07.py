"""Exercise checkers for notebook 07 (Minitron: prune, then distill)."""

from __future__ import annotations

import torch

from ._check import check_function, not_attempted


def check_width_layer_params(answer) -> None:
    """Parameters of one width-pruned SmolLM2 block: hidden 360, MLP 1152, 9 query heads and 3 KV
    heads of 64 dimensions, two RMSNorms."""
    if not_attempted(answer):
        return
    attn = 2 * 360 * 9 * 64 + 2 * 360 * 3 * 64  # q, o and k, v
    mlp = 3 * 360 * 1152  # gate, up, down
    expected = attn + mlp + 2 * 360
    if int(answer) == expected:
        print(f"Correct: attention {attn:,} + MLP {mlp:,} + norms 720 = {expected:,} (the full block has 3,540,096).")
        return
    if int(answer) == attn + mlp:
        raise AssertionError("Almost: add the two RMSNorm weight vectors (360 each).")
    raise AssertionError(f"{answer}: count q/o (360 × 576 each), k/v (360 × 192 each), gate/up/down (360 × 1152 each), norms.")


def check_layers_to_drop(answer) -> None:
    """How many of SmolLM2's 30 blocks must a depth-pruned student drop to hold the width-pruned
    student's non-embedding parameter count (30 blocks of 1,797,840 + a 360 final norm)?"""
    if not_attempted(answer):
        return
    full_block = 3_540_096
    target = 30 * 1_797_840 + 360
    keep = round((target - 576) / full_block)
    if int(answer) == 30 - keep:
        print(f"Correct: {keep} full blocks hold {keep * full_block + 576:,} ≈ {target:,}; drop {30 - keep}.")
        return
    if int(answer) == keep:
        raise AssertionError(f"{answer} is the number of blocks to keep; the question asks how many to drop.")
    raise AssertionError(f"{answer}: divide the target by one full block's 3,540,096 parameters.")


def check_prune_first(answer) -> None:
    """Index of the MLP neuron Minitron prunes first, given its activations on two tokens
    a = [[1.0, -2.0, 0.1], [3.0, 0.0, -0.2]] (rows: tokens, columns: neurons)."""
    if not_attempted(answer):
        return
    if int(answer) == 2:
        print("Correct: mean |a| per neuron = (2.0, 1.0, 0.15); neuron 2 is least important.")
        return
    if int(answer) == 1:
        raise AssertionError("Neuron 1 has the smallest mean signed activation; importance uses magnitudes |a|.")
    raise AssertionError(f"{answer}: average |a| down each column and take the smallest.")


def check_keep_neurons(fn) -> None:
    """Exercise 4 (code): `keep_neurons(a, k)`, the k MLP neurons Minitron keeps given activations a
    (tokens, neurons): the largest mean |a| over tokens, returned in increasing index order."""
    cases = [
        # mean |a| = (2.0, 1.0, 0.15): keep neurons 0 and 1
        ((torch.tensor([[1.0, -2.0, 0.1], [3.0, 0.0, -0.2]]), 2), [0, 1]),
        # magnitudes, not signed values: mean |a| = (1, 0.5, 4, 5); the largest first is neuron 3, returned sorted
        ((torch.tensor([[1.0, 0.5, -4.0, 5.0], [-1.0, 0.5, -4.0, -5.0]]), 2), [2, 3]),
        # k = all: every index, in order
        ((torch.tensor([[0.3, -0.1, 0.2]]), 3), [0, 1, 2]),
    ]
    check_function("keep_neurons", fn, cases,
                   "score = a.abs().mean(0); keep = score.topk(k).indices; return keep.sort().values")
