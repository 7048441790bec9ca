"""Reward models: the Bradley-Terry loss, the preference task's exact noise rate, rewards read
at the last real token, and the clean-accuracy / memorization metrics."""

import math

import pytest
import torch
from common import make_picollama

from shrinklib.reward import (
    LastMLPRewardModel, PreferencePair, RewardModel, bradley_terry_loss, clean_accuracy, last_mlp_features,
    make_preferences, memorization, preference_batch, preference_batches, preference_loss, reward_margins,
    wrong_answer,
)
from shrinklib.tasks import make_examples


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from shrinklib.models import resolve_model_path

    t = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    t.pad_token = t.pad_token or t.eos_token
    return t


def test_bradley_terry_loss_hand_values():
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    # −log σ(2) and −log σ(−1), averaged
    want = (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2
    assert bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("task", ["addition", "sorting", "reversal", "copying"])
def test_preferences_exact_noise_and_ground_truth(task):
    pairs = make_preferences(task, 40, noise=0.25, seed=0)
    truth = {e.question: e.answer for e in make_examples(task, 40, 0)}
    assert sum(p.flipped for p in pairs) == 10
    for p in pairs:
        right, wrong = (p.rejected, p.chosen) if p.flipped else (p.chosen, p.rejected)
        assert right == truth[p.prompt] and wrong != right
    assert pairs == make_preferences(task, 40, noise=0.25, seed=0)
    with pytest.raises(ValueError, match="noise"):
        make_preferences(task, 4, noise=1.0)


def test_wrong_answer_differs():
    import random

    rng = random.Random(0)
    for e in make_examples("sorting", 20, 3) + make_examples("addition", 20, 3):
        assert wrong_answer(e, rng) != e.answer


def test_metrics_hand_case():
    pairs = [PreferencePair("q", "a", "b"), PreferencePair("q", "b", "a", True), PreferencePair("q", "c", "d", True)]
    margins = torch.tensor([1.0, -2.0, 0.5])  # r(correct) − r(wrong)
    assert clean_accuracy(margins) == pytest.approx(2 / 3)
    assert memorization(margins, pairs) == pytest.approx(1 / 2)  # one of two flipped pairs learned wrong


def test_reward_read_at_last_real_token_and_training_lowers_loss(tok):
    lm = make_picollama(0, vocab=len(tok))
    rm = RewardModel(lm, head_seed=0)
    pairs = make_preferences("addition", 8, noise=0.25, seed=0)
    b = preference_batch(tok, pairs)
    assert b["input_ids"].shape[0] == 16
    with torch.no_grad():
        r = rm(b)
        pad = torch.full((16, 5), tok.pad_token_id)
        r2 = rm({"input_ids": torch.cat([b["input_ids"], pad], 1),
                 "attention_mask": torch.cat([b["attention_mask"], torch.zeros_like(pad)], 1)})
    torch.testing.assert_close(r, r2, rtol=1e-5, atol=1e-5)  # extra right padding changes nothing
    sign = torch.tensor([-1.0 if p.flipped else 1.0 for p in pairs])
    m = reward_margins(rm, preference_batches(tok, pairs, 3), pairs)  # batches of 3, 3 and 2 pairs
    torch.testing.assert_close(m, sign * (r[:8] - r[8:]), rtol=1e-5, atol=1e-5)
    from shrinklib.train import TrainConfig, train

    before = preference_loss(rm, b).item()
    train(rm, lambda i: b, preference_loss, TrainConfig(steps=10, lr=3e-3, progress=False))
    assert preference_loss(rm, b).item() < before


def test_last_mlp_reward_model_equals_the_full_model_with_that_mlp(tok):
    lm = make_picollama(0, vocab=len(tok))
    full, fast = RewardModel(lm, head_seed=3), LastMLPRewardModel(lm, head_seed=3)
    b = preference_batch(tok, make_preferences("sorting", 6, seed=1))
    feats = last_mlp_features(lm, b)
    assert feats["x"].shape == feats["h"].shape == (12, lm.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(fast(feats), full(b), rtol=1e-5, atol=1e-5)
        for p in fast.mlp.parameters():  # "fine-tune" the copy, then put the same weights into the model
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        lm.model.layers[-1].mlp.load_state_dict(fast.mlp.state_dict())
        torch.testing.assert_close(fast(feats), full(b), rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in fast.parameters())
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in lm.parameters()) / 2
