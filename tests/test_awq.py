"""AWQ: scales of 1 give RTN; the searches never do worse than their α = 0 / ratio = 1 start;
folding keeps the float model's function."""

import pytest
import torch

from shrinklib.arch import blocks
from shrinklib.quant import AWQConfig, RTNConfig, awq_search_clip, awq_search_scale, quantize_
from shrinklib.quant.awq import fake_quant
from shrinklib.arch import layout_of_type
from shrinklib.quant.folding import fold_scale_, foldable, role_groups
from shrinklib.arch import layout, get_path

from common import make_picollama, make_picoopt, random_ids


def test_scales_of_one_equal_rtn():
    model, rtn, ids = make_picollama(), make_picollama(), random_ids(4, 16)
    quantize_(model, AWQConfig(bits=3, group_size=16, n_grid=1, clip=False), ids, progress=False)  # α = 0 only
    quantize_(rtn, RTNConfig(bits=3, group_size=16), progress=False)
    torch.testing.assert_close(model(ids).logits, rtn(ids).logits, rtol=1e-5, atol=1e-5)


def _outlier_inputs(n=256, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    X[:, :3] *= 20  # a few salient channels, as in AWQ Fig. 2
    return X


def test_scale_search_never_worse_than_rtn():
    X, Ws = _outlier_inputs(), [torch.randn(16, 32), torch.randn(8, 32)]
    s, alpha = awq_search_scale(Ws, X, X.abs().mean(0), 3, 16, False, n_grid=20)
    loss = lambda s: sum(((X / s) @ fake_quant(W * s, 3, 16, False).T - X @ W.T).pow(2).mean() for W in Ws)
    assert loss(s) <= loss(torch.ones(32))
    assert alpha > 0 and s[:3].min() > s[3:].max()  # salient channels are scaled up


def test_clip_search_never_worse_than_no_clip():
    X, W = _outlier_inputs(d=40), torch.randn(12, 40)
    clip = awq_search_clip(W, X, 3, 16, False)  # 40 = 2×16 + 8: a short last group
    assert clip.shape == (12, 3) and clip.max() <= 1 and clip.min() >= 0.5
    err = lambda Wq: ((Wq - W) @ X.T).pow(2).sum()
    assert err(fake_quant(W, 3, 16, False, clip)) <= err(fake_quant(W, 3, 16, False))


@pytest.mark.parametrize("make", [make_picollama, make_picoopt])
def test_folding_keeps_the_float_function(make):
    model, ids = make(), random_ids(2, 16)
    ref = model(ids).logits
    prev_of, roles = foldable(model), layout(model).roles()
    for block in blocks(model):
        for role, group in role_groups(roles, block).items():
            if role in prev_of:
                d = next(iter(group.values())).in_features
                fold_scale_(get_path(block, prev_of[role]), list(group.values()), torch.rand(d) + 0.5)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [make_picollama, make_picoopt])
def test_awq_beats_rtn_on_the_model(make):
    ids = random_ids(8, 32)
    fp, awq, rtn = make(), make(), make()
    quantize_(awq, AWQConfig(bits=3, group_size=16), ids, progress=False)
    quantize_(rtn, RTNConfig(bits=3, group_size=16), progress=False)
    ref = fp(ids).logits
    assert (awq(ids).logits - ref).pow(2).mean() < (rtn(ids).logits - ref).pow(2).mean()


def test_config_validation():
    with pytest.raises(ValueError, match="n_grid"):
        AWQConfig(n_grid=0)
    assert set(layout_of_type("llama").prev()) == {"attn_in", "mlp_in", "mlp_out"}
