"""LLM-Pruner: Taylor importance (planted zero head/channel ranks last, scores equal a slow
loop), the pruned model's shapes, generate, save/reload, LoRA recovery, clear errors."""

import pytest
import torch
from common import make_picollama, random_ids
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from shrinklib.arch import UnsupportedArchitectureError, layout
from shrinklib.evaluate import count_params
from shrinklib.prune.llm_pruner import (LLMPrunerConfig, block_importance, llm_prune_, lora_recover_, taylor_grads,
                                        taylor_group_scores)

IDS = random_ids(4, 24, 128, 0)


def test_group_scores_equal_a_slow_loop():
    g = torch.Generator().manual_seed(0)
    W, G = torch.randn(12, 10, generator=g), torch.randn(12, 10, generator=g)
    for dim, n in ((0, 4), (1, 5)):
        slices = W.chunk(n, dim), G.chunk(n, dim)
        elem = torch.stack([(w * gr).abs().sum() for w, gr in zip(*slices)])
        vec = torch.stack([(w * gr).sum().abs() for w, gr in zip(*slices)])
        torch.testing.assert_close(taylor_group_scores(W, G, n, dim, "element"), elem)
        torch.testing.assert_close(taylor_group_scores(W, G, n, dim, "vector"), vec)


def test_vector_score_is_the_first_order_loss_change():
    """|Σ w·g| over a slice equals |dL/dε| for scaling that slice by (1 + ε): a central difference."""
    model, eps = make_picollama(0), 0.05
    grads = taylor_grads(model, IDS)
    gate = model.model.layers[1].mlp.gate_proj.weight

    def loss_scaled(f):
        with torch.no_grad():
            saved = gate[5].clone()
            gate[5] *= f
            loss = model(IDS, labels=IDS).loss.item()
            gate[5] = saved
        return loss

    fd = abs(loss_scaled(1 + eps) - loss_scaled(1 - eps)) / (2 * eps)
    est = taylor_group_scores(gate, grads["model.layers.1.mlp.gate_proj.weight"], 64, 0, "vector")[5]
    assert est.item() == pytest.approx(fd, rel=0.05)


@pytest.mark.parametrize("aggregation", ["element", "vector"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
def test_planted_zero_head_and_channel_rank_last(aggregation, reduction):
    model = make_picollama(1)
    att, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    with torch.no_grad():
        att.q_proj.weight[8:16] = 0  # head 1 (head_dim 8)
        att.o_proj.weight[:, 8:16] = 0
        mlp.gate_proj.weight[7] = mlp.up_proj.weight[7] = 0
        mlp.down_proj.weight[:, 7] = 0
    grads = taylor_grads(model, IDS)
    heads, channels = block_importance(model.model.layers[0], grads, "model.layers.0", 4, LLMPrunerConfig(0.2, aggregation=aggregation, reduction=reduction),
                                       layout(model), model.config)
    assert heads.argmin() == 1 and heads[1] == 0 and (heads[[0, 2, 3]] > 0).all()
    assert channels.argmin() == 7 and channels[7] == 0 and (channels[torch.arange(64) != 7] > 0).all()
    removed = llm_prune_(model, LLMPrunerConfig(0.25, head_ratio=0.5, aggregation=aggregation, reduction=reduction), IDS)
    assert 1 in removed["heads"][0]


def test_shapes_generate_and_reload(tmp_path):
    model = make_picollama(2)  # 4 heads of 8 dims in 2 KV groups, MLP 64
    before = count_params(model)
    llm_prune_(model, LLMPrunerConfig(0.25, head_ratio=0.5), IDS)
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        assert att.q_proj.weight.shape == (16, 32) and att.o_proj.weight.shape == (32, 16)
        assert att.k_proj.weight.shape == (16, 32) and att.v_proj.weight.shape == (16, 32)
        assert mlp.gate_proj.weight.shape == (48, 32) and mlp.up_proj.weight.shape == (48, 32)
        assert mlp.down_proj.weight.shape == (32, 48)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (2, 2, 48)
    assert count_params(model) == before - 2 * (2 * 32 * 16 + 3 * 32 * 16)
    out = model.generate(IDS[:1, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(again) is LlamaForCausalLM and count_params(again) == count_params(model)
    torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_nine_heads_three_kv_groups():
    """SmolLM2's shape of GQA: one query head removed from each KV group keeps repeat_kv valid."""
    model = make_picollama(3, hidden=36, heads=9, kv_heads=3)
    llm_prune_(model, LLMPrunerConfig(0.2), IDS)  # round(0.2 · 3) = 1 head per group
    assert model.config.num_attention_heads == 6 and model.model.layers[0].self_attn.q_proj.weight.shape == (24, 36)
    assert model(IDS).logits.isfinite().all()


def test_lora_recovery_lowers_the_loss_and_merges():
    model = make_picollama(4)
    llm_prune_(model, LLMPrunerConfig(0.5, head_ratio=0.5), IDS)
    batch = {"input_ids": IDS, "labels": IDS}
    before = model(**batch).loss.item()
    model, history = lora_recover_(model, lambda step: batch, steps=15, lr=1e-2, progress=False)
    assert type(model) is LlamaForCausalLM and not any("lora" in n for n, _ in model.named_parameters())
    assert model(**batch).loss.item() < before and len(history) == 15


def test_errors():
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=2))
    with pytest.raises(UnsupportedArchitectureError, match="LLM-Pruner is unsupported for mixtral because its experts"):
        llm_prune_(mixtral, LLMPrunerConfig(), IDS)
    with pytest.raises(ValueError, match="ratio"):
        LLMPrunerConfig(1.5)
    with pytest.raises(ValueError, match="aggregation"):
        LLMPrunerConfig(aggregation="row")
