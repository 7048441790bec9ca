"""Microscaling formats (MXFP4, MXFP8, NVFP4): the OCP spec's element tables and conversion rule,
hand-computed blocks, torch's float8_e4m3fn, one representation on every backend."""

import copy

import pytest
import torch

from shrinklib.evaluate import model_size_bytes
from shrinklib.quant import MXConfig, QuantLinear, dequantize, quantize, quantize_, set_backend_
from shrinklib.quant.checkpoint import load_quantized, save_quantized
from shrinklib.quant.mx import (E2M1, E4M3, bits_per_weight, decode_e8m0, decode_float, encode_e8m0, encode_float,
                                mx_block_scales, quantize_mx, stored_bits_per_weight)

from common import make_picollama, random_ids


def test_e2m1_codes_are_the_ocp_table():
    # OCP MX v1.0 Sec. 5.3.3: E2M1, bias 1: 0b0001 is the subnormal 0.5, 0b0010 = 1.0 (min normal), 0b0111 = 6.0 (max)
    assert E2M1.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def test_e4m3_codes_are_the_ofp8_table_and_torchs():
    # OFP8 E4M3: bias 7, max normal S.1111.110 = 448, min normal 2^-6, min subnormal 2^-9, S.1111.111 is NaN, no inf
    assert E4M3[0x7E] == 448 and E4M3[0x08] == 2.0**-6 and E4M3[0x01] == 2.0**-9 and E4M3[0x80] == 0
    assert E4M3[0x7F].isnan() and E4M3[0xFF].isnan() and not E4M3.isinf().any()
    codes = torch.arange(256, dtype=torch.uint8)
    theirs = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(E4M3.isnan(), theirs.isnan()) and torch.equal(E4M3[~E4M3.isnan()], theirs[~theirs.isnan()])


def test_e4m3_encoding_equals_torchs_cast():
    x = torch.cat([torch.randn(20_000) * 40, torch.randn(2000) * 0.01, (E4M3[:0x7F] + E4M3[1:0x80]) / 2])  # ties too
    x = x[x.abs() <= 448]
    assert torch.equal(encode_float(x, E4M3), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_e2m1_rounds_to_nearest_ties_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.2, -5.0, 0.3])
    # ties go to the code with an even last bit: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    assert encode_float(x, E2M1).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 7, 8, 14, 1]
    with pytest.raises(ValueError, match="NaN"):
        encode_float(torch.tensor([float("nan")]), E2M1)


def test_e8m0_scale_rule_of_the_spec():
    # X = 2^(floor(log2 amax) - emax_elem), emax = 2 (E2M1), 8 (E4M3)
    amax = torch.tensor([6.0, 8.0, 7.99, 20.0, 0.1, 448.0, 0.0])
    assert mx_block_scales(amax, 2).tolist() == [1.0, 2.0, 1.0, 4.0, 2.0**-6, 2.0**6, 2.0**-127]
    assert mx_block_scales(torch.tensor([448.0, 1.0]), 8).tolist() == [1.0, 2.0**-8]
    assert encode_e8m0(torch.tensor([-127, 0, 127])).tolist() == [0, 127, 254]
    assert decode_e8m0(torch.tensor([0, 127, 254], dtype=torch.uint8)).tolist() == [2.0**-127, 1.0, 2.0**127]
    with pytest.raises(ValueError, match="NaN"):
        decode_e8m0(torch.tensor([255], dtype=torch.uint8))


def test_one_mxfp4_block_by_hand():
    v = torch.tensor([[20.0, 3.0, -7.0, 1.0] + [0.0] * 28])  # one block of 32: X = 4
    qt = quantize_mx(v, "mxfp4")
    assert qt.scales.tolist() == [[4.0]] and qt.q[0, :4].tolist() == [6, 2, 12, 0]
    assert dequantize(qt)[0, :4].tolist() == [16.0, 4.0, -8.0, 0.0]


