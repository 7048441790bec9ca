"""SmoothQuant: the smoothing is exact in float; it flattens activation outliers; one W8A8
representation on the reference backend (float GEMM of the int8 codes) and the int8 kernel.

Tolerance between the backends: both round every activation to the same int8 codes from the same
input; the reference sums the products in float32, the kernel in exact int32, so one layer's outputs
differ by float32 rounding, at most ~K·2⁻²⁴·Σ|x̂||ŵ| (checked at 1e-5 of that bound). Through a
model a difference that small can move a later activation across a rounding boundary of its int8
grid (one code, 1/254 of that token's range), so whole-model logits are compared at 1% of their
norm, with the same greedy token.
"""

import pytest
import torch
from torch import nn

import copy

from shrinklib.quant import SmoothQuantConfig, W8A8Linear, quantize_, set_backend_, smooth_scales, w8a8_class
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


def test_w8a8_reference_keeps_the_simulated_numbers():
    """The reference backend computes what the former float simulation computed: the symmetric
    per-channel RTN weight times the fake-quantized activations, bit for bit."""
    from shrinklib.quant import quantize_rtn

    lin, x = nn.Linear(40, 12), torch.randn(5, 40)
    for gran in ("per_token", "per_tensor"):
        layer = W8A8Linear.from_linear(lin, 8, 8, gran)
        xq = quantize_activations_per_token(x if gran == "per_token" else x.reshape(1, -1), 8).reshape(x.shape)
        assert torch.equal(layer(x), torch.nn.functional.linear(xq, quantize_rtn(lin.weight.data, 8, None, True), lin.bias))


@pytest.mark.parametrize("gran", ["per_token", "per_tensor"])
def test_w8a8_int_kernel_equals_the_reference(gran):
    ids = random_ids(4, 16)
    model = make_picollama()
    quantize_(model, SmoothQuantConfig(alpha=0.5, act_granularity=gran), ids, progress=False)
    kernel = set_backend_(copy.deepcopy(model), "int")
    assert {type(m) for m in kernel.modules() if isinstance(m, W8A8Linear)} == {w8a8_class("int")}
    lin = next(m for m in model.modules() if isinstance(m, W8A8Linear))
    k_lin = w8a8_class("int").from_w8a8(lin)
    assert torch.equal(k_lin.wq, lin.wq) and torch.equal(k_lin.w_scale, lin.w_scale)
    x = torch.randn(7, lin.in_features)
    bound = x.abs() @ lin.dequantized_weight().abs().T
    assert ((k_lin(x) - lin(x)).abs() <= 1e-5 * bound + 1e-6).all()
    ref, out = model(ids).logits, kernel(ids).logits
    assert (out - ref).norm() <= 0.01 * ref.norm()
    assert torch.equal(out[:, -1].argmax(-1), ref[:, -1].argmax(-1))
    back = set_backend_(kernel, "reference")
    assert torch.equal(back(ids).logits, ref)  # moving between backends loses nothing
    with pytest.raises(ValueError, match="W8A8"):
        set_backend_(back, "lut")


def test_smoothquant_onto_the_kernel():
    ids = random_ids(4, 16)
    a, b = make_picollama(), make_picollama()
    quantize_(a, SmoothQuantConfig(), ids, progress=False, backend="int")
    quantize_(b, SmoothQuantConfig(), ids, progress=False)
    assert torch.equal(a(ids).logits, set_backend_(b, "int")(ids).logits)
