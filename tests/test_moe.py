"""MoE: routing selects exactly k experts, the balancing loss is 1 under a uniform router,
the upcycled model equals the dense one at step 0, and the parameter accounting of Mixtral."""

import pytest
import torch
from common import make_picollama, random_ids

from shrinklib.moe import (
    MoEConfig, MoEMLP, expert_load, flops_per_token, load_balancing_loss, moe_aux_losses, moe_layers, moe_lm_loss,
    param_counts, route_top_k, router_z_loss, upcycle_,
)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_routing_selects_exactly_k_distinct_experts(k):
    logits = torch.randn(50, 5, generator=torch.Generator().manual_seed(k))
    probs, gates, experts = route_top_k(logits, k)
    assert experts.shape == (50, k) and gates.shape == (50, k)
    assert all(len(set(row.tolist())) == k for row in experts)
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    # the chosen experts are the k largest logits
    assert torch.equal(experts.sort(-1).values, logits.topk(k, -1).indices.sort(-1).values)
    torch.testing.assert_close(probs, logits.softmax(-1))


class _Scale(torch.nn.Module):
    """Expert i multiplies its input by i + 1: each expert computes a different function."""

    def __init__(self, i):
        super().__init__()
        self.c = float(i + 1)

    def forward(self, x):
        return self.c * x


