"""Number formats and RTN: published value tables, invariants, short last groups, packing."""

import pytest
import torch

from shrinklib.quant import (QuantLinear, RTNConfig, TABLES, dequantize, pack_codes, quantize, quantize_,
                             quantize_rtn, quantize_weight, unpack_codes)
from shrinklib.quant.formats import dequantize_codes, table

from common import make_picollama, random_ids


def test_fp4_e2m1_table_matches_the_ocp_spec():
    expected = sorted({s * v for s in (1, -1) for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6)})
    assert TABLES["fp4"].tolist() == expected


def test_nf4_table_matches_qlora():
    nf4 = TABLES["nf4"]
    assert len(nf4) == 16 and nf4[0] == -1 and nf4[-1] == 1 and (nf4 == 0).sum() == 1
    assert torch.all(nf4[1:] > nf4[:-1])
    assert nf4[8].item() == pytest.approx(0.07958029955625534) and nf4[1].item() == pytest.approx(-0.6961928009986877)


@pytest.mark.parametrize("fmt, dtype, top, count", [("fp8_e4m3", torch.float8_e4m3fn, 448.0, 253),
                                                    ("fp8_e5m2", torch.float8_e5m2, 57344.0, 247)])
def test_fp8_tables_match_torch_float8(fmt, dtype, top, count):
    values = TABLES[fmt]
    assert values.max().item() == top and len(values) == count  # finite values, +0 and -0 merged
    assert torch.equal(values.to(dtype).float(), values)  # every table value is representable
    x = torch.randn(10_000) * top / 8
    idx = torch.bucketize(x, (values[1:] + values[:-1]) / 2)
    ours, theirs = values[idx], x.to(dtype).float()
    assert (ours == theirs).float().mean() > 0.999  # ties (round-half-even) are the only difference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16, 24, 128, "tensor"])
