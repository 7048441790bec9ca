"""Distillation losses against hand-computed cases and invariants."""

import copy
import math

import pytest
import torch
from common import make_picollama, random_ids

from shrinklib.distill import (
    KDConfig, cache_teacher_topk, cross_entropy, forward_kl, generalized_jsd, hidden_projections,
    hidden_state_loss, kd_loss_fn, reverse_kl, sample_continuations, teacher_topk, topk_kd,
)
from shrinklib.train import TrainConfig, train

# teacher p = (3/4, 1/4), student q = (1/2, 1/2)
T_LOGITS = torch.tensor([[math.log(3.0), 0.0]])
S_LOGITS = torch.tensor([[0.0, 0.0]])
P, Q = (0.75, 0.25), (0.5, 0.5)


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_forward_kl_hand_computed():
    # 0.75 ln 1.5 + 0.25 ln 0.5
    assert forward_kl(S_LOGITS, T_LOGITS).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert forward_kl(S_LOGITS, T_LOGITS).item() == pytest.approx(0.130812, abs=1e-6)


def test_reverse_kl_hand_computed():
    assert reverse_kl(S_LOGITS, T_LOGITS).item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0), abs=1e-6)


def test_temperature_scales_logits_and_loss():
    # at T=2 the teacher logits (2 ln 3, 0) give p = (3/4, 1/4) again; the loss is T² times the KL
    t2 = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert forward_kl(S_LOGITS, t2, temperature=2.0).item() == pytest.approx(4 * kl(P, Q), abs=1e-6)


def test_jsd_hand_computed_and_bounded():
    m = tuple(0.5 * p + 0.5 * q for p, q in zip(P, Q))  # (0.625, 0.375)
    expected = 0.5 * kl(P, m) + 0.5 * kl(Q, m)
    assert generalized_jsd(S_LOGITS, T_LOGITS, beta=0.5).item() == pytest.approx(expected, abs=1e-6)
    m2 = tuple(0.2 * p + 0.8 * q for p, q in zip(P, Q))
    assert generalized_jsd(S_LOGITS, T_LOGITS, beta=0.2).item() == pytest.approx(0.2 * kl(P, m2) + 0.8 * kl(Q, m2), abs=1e-6)
    far = generalized_jsd(torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]]))
    assert far.item() == pytest.approx(math.log(2), abs=1e-4)  # disjoint supports: JSD = ln 2
    with pytest.raises(ValueError):
        generalized_jsd(S_LOGITS, T_LOGITS, beta=1.0)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd])
def test_identical_logits_give_zero(fn):
    x = torch.randn(3, 5, 11)
    assert fn(x, x.clone()).abs().item() < 1e-6
    assert fn(x, x.clone(), temperature=3.0).abs().item() < 1e-6


def test_forward_kl_gradient_is_q_minus_p():
    s = torch.randn(4, 7, requires_grad=True)
    t = torch.randn(4, 7)
    forward_kl(s, t).backward()
    expected = (s.softmax(-1) - t.softmax(-1)).detach() / 4  # mean over 4 positions
    torch.testing.assert_close(s.grad, expected, rtol=1e-5, atol=1e-6)


def test_mask_averages_selected_positions_only():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    expected = (forward_kl(s[0, 0], t[0, 0]) + forward_kl(s[1, 2], t[1, 2])) / 2
    torch.testing.assert_close(forward_kl(s, t, mask=mask), expected)


def test_topk_kd_hand_computed_and_full_k():
    s, t = torch.randn(3, 9), torch.randn(3, 9)
    torch.testing.assert_close(topk_kd(s, *teacher_topk(t, 9)), forward_kl(s, t), rtol=1e-5, atol=1e-6)
    # k = 1: the teacher is one-hot on its argmax, the loss is −log q(argmax)
    v, i = teacher_topk(t, 1)
    expected = -s.log_softmax(-1).gather(-1, i).mean()
    torch.testing.assert_close(topk_kd(s, v, i), expected)
    assert topk_kd(s, *teacher_topk(t, 3)).item() >= 0


def test_hidden_state_loss_hand_computed():
    proj = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(2))
    # ‖(1, 2) − (0, 0)‖² / 2 = 2.5 ; a 2 → 3 projection learns to map widths
    assert hidden_state_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), proj).item() == pytest.approx(2.5)
    wide = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        wide.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # W (1, 2) = (1, 2, 3) against (1, 2, 0): 9 / 3
    assert hidden_state_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0, 0.0]]), wide).item() == pytest.approx(3.0)


def test_cross_entropy_matches_torch():
    s, y = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    torch.testing.assert_close(cross_entropy(s, y), torch.nn.functional.cross_entropy(s.reshape(-1, 6), y.reshape(-1)))


def test_kd_config_validation():
    with pytest.raises(ValueError, match="divergence"):
        KDConfig(divergence="kl")
    with pytest.raises(ValueError):
        KDConfig(temperature=0)
    with pytest.raises(ValueError):
        KDConfig(top_k=5, divergence="reverse_kl")


@pytest.mark.parametrize("cfg", [KDConfig(), KDConfig(divergence="reverse_kl", temperature=2.0), KDConfig(divergence="jsd"),
                                 KDConfig(top_k=8), KDConfig(on_policy=1.0, prompt_len=4)])
def test_student_equal_to_teacher_has_zero_loss(cfg):
    teacher = make_picollama(seed=0)
    student = copy.deepcopy(teacher)
    ids = random_ids(2, 12)
    loss = kd_loss_fn(teacher, cfg)(student, {"input_ids": ids})
    assert loss.item() == pytest.approx(0.0, abs=1e-5) if cfg.top_k is None else loss.item() >= 0


def test_on_policy_samples_keep_the_prompt():
    student = make_picollama(seed=1)
    ids = random_ids(2, 10)
    torch.manual_seed(0)
    out = sample_continuations(student, ids, prompt_len=4)
    assert out.shape == ids.shape and torch.equal(out[:, :4], ids[:, :4])
    assert student.training is False


def test_cached_topk_batch_equals_live_topk():
    teacher, student = make_picollama(seed=0), make_picollama(seed=1)
    ids = random_ids(2, 12)
    vals, idx = cache_teacher_topk(teacher, ids, k=8)
    live = kd_loss_fn(teacher, KDConfig(top_k=8))(student, {"input_ids": ids})
    cached = kd_loss_fn(teacher, KDConfig(top_k=8))(student, {"input_ids": ids, "top_values": vals, "top_indices": idx})
    torch.testing.assert_close(live, cached)


def test_distillation_moves_student_toward_teacher():
    teacher = make_picollama(seed=0)
    student = make_picollama(seed=1, hidden=16, intermediate=32)
    layer_map = {0: 0, 1: 1}
    projs = hidden_projections(student, teacher, layer_map)
    loss_fn = kd_loss_fn(teacher, KDConfig(hidden_weight=0.1), projs, layer_map)
    ids = random_ids(4, 16)
    before = forward_kl(student(ids).logits, teacher(ids).logits).item()
    params = list(student.parameters()) + list(projs.parameters())
    train(student, lambda i: {"input_ids": ids}, loss_fn, TrainConfig(steps=15, lr=1e-2, progress=False), params=params)
    with torch.no_grad():
        after = forward_kl(student(ids).logits, teacher(ids).logits).item()
    assert after < 0.5 * before
