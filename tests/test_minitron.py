"""Minitron importance and pruning on tiny Llamas: planted dead units rank last; pruned students
are ordinary transformers checkpoints that reload with the same outputs."""

import copy

import pytest
import torch
from common import make_picollama, make_picoopt, random_ids
from transformers import AutoModelForCausalLM

from shrinklib import arch
from shrinklib.arch import UnsupportedArchitectureError
from shrinklib.evaluate import count_params
from shrinklib.minitron import (
    activation_importance, drop_layers_, layer_importance, match_mlp, match_width, non_embedding_params, prune_depth_,
    prune_width_, prune_width_iterative_, random_init_like, save_student, without_layers,
)

IDS = random_ids(4, 16)


def _model(**kw):
    return make_picollama(seed=0, layers=3, heads=4, kv_heads=2, **kw)


def test_planted_dead_neuron_head_and_channel_rank_last():
    model = _model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[17] = 0  # neuron 17 of layer 1 outputs act(g)·0 = 0
        model.model.layers[0].self_attn.o_proj.weight[:, 2 * 8 : 3 * 8] = 0  # head 2 of layer 0 writes nothing
        for b in model.model.layers:  # channel 5 is zero at every norm's output
            b.input_layernorm.weight[5] = 0
            b.post_attention_layernorm.weight[5] = 0
    imp = activation_importance(model, IDS)
    assert imp.neurons[1].argmin() == 17 and imp.neurons[1, 17] == 0
    assert imp.heads[0].argmin() == 2 and imp.heads[0, 2] == 0
    assert imp.channels.argmin() == 5 and imp.channels[5] == 0
    assert (imp.neurons[1].sort().values[1] > 0) and imp.heads.shape == (3, 4) and imp.n_tokens == IDS.numel()


def test_head_score_is_norm_of_head_contribution():
    """Independent check for one layer: re-run attention by hand from captured o_proj inputs."""
    model = _model()
    captured = {}
    h = model.model.layers[2].self_attn.o_proj.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0]))
    with torch.no_grad():
        model(IDS[:1])
    h.remove()
    x = captured["x"][0]  # (L, 4*8)
    W = model.model.layers[2].self_attn.o_proj.weight  # (32, 32)
    expected = torch.stack([(x[:, k * 8 : (k + 1) * 8] @ W[:, k * 8 : (k + 1) * 8].T).norm(dim=-1).mean() for k in range(4)])
    imp = activation_importance(model, IDS[:1])
    torch.testing.assert_close(imp.heads[2], expected.detach(), rtol=1e-5, atol=1e-6)


def test_layer_importance_ranks_identity_layer_last():
    model = _model()
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: dropping it changes nothing
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    for metric in ("ppl", "cosine"):
        scores = layer_importance(model, IDS, metric)
        assert scores.argmin() == 1 and abs(scores[1].item()) < 1e-5, (metric, scores)
    with pytest.raises(ValueError):
        layer_importance(model, IDS, "magic")


def test_without_layers_restores_the_model():
    model = _model()
    ref = model(IDS).logits
    with without_layers(model, [0, 2]):
        assert len(model.model.layers) == 1
    torch.testing.assert_close(model(IDS).logits, ref)


