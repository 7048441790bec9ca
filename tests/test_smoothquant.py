"""SmoothQuant: the smoothing is exact in float; it flattens activation outliers; W8A8 simulation."""

import pytest
import torch
from torch import nn

from shrinklib.quant import SmoothQuantConfig, W8A8Linear, quantize_, smooth_scales
from shrinklib.quant.formats import quantize_activations_per_token

from common import make_picollama, make_picoopt, random_ids


def test_smooth_scales_closed_form():
    act_max, W = torch.tensor([16.0, 1.0]), torch.tensor([[1.0, 4.0]])
    s = smooth_scales(act_max, [W], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([4.0, 0.5]))  # √16/√1, √1/√4
    # after smoothing, activation and weight ranges per channel are equal at α = 0.5
    torch.testing.assert_close(act_max / s, (W * s).abs().amax(0))


def test_per_token_quantization():
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 3.0, -50.0]])
    xq = quantize_activations_per_token(x, 8)
    assert torch.allclose(xq[0], x[0], atol=1 / 127 / 2 + 1e-7)  # each token has its own scale
    assert (xq[1] - x[1]).abs().max() <= 100 / 127 / 2 + 1e-5


@pytest.mark.parametrize("make", [make_picollama, make_picoopt])
def test_smoothing_alone_is_exact_and_w8a8_is_close(make):
    ids = random_ids(4, 16)
    model = make()
    ref = model(ids).logits
    quantize_(model, SmoothQuantConfig(alpha=0.5, w_bits=8, a_bits=8), ids, progress=False)
    assert sum(isinstance(m, W8A8Linear) for m in model.modules()) in (12, 14)
    assert (model(ids).logits - ref).abs().max() < 0.05 * ref.abs().max()


def test_smoothquant_helps_when_activations_have_outlier_channels():
    torch.manual_seed(0)
    norm = nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight[:2] = 40.0  # two outlier channels, the pattern SmoothQuant targets (Fig. 4)
    lin = nn.Linear(32, 16)
    x = norm(torch.randn(64, 32))
    ref = lin(x)
    naive = W8A8Linear(lin, a_bits=6, act_granularity="per_token")(x)
    s = smooth_scales(x.abs().amax(0), [lin.weight], 0.5)
    smoothed_lin = nn.Linear(32, 16)
    smoothed_lin.weight.data, smoothed_lin.bias.data = lin.weight.data * s, lin.bias.data
    smooth = W8A8Linear(smoothed_lin, a_bits=6, act_granularity="per_token")(x / s)
    assert (smooth - ref).pow(2).mean() < 0.5 * (naive - ref).pow(2).mean()


def test_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ValueError, match="act_granularity"):
        SmoothQuantConfig(act_granularity="per_channel")