def test_one_nvfp4_block_by_hand():
    # tensor amax 12: global = 12 / (448 · 6); block 1 amax 12 -> scale 12 / 6 / global = 448 (exact in E4M3)
    # block 2 amax 3 -> 112 (E4M3: 1.75 · 2^6); decoded: global · scale · element
    W = torch.tensor([[12.0, -6.0, 3.0] + [0.0] * 13 + [3.0, -1.5, 0.75] + [0.0] * 13])
    qt = quantize_mx(W, "nvfp4")
    g = torch.tensor(12.0 / (448 * 6), dtype=torch.float32).item()
    assert qt.global_scale == g and qt.scales.tolist() == [[448.0, 112.0]]
    # 6 = 0b0111, -3 = 0b1101, 1.5 = 0b0011 in both blocks (block 2: 3 / (112 · global) = 6)
    assert qt.q[0, :3].tolist() == [7, 13, 3] and qt.q[0, 16:19].tolist() == [7, 13, 3]
    assert torch.allclose(dequantize(qt), W, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
@pytest.mark.parametrize("shape, block", [((7, 96), None), ((5, 50), None), ((3, 40), 16), ((4, 33), 8)])
def test_decode_is_exact_and_the_error_bounded(fmt, shape, block):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=gen) * torch.logspace(-3, 1, shape[1])  # blocks of very different ranges
    qt = quantize(W, fmt, group_size=block)
    codes, _, _ = {"mxfp4": (E2M1, 4, 2), "mxfp8": (E4M3, 8, 8), "nvfp4": (E2M1, 4, 2)}[fmt]
    g = qt.group_size
    slow = torch.stack([torch.stack([decode_float(qt.q[o, i], codes) * qt.scales[o, i // g] for i in range(shape[1])])
                        for o in range(shape[0])]) * (qt.global_scale if fmt == "nvfp4" else 1.0)
    assert torch.equal(dequantize(qt), slow)  # element by element, as the spec writes it
    err = (W - dequantize(qt)).abs()
    # a block's largest magnitude lands in [4, 8) (E2M1) or [256, 512) (E4M3) times X: clipping to 6 (448) costs
    # at most 1/4 (1/8) of the block's amax, more than half a step of the top binade (1/4, 1/16)
    rel = 0.125 if fmt == "mxfp8" else 0.25
    amax = torch.stack([W[:, i // g * g:(i // g + 1) * g].abs().amax(1) for i in range(shape[1])], 1)  # (out, in)
    assert (err <= rel * amax * (1 + 1e-6)).all()


@pytest.mark.parametrize("fmt, bits", [("mxfp4", 4.25), ("mxfp8", 8.25), ("nvfp4", 4.5)])
def test_bits_per_weight_are_what_a_layer_stores(fmt, bits):
    lin = QuantLinear(quantize(torch.randn(64, 256), fmt))
    assert bits_per_weight(fmt, {"nvfp4": 16}.get(fmt, 32)) == bits
    assert stored_bits_per_weight(lin) == bits + (32 / (64 * 256) if fmt == "nvfp4" else 0)
    assert stored_bits_per_weight(QuantLinear(quantize(torch.randn(64, 256), "int", 4, 64))) == 4.5


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
def test_quantize_runs_every_format_on_the_reference_and_saves(fmt, tmp_path):
    model, ids = make_picollama(), random_ids()
    ref = copy.deepcopy(model)
    quantize_(model, MXConfig(fmt), progress=False)
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert layer.fmt == fmt and layer.scales.dtype == torch.uint8
    with torch.no_grad():
        out, base = model(ids).logits, ref(ids).logits
    assert torch.isfinite(out).all() and (out - base).abs().mean() < (0.5 if fmt != "mxfp8" else 0.05) * base.abs().mean()
    assert model_size_bytes(model) < model_size_bytes(ref)
    save_quantized(model, tmp_path / "q")
    again = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, out)


def test_kernel_backends_refuse_microscaling_formats():
    model = make_picollama()
    quantize_(model, MXConfig("nvfp4"), progress=False)
    for backend in ("int", "lut"):
        with pytest.raises(ValueError, match="nvfp4"):
            set_backend_(copy.deepcopy(model), backend)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown fmt"):
        MXConfig("mxfp6")
    with pytest.raises(ValueError, match="block_size"):
        MXConfig("mxfp4", block_size=0)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_round_to_element_equals_the_table_search(fmt):
    """The arithmetic rounding GPTQ's column loop uses against encode_float then decode_float: random
    values over many binades, every exact midpoint between neighbouring elements (ties to even), zeros
    of both signs, values beyond the largest normal (saturation) and subnormals."""
    from shrinklib.quant.mx import ELEMENTS, decode_float, encode_float, round_to_element

    codes = ELEMENTS[fmt][0]
    mags = codes[: len(codes) // 2]
    mags = mags[~mags.isnan()]
    mids = (mags[1:] + mags[:-1]) / 2
    x = torch.cat([torch.randn(4000) * 10.0 ** torch.randint(-4, 4, (4000,)), mids, -mids, mags, -mags,
                   torch.tensor([0.0, -0.0, 1e9, -1e9, 1e-30])])
    ref = decode_float(encode_float(x, codes), codes)
    got = round_to_element(x, fmt)
    assert torch.equal(got, ref) and torch.equal(got.signbit(), ref.signbit())