def test_width_pruned_student_saves_and_reloads(tmp_path):
    model = _model(tie=True)
    imp = activation_importance(model, IDS)
    prune_width_(model, imp, hidden=24, intermediate=40, heads_per_group=1)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (24, 40, 2, 2, 8)
    assert count_params(model) == non_embedding_params(cfg) + 128 * 24  # tied embedding counted once
    logits = model(IDS).logits
    folder = save_student(model, tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(loaded(IDS).logits, logits)
    assert loaded.model.embed_tokens.weight.data_ptr() == loaded.lm_head.weight.data_ptr()


def test_width_pruning_with_nothing_removed_is_identity():
    model = _model()
    ref = model(IDS).logits
    prune_width_(model, activation_importance(model, IDS), hidden=32, intermediate=64, heads_per_group=2)
    torch.testing.assert_close(model(IDS).logits, ref)


def test_head_pruning_removes_exactly_the_dead_heads():
    """Heads that write nothing are removed; the output is unchanged (independent of the ranking code)."""
    model = _model()
    with torch.no_grad():
        for b in model.model.layers:  # heads 1 and 2 (one in each KV group of 2) write nothing
            b.self_attn.o_proj.weight[:, 8:24] = 0
    ref = model(IDS).logits
    prune_width_(model, activation_importance(model, IDS), heads_per_group=1)
    assert model.config.num_attention_heads == 2
    torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_depth_pruning_and_reload(tmp_path):
    model = _model()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ref = model(IDS).logits
    dropped = prune_depth_(copy.deepcopy(model), 1, IDS, "ppl")
    assert dropped == [1]
    assert prune_depth_(model, 1, IDS, "cosine", iterative=True) == [1]
    assert model.config.num_hidden_layers == 2 and [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(save_student(model, tmp_path / "deep")).eval()
    torch.testing.assert_close(loaded(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    out = loaded.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)  # the KV cache works
    assert out.shape == (1, 7)


def test_iterative_width_reaches_the_target():
    model = _model()
    prune_width_iterative_(model, IDS, hidden=16, intermediate=32, iterations=2)
    assert (model.config.hidden_size, model.config.intermediate_size) == (16, 32)
    assert torch.isfinite(model(IDS).logits).all()


def test_match_width_equal_parameters_to_depth():
    model = make_picollama(seed=0, hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128)
    half = non_embedding_params(model.config) // 2
    h, i = match_width(model.config, half, multiple=8)
    c = copy.deepcopy(model.config)
    c.head_dim, c.hidden_size, c.intermediate_size = 16, h, i
    assert abs(non_embedding_params(c) - half) / half < 0.1
    drop_layers_(model, [1, 2])
    assert non_embedding_params(model.config) == pytest.approx(half, rel=0.01)
    assert count_params(model) == non_embedding_params(model.config) + 2 * 128 * 64


def test_match_width_keeps_hidden_divisible_by_heads():
    """transformers refuses a config whose hidden size is not a multiple of the head count."""
    model = make_picollama(seed=0, hidden=48, layers=2, heads=3, kv_heads=1, intermediate=96)
    h, i = match_width(model.config, non_embedding_params(model.config) // 2, multiple=8)
    assert h % 3 == 0 and h % 8 == 0 and 0 < h < 48 and 0 < i <= 96


def test_random_init_like_has_same_shapes():
    model = _model()
    prune_width_(model, activation_importance(model, IDS), hidden=16)
    fresh = random_init_like(model, seed=1)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]


def test_opt_embedding_channels_are_refused_clearly():
    model = make_picoopt()
    imp = activation_importance(model, IDS)  # heads and neurons work on OPT
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UnsupportedArchitectureError, match="unsupported for opt because its config derives the head width"):
        prune_width_(model, imp, hidden=16, intermediate=32)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any change


def test_match_mlp_keeps_hidden_and_heads_and_meets_the_target():
    model = _model()
    cfg = model.config
    half = non_embedding_params(cfg) // 2
    i = match_mlp(cfg, half, multiple=8)
    assert i % 8 == 0 and 0 < i < cfg.intermediate_size
    best = abs(arch.param_count(cfg, intermediate=i, embeddings=False) - half)
    for other in (i - 8, i + 8):  # no other multiple of 8 is closer to the target
        if 0 < other <= cfg.intermediate_size:
            assert best <= abs(arch.param_count(cfg, intermediate=other, embeddings=False) - half)
    pruned = prune_width_(model, activation_importance(model, IDS), intermediate=i)
    assert pruned.config.hidden_size == cfg.hidden_size and non_embedding_params(pruned.config) == arch.param_count(cfg, intermediate=i, embeddings=False)
