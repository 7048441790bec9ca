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
    naive = W8A8Linear.from_linear(lin, a_bits=6, act_granularity="per_token")(x)
    s = smooth_scales(x.abs().amax(0), [lin.weight], 0.5)
    smoothed_lin = nn.Linear(32, 16)
    smoothed_lin.weight.data, smoothed_lin.bias.data = lin.weight.data * s, lin.bias.data
    smooth = W8A8Linear.from_linear(smoothed_lin, a_bits=6, act_granularity="per_token")(x / s)
    assert (smooth - ref).pow(2).mean() < 0.5 * (naive - ref).pow(2).mean()


def test_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ValueError, match="act_granularity"):
        SmoothQuantConfig(act_granularity="per_channel")


def test_the_int8_kernel_backend_runs_the_same_w8a8_model():
    # one W8A8 layer, two backends: quantize_(backend="int") equals moving the reference model to "int",
    # and both agree with the simulated reference up to float rounding (int32 vs float32 sums)
    import copy

    from shrinklib.quant import set_backend_

    ids = random_ids(2, 16)
    ref_model = make_picollama()
    int_model = copy.deepcopy(ref_model)
    config = SmoothQuantConfig(alpha=0.5)
    quantize_(ref_model, config, ids, progress=False)
    quantize_(int_model, config, ids, progress=False, backend="int")
    layers = [m for m in int_model.modules() if isinstance(m, W8A8Linear)]
    assert layers and all(m.backend == "int" for m in layers)
    ref = ref_model(ids).logits
    torch.testing.assert_close(int_model(ids).logits, ref, rtol=0, atol=1e-5 * ref.abs().max().item())  # measured 2e-7
    moved = set_backend_(copy.deepcopy(ref_model), "int")
    torch.testing.assert_close(moved(ids).logits, int_model(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="8 bits per token"):
        quantize_(make_picollama(), SmoothQuantConfig(act_granularity="per_tensor"), ids, progress=False, backend="int")
