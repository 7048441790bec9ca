"""Exercise checkers for notebook 06 (knowledge distillation)."""

from __future__ import annotations

import math

import torch

from ._check import check_function, not_attempted


def check_forward_kl(answer) -> None:
    """KL(p‖q) in nats for teacher p = (1/2, 1/2) and student q = (1/4, 3/4)."""
    if not_attempted(answer):
        return
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    if abs(float(answer) - expected) < 1e-3:
        print(f"Correct: KL(p‖q) = ½ ln 2 + ½ ln(2/3) = {expected:.4f} nats.")
        return
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    hint = " That is KL(q‖p), the reverse direction: weight by the teacher's p." if abs(float(answer) - reverse) < 1e-3 else ""
    raise AssertionError(f"{answer} is not KL(p‖q) = Σ p log(p/q) with natural logarithms.{hint}")


def check_temperature(answer) -> None:
    """Teacher probability of token 1 when its logits (ln 9, 0) are softened at temperature T = 2."""
    if not_attempted(answer):
        return
    if abs(float(answer) - 0.75) < 1e-3:
        print("Correct: logits / 2 = (ln 3, 0), softmax = (3/4, 1/4); T > 1 flattens 0.9 to 0.75.")
        return
    if abs(float(answer) - 0.9) < 1e-3:
        raise AssertionError("0.9 is the probability at T = 1; divide the logits by T = 2 first.")
    raise AssertionError(f"{answer}: compute softmax((ln 9)/2, 0) = (3, 1) / 4.")


def check_topk_memory(answer) -> None:
    """How many times less memory per token top-k KD (k = 32, fp32 values + int32 ids) needs than
    the full 49152-entry fp32 teacher distribution."""
    if not_attempted(answer):
        return
    expected = 49152 * 4 / (32 * (4 + 4))
    if abs(float(answer) - expected) < 0.5:
        print(f"Correct: {49152 * 4} bytes against {32 * 8} bytes per token, {expected:.0f}× less.")
        return
    raise AssertionError(f"{answer}: full = 49152 × 4 bytes; top-k = 32 × (4 bytes value + 4 bytes id).")


def check_kd_loss(fn) -> None:
    """Exercise 4 (code): `kd_loss(student_logits, teacher_logits, T)`, Hinton's T² · KL(p_T ‖ q_T) with
    p_T = softmax(teacher / T), q_T = softmax(student / T) over the last dimension, averaged over positions."""
    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    p1 = (0.75, 0.25)  # softmax(ln 3, 0)
    r3 = math.sqrt(3)
    p2 = (r3 / (1 + r3), 1 / (1 + r3))  # softmax((ln 3) / 2, 0)
    half = (0.5, 0.5)
    cases = [
        # teacher (3/4, 1/4), student uniform, T = 1: ¾ ln(3/2) + ¼ ln(1/2)
        ((torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), 1.0), kl(p1, half)),
        # T = 2 softens the teacher to (√3, 1) / (1 + √3) and multiplies the KL by T² = 4
        ((torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), 2.0), 4 * kl(p2, half)),
        # two positions: one identical pair (KL 0) and the first case, averaged; the direction matters
        ((torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 2.0], [math.log(3.0), 0.0]]), 1.0), kl(p1, half) / 2),
    ]
    check_function("kd_loss", fn, cases,
                   "p = softmax(teacher / T), log_q = log_softmax(student / T); "
                   "T**2 * (p * (log p - log_q)).sum(-1).mean()")