def test_rtn_invariants(bits, symmetric, group_size):
    W = torch.randn(12, 72)  # 72 = 4×16 + 8 and 3×24; g128 > 72
    qt = quantize(W, "int", bits, group_size, symmetric)
    assert qt.q.dtype == torch.uint8 and int(qt.q.max()) <= 2**bits - 1
    Wq = dequantize(qt)
    assert torch.allclose(quantize_rtn(Wq, bits, group_size, symmetric), Wq, atol=1e-6)  # idempotent
    g = qt.group_size
    cols = [W.numel()] if group_size == "tensor" else [g] * (72 // g) + ([72 % g] if 72 % g else [])
    flat = Wq.reshape(1, -1) if group_size == "tensor" else Wq
    start = 0
    for n in cols:
        for row in flat[:, start:start + n]:
            assert row.unique().numel() <= 2**bits
        start += n
    if not symmetric and group_size != "tensor":
        # min-max grids keep each group's min and max up to the float16 storage of s and s·z:
        # each is rounded by at most 2⁻¹¹ relative, so min moves by ≤ 2⁻¹¹|min| and max by
        # ≤ 2⁻¹¹(|min| + (2^b - 1)·s) ≤ 2⁻¹¹·3·max|w|
        tol = 3 * 2**-11 * W.abs().amax(1)
        assert ((Wq.amax(1) - W.amax(1)).abs() <= tol).all() and ((Wq.amin(1) - W.amin(1)).abs() <= tol).all()


def test_rtn_error_bounded_by_half_a_step():
    W = torch.randn(6, 40)
    qt = quantize(W, "int", 4, 16, symmetric=False)
    step = qt.scales.repeat_interleave(16, 1)[:, :40]
    assert ((W - dequantize(qt)).abs() <= step / 2 + 1e-6).all()


def test_short_last_group_is_its_own_group():
    W = torch.randn(4, 576)
    q, s, z = quantize_weight(W, bits=4, group_size=128)
    assert s.shape == (4, 5) and z.shape == (4, 5)  # 4 groups of 128, one of 64
    alone = quantize_weight(W[:, 512:], bits=4, group_size=64)  # the last 64 columns on their own
    assert torch.equal(q[:, 512:], alone[0]) and torch.allclose(s[:, 4:], alone[1])


def test_kernel_layout_formula():
    W = torch.randn(8, 100)
    q, s, z = quantize_weight(W, bits=3, group_size=32)
    i = torch.arange(100)
    manual = s[:, i // 32] * (q.float() - z[:, i // 32])
    assert torch.equal(manual, dequantize_codes(q, s, z, 32))
    _, _, zs = quantize_weight(W, bits=3, group_size=32, symmetric=True)
    assert (zs == 4).all()


def test_hand_computed_asymmetric_example():
    qt = quantize(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]), "int", 2, None, symmetric=False)
    assert qt.scales.item() == pytest.approx(1.0) and qt.zeros.item() == pytest.approx(1.0)
    assert qt.q.tolist() == [[0, 1, 2, 3]]  # 0.5 rounds (half to even) to code 2, value 1.0 → error 0.5


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("d", [1, 7, 8, 13, 576])
def test_pack_roundtrip(bits, d):
    q = torch.randint(0, 2**bits, (5, d), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.shape == (5, -(-d * bits // 8))
    assert torch.equal(unpack_codes(packed, bits, d), q)


def test_pack_bit_order():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)  # 3-bit codes: 8 codes fill 3 bytes
    stream = "".join(f"{c:03b}"[::-1] for c in q[0].tolist())  # bit k of code i at stream bit 3i + k
    expected = [int(stream[8 * j:8 * j + 8][::-1], 2) for j in range(3)]
    assert pack_codes(q, 3)[0].tolist() == expected


def test_table_formats_pick_the_nearest_table_value():
    W = torch.randn(4, 64)
    for fmt in TABLES:
        values = table(fmt)  # the table scaled to largest magnitude 1: a group's scale is its absmax
        qt = quantize(W, fmt, group_size=32)
        x = W / qt.scales.repeat_interleave(32, 1)  # scaled to the table's range
        brute = (x[..., None] - values).abs().argmin(-1)  # slow reference: nearest by exhaustive search
        assert torch.equal(values[brute], values[qt.q.long()])
        assert x.abs().max() <= values.max() * (1 + 2**-11)  # the scale is stored in float16


def test_quantlinear_counts_packed_bytes_and_matches_fake_quant():
    from shrinklib.evaluate import model_size_bytes
    model, fake = make_picollama(), make_picollama()
    quantize_(model, RTNConfig(bits=4, group_size=16), progress=False)
    quantize_(fake, RTNConfig(bits=4, group_size=16), pack=False, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    ids = random_ids()
    torch.testing.assert_close(model(ids).logits, fake(ids).logits)
    lin_params = sum(m.in_features * m.out_features for m in layers)
    groups = sum(m.scales.numel() for m in layers)
    # 4-bit codes (half a byte) plus a float16 scale and a float16 s·z per group
    assert model_size_bytes(fake) - model_size_bytes(model) == lin_params * 4 - (lin_params // 2 + groups * 4)


def test_configs_validate():
    with pytest.raises(ValueError, match="bits"):
        RTNConfig(bits=9)
    with pytest.raises(ValueError, match="group_size"):
        RTNConfig(group_size=0)
    with pytest.raises(ValueError, match="fmt"):
        RTNConfig(fmt="int3")


def test_one_bit_zero_point_grid_is_each_groups_min_and_max():
    """T-MAC's 1-bit LUT layers take the 1-bit zero-point grid: two levels, the group's min and max."""
    from shrinklib.quant.formats import dequantize, quantize

    W = torch.tensor([[-1.0, 0.25, 0.5, 3.0], [2.0, 2.0, -2.0, 0.0]])
    qt = quantize(W, "int", 1, 4, symmetric=False)
    assert qt.q.tolist() == [[0, 0, 0, 1], [1, 1, 0, 0]]  # nearest of {min, max}; ties (0.0 on row 2) round half to even
    torch.testing.assert_close(dequantize(qt), torch.tensor([[-1.0, -1.0, -1.0, 3.0], [2.0, 2.0, -2.0, -2.0]]))
    with pytest.raises(ValueError, match="symmetric integer grids have 2..8 bits, got 1"):
        quantize(W, "int", 1, 4, symmetric=True)