@pytest.mark.parametrize("k", [1, 2])
def test_moe_sends_each_token_to_its_own_experts(k):
    """With experts that differ (expert i scales by i + 1), the output of every token is the
    gate-weighted sum of exactly its top-k experts, computed here token by token: a token sent to
    another expert, or a gate applied to the wrong slot, changes its row."""
    E, d, T = 4, 6, 40
    moe = MoEMLP([_Scale(i) for i in range(E)], d, k)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(E, d, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(T, d, generator=torch.Generator().manual_seed(2))
    y = moe(x)
    logits = x @ moe.router.weight.T
    for t in range(T):
        p = logits[t].softmax(-1)
        top = p.topk(k).indices.tolist()
        expected = sum(p[i] / p[top].sum() * (i + 1) for i in top) * x[t]
        torch.testing.assert_close(y[t], expected, rtol=1e-5, atol=1e-6)
    assert len(set(moe.last["experts"][:, 0].tolist())) > 1  # the tokens do not all go to one expert


def test_load_balancing_loss_minimum_under_uniform_router():
    E, T = 4, 64
    probs = torch.full((T, E), 1 / E)
    experts = torch.arange(T).remainder(E).view(T, 1)  # any assignment: P_i = 1/E makes it exactly 1
    assert load_balancing_loss(probs, experts).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1.0  # every token on expert 0 with probability 1: E · 1 · 1 = E
    assert load_balancing_loss(collapsed, torch.zeros(T, 1, dtype=torch.long)).item() == pytest.approx(E)
    skewed = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(T, E)
    assert load_balancing_loss(skewed, skewed.topk(1).indices).item() > 1.0


def test_router_z_loss_and_expert_load():
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    load = expert_load(torch.tensor([[0, 1], [0, 2], [0, 1]]), 4)
    torch.testing.assert_close(load, torch.tensor([3 / 6, 2 / 6, 1 / 6, 0.0]))


@pytest.mark.parametrize("E, k, every", [(4, 1, 1), (4, 2, 1), (8, 2, 2)])
def test_upcycled_moe_equals_dense_at_step_zero(E, k, every):
    dense = make_picollama(0)
    moe = make_picollama(0)
    done = upcycle_(moe, MoEConfig(E, k, every=every))
    assert len(done) == 2 // every and len(moe_layers(moe)) == len(done)
    ids = random_ids(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    aux = moe_aux_losses(moe)
    assert aux["balance"].item() >= 0 and aux["z"].item() >= 0
    layer = moe_layers(moe)[0]
    assert layer.last["experts"].shape == (4 * 16, k)


def test_moe_trains_and_the_experts_diverge():
    from shrinklib.train import TrainConfig, train

    model = make_picollama(0)
    upcycle_(model, MoEConfig(4, 2))
    ids = random_ids(4, 16)
    train(model, lambda i: {"input_ids": ids, "labels": ids}, moe_lm_loss(), TrainConfig(steps=3, lr=1e-2, progress=False))
    layer = moe_layers(model)[0]
    w = [e.gate_proj.weight for e in layer.experts]
    assert not torch.equal(w[0], w[1])


def test_param_counts_pico_and_mixtral():
    model = make_picollama(0)
    dense = param_counts(model, top_k=1, num_experts=1)["total"]
    upcycle_(model, MoEConfig(4, 2))
    c = param_counts(model)
    mlp = 3 * 32 * 64  # gate, up, down of one dense MLP
    router = 32 * 4
    assert c["total"] == dense + 2 * (3 * mlp + router)
    assert c["active"] == c["total"] - 2 * 2 * mlp  # 2 of 4 experts per token, 2 layers
    from transformers import AutoModelForCausalLM, MixtralConfig

    with torch.device("meta"):
        mixtral = AutoModelForCausalLM.from_config(MixtralConfig())  # Mixtral-8x7B's values
    c = param_counts(mixtral)
    assert round(c["total"] / 1e9, 1) == 46.7 and round(c["active"] / 1e9, 1) == 12.9  # Mixtral paper: 47B / 13B
    assert flops_per_token(100, 10, 2, 8, 16) == 2 * 90 + 2 * 2 * 16 * 8


def test_config_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)
    assert isinstance(MoEMLP([torch.nn.Identity()], 4, 1), torch.nn.Module)


def test_widened_mlp_is_the_same_function():
    from shrinklib.moe import widen_mlp

    model = make_picollama(0)
    mlp = model.model.layers[0].mlp
    wide = widen_mlp(mlp, 4)
    x = torch.randn(5, 32)
    torch.testing.assert_close(wide(x), mlp(x), rtol=1e-5, atol=1e-6)
    assert wide.up_proj.weight.shape == (256, 32)
    split = widen_mlp(mlp, 2, split_noise=0.1)  # copies whose down columns differ, summing to the same
    torch.testing.assert_close(split(x), mlp(x), rtol=1e-5, atol=1e-5)
    f = mlp.up_proj.weight.shape[0]
    assert not torch.equal(split.down_proj.weight[:, :f], split.down_proj.weight[:, f:])
    split(x).square().sum().backward()  # the copies now get different gradients: they can learn apart
    assert not torch.allclose(split.up_proj.weight.grad[:f], split.up_proj.weight.grad[f:])


def test_upcycle_listed_blocks_only_and_the_cached_loss_is_the_whole_models():
    """Upcycling the listed blocks keeps the function; the MoE loss on a `cache_prefix` batch (the blocks
    below run once) equals the same loss through the whole model."""
    from shrinklib.calib import cache_prefix
    from shrinklib.tasks import answer_loss
    from shrinklib.train import causal_lm_loss

    dense, moe = make_picollama(0), make_picollama(0)
    assert upcycle_(moe, MoEConfig(4, 2), blocks=[-1]) == [1] and len(moe_layers(moe)) == 1
    ids = random_ids(3, 12)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        cached = cache_prefix(moe, batch, 1)
        torch.testing.assert_close(answer_loss(moe, cached), causal_lm_loss(moe, batch), rtol=1e-5, atol=1e-6)
        full = moe_lm_loss(lm_loss=causal_lm_loss)(moe, batch)
        torch.testing.assert_close(moe_lm_loss(lm_loss=answer_loss)(moe, cached), full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        upcycle_(make_picollama(0), MoEConfig(4, 2), blocks=[2])


def test_top2_router_learns_from_the_lm_loss_and_top1_does_not():
    """With identical experts the renormalized gates do not change the output; once experts differ, top-2
    gates pass the language-model loss's gradient to the router, a renormalized top-1 gate (always 1) does not."""
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    grads = {}
    for k in (1, 2):
        moe = MoEMLP([_Scale(i) for i in range(3)], 6, k)
        moe(x).square().sum().backward()
        grads[k] = moe.router.weight.grad.abs().max().item()
    assert grads[2] > 1.0 and grads[1] < 1e-5 * grads[2]  # top-1: zero up to rounding (p / p)


def test_exercise_top_k_gates_checker(capsys):
    from shrinklib.exercises.ex09 import check_top_k_gates

    check_top_k_gates(lambda logits, k: route_top_k(logits, k)[1])
    assert "correct on all" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="top_k_gates"):  # not renormalized: Switch's gates
        check_top_k_gates(lambda logits, k: logits.softmax(-1).topk(k, -1).values)

    def stub(logits, k):
        raise NotImplementedError

    check_top_k_gates(stub)
    assert "not attempted" in capsys.readouterr().out
