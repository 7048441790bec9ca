"""SliceGPT: norm folding and the full rotation keep the function (max |Δlogit| ≤ 1e-5 in float32),
PCA is orthonormal and sorted, slicing gives the expected shapes, runs generate, saves and
reloads to equal logits, and keeps more than a random rotation would."""

import pytest
import torch
from common import make_picollama, random_ids

from shrinklib.arch import UnsupportedArchitectureError
from shrinklib.evaluate import count_params
from shrinklib.prune.slicegpt import (SliceGPTConfig, fold_norms_, kept_dim_for_params, load_sliced, pca_basis, save_sliced,
                                      sliced_param_count, slicegpt_)

IDS = random_ids(8, 32, 128, 0)
TOL = dict(rtol=1e-5, atol=1e-5)  # float32; the observed difference is ~1e-7 on logits of size ~0.5


def _with_norm_scales(model):
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # random RMSNorm scales, so folding has something to do
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_fold_norms_keeps_logits(tie):
    model = _with_norm_scales(make_picollama(tie=tie))
    ref = model(IDS).logits
    fold_norms_(model)
    torch.testing.assert_close(model(IDS).logits, ref, **TOL)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert all((p == 1).all() for n, p in model.named_parameters() if "norm" in n)


def test_pca_basis_is_orthonormal_and_sorted():
    X = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * torch.arange(1, 17)
    Q, ev = pca_basis(X)
    torch.testing.assert_close(Q.T @ Q, torch.eye(16, dtype=Q.dtype))
    assert (ev[:-1] >= ev[1:]).all()
    torch.testing.assert_close((X.double() @ Q).pow(2).sum(0), ev)


@pytest.mark.parametrize("tie", [False, True])
def test_rotation_before_slicing_keeps_logits(tie):
    model = _with_norm_scales(make_picollama(1, tie=tie))
    ref = model(IDS).logits
    info = slicegpt_(model, SliceGPTConfig(slicing=0.0), IDS)
    assert info["d_kept"] == 32
    torch.testing.assert_close(model(IDS).logits, ref, **TOL)


def test_sliced_shapes_generate_and_reload(tmp_path):
    model = _with_norm_scales(make_picollama(2))
    info = slicegpt_(model, SliceGPTConfig(slicing=0.25), IDS)
    d2 = info["d_kept"]
    assert d2 == 24 and model.config.hidden_size == 24
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (32, 24) and layer.self_attn.o_proj.weight.shape == (24, 32)
    assert layer.mlp.gate_proj.weight.shape == (64, 24) and layer.mlp.down_proj.weight.shape == (24, 64)
    assert layer.attn_shortcut.weight.shape == (24, 24) and model.lm_head.weight.shape == (128, 24)
    assert count_params(model) == sliced_param_count(model.config, 24)
    assert kept_dim_for_params(model.config, count_params(model)) == 24
    assert kept_dim_for_params(model.config, count_params(model) - 1) == 16
    assert model.generate(IDS[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 10)
    save_sliced(model, tmp_path)
    again = load_sliced(tmp_path)
    torch.testing.assert_close(again(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_pca_keeps_more_than_a_random_rotation():
    """Sliced along the principal axes, logits stay closer to the original than along random axes."""
    import shrinklib.prune.slicegpt as sg

    base = make_picollama(3)
    ref = base(IDS).logits
    pca = make_picollama(3)
    slicegpt_(pca, SliceGPTConfig(0.25), IDS)
    rand = make_picollama(3)
    real = sg.pca_basis
    g = torch.Generator().manual_seed(0)
    sg.pca_basis = lambda X: (torch.linalg.qr(torch.randn(X.shape[-1], X.shape[-1], generator=g, dtype=torch.float64))[0],
                              torch.ones(X.shape[-1], dtype=torch.float64))
    try:
        slicegpt_(rand, SliceGPTConfig(0.25), IDS)
    finally:
        sg.pca_basis = real
    assert (pca(IDS).logits - ref).pow(2).mean() < (rand(IDS).logits - ref).pow(2).mean()


def test_errors():
    from archs import make_tiny

    gemma = make_tiny("gemma2")
    before = [p.clone() for p in gemma.parameters()]
    with pytest.raises(UnsupportedArchitectureError, match="SliceGPT is unsupported for gemma2 because its post-attention"):
        slicegpt_(gemma, SliceGPTConfig(), IDS)
    assert all(torch.equal(a, b) for a, b in zip(before, gemma.parameters()))  # refused before any change
    with pytest.raises(ValueError, match="slicing"):
        SliceGPTConfig(slicing=1.0)


def test_a_copy_of_a_sliced_model_has_its_own_shortcuts():
    import copy

    model = _with_norm_scales(make_picollama(4))
    slicegpt_(model, SliceGPTConfig(slicing=0.25), IDS)
    ref = model(IDS).logits
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(IDS).logits, ref, rtol=0, atol=0)
    with torch.no_grad():
        twin.model.layers[0].attn_shortcut.weight.mul_(2)
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)  # the original's hooks use its own weights
    assert not torch.allclose(twin(IDS).logits, ref)
