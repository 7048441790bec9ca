"""Every technique on every architecture of `shrinklib.arch` (tiny random models from the real
config classes, tests/archs.py), held to the invariants the suite uses on SmolLM2, and every
unsupported pair refused with "<what> is unsupported for <architecture> because <reason>" before
any change to the model. The support table of the README is this file's matrix."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import ARCH_NAMES, make_tiny, tiny_ids
from transformers import AutoModelForCausalLM

from shrinklib import arch
from shrinklib.arch import UnsupportedArchitectureError
from shrinklib.evaluate import count_params

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = tiny_ids(4, 16)
CALIB = tiny_ids(8, 16, seed=1)

# (technique, architecture) pairs that must be refused, and a word of the reason.
UNSUPPORTED = {
    ("slicegpt", "gemma2"): "post-attention and post-feedforward RMSNorms",
    ("minitron_hidden", "gemma2"): "scaled by √hidden_size",
    ("minitron_hidden", "gemma"): "scaled by √hidden_size",
    ("minitron_hidden", "opt"): "derives the head width from hidden_size",
    ("moe", "opt"): "MLP is not a module",
    **{("gguf", a): "GGUF 'llama' architecture" for a in ARCH_NAMES if a not in ("llama",)},
}


def supported(technique: str) -> list:
    """The architectures as parameters, those refusing `technique` skipped (they are tested below)."""
    return [pytest.param(a, marks=pytest.mark.skip(reason=f"unsupported: {UNSUPPORTED[technique, a]}"))
            if (technique, a) in UNSUPPORTED else a for a in ARCH_NAMES]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reload(model, tmp_path):
    """Saved with save_pretrained and loaded back by transformers."""
    model.save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- the adapter itself


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_param_formula_matches_the_modules(name):
    for tie in (False, True):
        model = make_tiny(name, tie_word_embeddings=tie)
        assert arch.param_count(model.config) == count_params(model)
        blocks_and_norm = sum(p.numel() for n, p in model.named_parameters() if arch.param_kind(n) not in ("embedding", "lm_head"))
        assert arch.param_count(model.config, embeddings=False) == blocks_and_norm


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_roles_cover_every_block_linear(name):
    model = make_tiny(name)
    lay = arch.layout(model)
    for block in lay.blocks(model):
        assert set(arch.linears(block)) == set(lay.roles())
        for logical in ("q", "k", "v", "o", "up", "down"):
            assert arch.proj_weight(lay, block, model.config, logical).dim() == 2


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_kv_cache_bytes_of_every_config(name):
    from shrinklib.params import kv_cache_bytes

    cfg = make_tiny(name).config
    assert kv_cache_bytes(cfg, tokens=10) == 2 * 2 * arch.kv_heads(cfg) * arch.head_dim(cfg) * 10 * 2


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_fold_scale_leaves_the_float_model_unchanged(name):
    """AWQ/SmoothQuant's fold: a random per-channel scale folded into every foldable site."""
    from shrinklib.quant.folding import fold_scale_, foldable, role_groups

    model = make_tiny(name)
    ref = logits(model)
    lay, prev = arch.layout(model), foldable(model)
    g = torch.Generator().manual_seed(0)
    for block in lay.blocks(model):
        for role, group in role_groups(lay.roles(), block).items():
            if role in prev:
                s = torch.rand(next(iter(group.values())).in_features, generator=g) + 0.5
                fold_scale_(arch.get_path(block, prev[role]), list(group.values()), s,
                            rows=lay.prev_rows(role, block, model.config), offset=lay.norm_offset)
    torch.testing.assert_close(logits(model), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_weight_only_quantization(name, method):
    """8-bit g16 of every block linear: all QuantLinear, logits within 2% of float; the codes
    dequantize to what each layer applies."""
    from shrinklib.quant import AWQConfig, GPTQConfig, QuantLinear, RTNConfig, quantize_

    model = make_tiny(name)
    ref = logits(model)
    config = {"rtn": RTNConfig(8, 16), "gptq": GPTQConfig(8, 16), "awq": AWQConfig(8, 16, n_grid=4)}[method]
    quantize_(model, config, CALIB, progress=False)
    layers = [m for b in arch.blocks(model) for m in arch.linear_layers(b).values()]
    assert layers and all(isinstance(m, QuantLinear) for m in layers)
    assert rel_err(logits(model), ref) < 0.02


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_smoothquant_w8a8(name):
    from shrinklib.quant import SmoothQuantConfig, W8A8Linear, quantize_

    model = make_tiny(name)
    ref = logits(model)
    quantize_(model, SmoothQuantConfig(alpha=0.5), CALIB, progress=False)
    assert all(isinstance(m, W8A8Linear) for b in arch.blocks(model) for m in arch.linear_layers(b).values())
    assert rel_err(logits(model), ref) < 0.05


# ----------------------------------------------------------------------------- unstructured pruning


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "wanda 2:4"])
@pytest.mark.parametrize("name", ARCH_NAMES)
def test_unstructured_and_nm_pruning(name, method):
    from shrinklib.prune import PruneConfig, is_nm, prune_

    model = make_tiny(name)
    nm = method.endswith("2:4")
    prune_(model, PruneConfig(method.split()[0], 0.5, n=2 if nm else 0, m=4 if nm else 0, blocksize=16), CALIB, progress=False)
    for lin in arch.named_linears(model).values():
        W = lin.weight
        if nm:
            assert is_nm(W, 2, 4)
        else:
            assert (W == 0).sum(1).eq(W.shape[1] // 2).all() if method == "wanda" else (W == 0).sum() >= W.numel() // 2
    assert torch.isfinite(logits(model)).all()


# ----------------------------------------------------------------------------- structured pruning


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_llm_pruner(name, tmp_path):
    """Nothing removed: the same function; half removed: smaller config, the formula's count, reloads equal."""
    from shrinklib.prune.llm_pruner import LLMPrunerConfig, llm_prune_

    model = make_tiny(name)
    ref = logits(model)
    llm_prune_(model, LLMPrunerConfig(0.0, head_ratio=0.0), CALIB)
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)
    llm_prune_(model, LLMPrunerConfig(0.5, head_ratio=0.5), CALIB)
    cfg = model.config
    assert arch.mlp_width(cfg) == 32
    assert cfg.num_attention_heads == (2 if arch.kv_heads(cfg) == 2 else 4)  # MHA (OPT) keeps its heads
    assert count_params(model) == arch.param_count(cfg)
    torch.testing.assert_close(logits(reload(model, tmp_path)), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", supported("slicegpt"))
def test_slicegpt(name, tmp_path):
    """No slicing: the same function; 25% sliced: the formula's count, saves and reloads equal."""
    from shrinklib.prune.slicegpt import SliceGPTConfig, load_sliced, save_sliced, sliced_param_count, slicegpt_

    model = make_tiny(name)
    ref = logits(model)
    slicegpt_(model, SliceGPTConfig(slicing=0.0), CALIB)
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)
    model = make_tiny(name)
    info = slicegpt_(model, SliceGPTConfig(slicing=0.25), CALIB)
    assert info["d_kept"] == 24 and count_params(model) == sliced_param_count(make_tiny(name).config, 24)
    save_sliced(model, tmp_path / "sliced")
    again = load_sliced(tmp_path / "sliced")
    torch.testing.assert_close(logits(again), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", supported("minitron_hidden"))
def test_minitron_width(name, tmp_path):
    from shrinklib.minitron import activation_importance, prune_width_, save_student

    model = make_tiny(name)
    ref = logits(model)
    imp = activation_importance(model, CALIB)
    prune_width_(model, imp, hidden=32, intermediate=64, heads_per_group=2)  # nothing removed
    torch.testing.assert_close(logits(model), ref, rtol=1e-6, atol=1e-6)
    prune_width_(model, imp, hidden=24, intermediate=48, heads_per_group=1)
    cfg = model.config
    assert (cfg.hidden_size, arch.mlp_width(cfg), cfg.num_attention_heads) == (24, 48, 2)
    assert count_params(model) == arch.param_count(cfg)
    save_student(model, tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    torch.testing.assert_close(logits(again), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "opt"])
def test_minitron_width_without_hidden_where_hidden_is_refused(name):
    from shrinklib.minitron import activation_importance, prune_width_

    model = make_tiny(name)
    prune_width_(model, activation_importance(model, CALIB), intermediate=48, heads_per_group=1)
    assert arch.mlp_width(model.config) == 48 and torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_depth_pruning(name, tmp_path):
    """Dropping a block = running without it; the config follows; reloads equal; one depth pruning for
    Minitron and the small-model copies."""
    from shrinklib.minitron import drop_layers_, layer_importance, without_layers
    from shrinklib.smallllm import depth_pruned

    model = make_tiny(name)
    assert layer_importance(model, CALIB, "cosine").shape == (2,)
    with without_layers(model, [0]):
        skipped = logits(model)
    small = depth_pruned(model, [1])
    assert len(arch.blocks(model)) == 2  # the copy leaves the model whole
    torch.testing.assert_close(logits(small), skipped)
    drop_layers_(model, [0])
    assert model.config.num_hidden_layers == 1
    torch.testing.assert_close(logits(reload(model, tmp_path)), skipped, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- distillation, merging, MoE


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_distillation_step(name):
    """KD of a model into itself costs nothing; into a depth-pruned student it costs more than 0 and
    one step lowers it."""
    from shrinklib.distill import KDConfig, kd_loss_fn
    from shrinklib.smallllm import depth_pruned

    teacher = make_tiny(name)
    loss = kd_loss_fn(teacher, KDConfig())
    batch = {"input_ids": IDS}
    assert loss(teacher, batch).item() == pytest.approx(0.0, abs=1e-6)
    student = depth_pruned(teacher, [0]).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    before = loss(student, batch)
    before.backward()
    opt.step()
    assert 0 < loss(student, batch).item() < before.item()


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_merge_of_identical_models_is_the_model(name):
    from shrinklib.merge import merge_state_dicts

    model = make_tiny(name)
    sd = model.state_dict()
    for method in ("linear", "task_arithmetic", "ties"):
        base = {k: v.clone() for k, v in sd.items()} if method != "linear" else None
        merged = merge_state_dicts(method, [sd, sd], weights=[0.5, 0.5], base=base)
        other = make_tiny(name, seed=1)
        other.load_state_dict(merged)
        torch.testing.assert_close(logits(other), logits(model))


@pytest.mark.parametrize("name", supported("moe"))
def test_upcycled_moe_equals_the_dense_model(name):
    from shrinklib.moe import MoEConfig, moe_layers, upcycle_

    model = make_tiny(name)
    ref = logits(model)
    done = upcycle_(model, MoEConfig(num_experts=4, top_k=2))
    assert done == [0, 1] and len(moe_layers(model)) == 2
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", supported("moe"))
def test_widened_mlp_is_the_same_function(name):
    from shrinklib.moe import widen_mlp

    model = make_tiny(name)
    ref = logits(model)
    for block in arch.blocks(model):
        arch.set_mlp(model, block, widen_mlp(arch.mlp_module(model, block), 3, name))
    torch.testing.assert_close(logits(model), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_last_mlp_reward_model_equals_the_full_reward(name):
    """The reward from cached last-MLP features equals the backbone's own last hidden state through
    the same head (the feature path reproduces the model, post-norms and OPT's bare MLP included)."""
    from shrinklib.reward import LastMLPRewardModel, RewardModel, last_mlp_features

    lm = make_tiny(name)
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
    full, fast = RewardModel(lm, head_seed=3).eval(), LastMLPRewardModel(lm, head_seed=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(last_mlp_features(lm, batch)), full(batch), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_speculative_decoding_gives_the_target_greedy_tokens(name):
    from shrinklib.smallllm import depth_pruned
    from shrinklib.speculative import greedy_generate, speculative_generate

    target = make_tiny(name)
    draft = depth_pruned(target, [1])
    prompt = IDS[:1, :6]
    out = speculative_generate(target, draft, prompt, max_new_tokens=8, gamma=3)
    torch.testing.assert_close(out.sequences, greedy_generate(target, prompt, 8))


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_proxy_tuning_adds_the_small_pair_offset(name):
    from shrinklib.proxy import ProxyTuningLogitsProcessor
    from shrinklib.smallllm import depth_pruned

    large = make_tiny(name)
    untuned, tuned = depth_pruned(large, [0]), depth_pruned(make_tiny(name, seed=5), [0])
    proc = ProxyTuningLogitsProcessor(tuned, untuned, alpha=1.0)
    prompt = IDS[:2, :6]
    scores = logits(large, prompt)[:, -1]
    expect = scores + logits(tuned, prompt)[:, -1] - logits(untuned, prompt)[:, -1]
    torch.testing.assert_close(proc(prompt, scores), expect, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_export_safetensors_reloads_equal(name, tmp_path):
    from shrinklib.export import export_safetensors
    from shrinklib.quant import RTNConfig, quantize_

    model = make_tiny(name)
    quantize_(model, RTNConfig(4, 16), progress=False)
    report = export_safetensors(model, tmp_path / "out", check_ids=IDS)
    assert report.ok and report.max_abs_logit_diff == 0


# ----------------------------------------------------------------------------- unsupported pairs


def _refuses(technique: str, name: str):
    """Run the technique's entry point on the architecture that must refuse it."""
    model = make_tiny(name)
    if technique == "slicegpt":
        from shrinklib.prune.slicegpt import SliceGPTConfig, slicegpt_

        return model, lambda: slicegpt_(model, SliceGPTConfig(0.25), CALIB)
    if technique == "minitron_hidden":
        from shrinklib.minitron import activation_importance, prune_width_

        imp = activation_importance(model, CALIB)
        return model, lambda: prune_width_(model, imp, hidden=24, intermediate=48)
    if technique == "moe":
        from shrinklib.moe import MoEConfig, upcycle_

        return model, lambda: upcycle_(model, MoEConfig())
    if technique == "gguf":
        from shrinklib.export import export_gguf

        return model, lambda: export_gguf(model, "/nonexistent/never-written.gguf", fmt="F16")
    raise KeyError(technique)


@pytest.mark.parametrize("technique, name", sorted(UNSUPPORTED))
def test_unsupported_pairs_are_refused_before_any_work(technique, name):
    model, run = _refuses(technique, name)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedArchitectureError, match=f"unsupported for {name} because .*{UNSUPPORTED[technique, name][:20]}"):
        run()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_export_compressed_tensors_reloads_equal(name, tmp_path):
    """GPTQ 4-bit g16 written as compressed-tensors' pack-quantized and loaded back by transformers
    (with the compressed-tensors package): its dequantized weights are ours, so the logits are equal."""
    from shrinklib.export import export_compressed_tensors, linear_weight
    from shrinklib.quant import GPTQConfig, quantize_

    model = make_tiny(name)
    quantize_(model, GPTQConfig(4, 16, symmetric=True), CALIB, progress=False)
    report = export_compressed_tensors(model, tmp_path / "ct", check_ids=IDS)
    assert report.ok and report.max_abs_logit_diff == 0
    from shrinklib.export import load_compressed_tensors

    again = load_compressed_tensors(tmp_path / "ct")
    for (n, ours), theirs in zip(arch.named_linears(model).items(), arch.named_linears(again).values()):
        assert torch.equal(linear_weight(ours), theirs.weight.float()), n


def test_mixtral_takes_quantization_of_its_linears_and_refuses_the_rest():
    """Mixtral's experts are fused 3-D parameters: RTN quantizes its linears (attention, router);
    everything that must reach into the experts says so before any change."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from shrinklib.quant import AWQConfig, RTNConfig, quantize_

    def make():
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)).eval()

    model = make()
    ref = logits(model)
    quantize_(model, RTNConfig(8, 16), progress=False)
    assert rel_err(logits(model), ref) < 0.02
    model = make()
    with pytest.raises(UnsupportedArchitectureError, match="unsupported for mixtral because its experts are fused"):
        quantize_(model, AWQConfig(4, 16), CALIB, progress=False)
    assert torch.equal(logits(model), ref)
