"""Every compiled kernel against its pure-PyTorch reference, on every SIMD path, and bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from shrinklib import kernels as K
from shrinklib.kernels import modules as Mo
from shrinklib.kernels import pack as P
from shrinklib.kernels import reference as R
from tests.common import make_picollama, random_ids

PATHS = K.simd_paths()
# (out, in, group): odd sizes, in not a multiple of the group or of the 32-code block,
# one group per row (group >= in), SmolLM2's 576 with g64 and g96.
SHAPES = [(33, 100, 32), (7, 64, 64), (64, 576, 64), (5, 37, 128), (31, 200, 96), (40, 300, 1000), (1, 1, 32)]


def random_codes(N, Kf, bits, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = -(-Kf // g)
    q = torch.randint(0, 2**bits, (N, Kf), dtype=torch.uint8, generator=gen)
    s = torch.rand(N, G, generator=gen) * 0.1 + 0.01
    z = torch.rand(N, G, generator=gen) * (2**bits - 1)
    return q, s, z


def close(y, ref, x, W):
    """Float tolerance: float32 kernels sum in another order than the float64 reference; the
    rounding error of a K-term dot product is below ~K·2⁻²⁴·Σ|x||w| and in practice far
    less, so 1e-5 of the magnitude bound Σ|x||w| (plus 1e-6) is a safe, still strict, bound."""
    bound = x.abs().double() @ W.abs().double().T
    assert ((y.double() - ref.double()).abs() <= 1e-5 * bound + 1e-6).all(), (y - ref).abs().max()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,Kf,g", SHAPES)
@pytest.mark.parametrize("bits", K.INT_BITS)
def test_int_matmul_matches_reference(path, N, Kf, g, bits):
    q, s, z = random_codes(N, Kf, bits, g)
    w = K.pack_int(q, s, z, bits, g)
    assert torch.equal(P.unpack_int(w), q)  # packing is lossless
    W = R.dequantize(w)
    with K.use_simd(path):
        torch.testing.assert_close(K.dequantize(w), W, rtol=1e-6, atol=1e-6)  # one fma per weight
        for M in (1, 3, 4, 9, 70):  # the GEMV (rows one by one, 4-row blocks); tiles and the BLAS above 4 rows
            x = torch.randn(M, Kf, generator=torch.Generator().manual_seed(M))
            close(K.int_matmul(x, w), R.int_matmul(x, w), x, W)


@pytest.mark.parametrize("path", PATHS)
def test_many_rows_take_the_whole_dequantized_weight(path):
    """Above a mebibyte of x, the int, codebook and 2:4 kernels dequantize the whole weight into a
    reused buffer and call the BLAS once (below it, tiles of 64 output rows): equal to the reference,
    twice in a row (the buffer is reused) and for a smaller weight after a larger one."""
    with K.use_simd(path):
        for N, Kf, g in [(130, 300, 32), (33, 200, 64)]:
            x = torch.randn(1100, Kf, generator=torch.Generator().manual_seed(N))  # 1.3 and 0.9 MB of x
            q, s, z = random_codes(N, Kf, 4, g)
            for w in (K.pack_int(q, s, z, 4, g), K.pack_codebook(q, s, "nf4", g)):
                for _ in range(2):
                    close(K.int_matmul(x, w), R.int_matmul(x, w), x, R.dequantize(w))
            W, mask = random_24(N, Kf)
            w = K.pack_sparse24(W, mask)
            close(K.sparse24_matmul(x, w), R.sparse24_matmul(x, w), x, W * mask)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", K.INT_BITS)
def test_int_matmul_exact_before_scaling(path, bits):
    """Integer x, unit scales, zero zeros: every partial sum is an integer < 2^24, so exact."""
    q, _, _ = random_codes(29, 161, bits, 64)
    w = K.pack_int(q, torch.ones(29, 3), torch.zeros(29, 3), bits, 64)
    x = torch.randint(-8, 9, (2, 161)).float()
    with K.use_simd(path):
        assert torch.equal(K.int_matmul(x, w), (x.long() @ q.long().T).float())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_codebook_matches_reference(path, name):
    for N, Kf, g in SHAPES[:4]:
        W0 = torch.randn(N, Kf)
        q, s = Mo.codebook_codes(W0, P.CODEBOOKS[name], g)
        w = K.pack_codebook(q, s, name, g)
        W = R.dequantize(w)
        x = torch.randn(2, Kf)
        with K.use_simd(path):
            torch.testing.assert_close(K.dequantize(w), W, rtol=1e-6, atol=1e-6)
            close(K.int_matmul(x, w), R.int_matmul(x, w), x, W)
        assert (W - W0).abs().max() <= s.max() * 0.25  # codebook gaps are at most 1/2 wide (absmax units)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,Kf,g", SHAPES)
@pytest.mark.parametrize("bits", K.LUT_BITS)
def test_lut_gemv_matches_reference(path, N, Kf, g, bits):
    q, s, z = random_codes(N, Kf, bits, g, seed=bits)
    w = K.pack_lut(q, s, z, bits, g)
    assert torch.equal(P.unpack_lut(w), q)
    W = R.dequantize(K.pack_int(q, s, z, 8, g))
    x = torch.randn(2, Kf, generator=torch.Generator().manual_seed(N))
    with K.use_simd(path):
        close(K.lut_gemv(x, w), R.lut_gemv(x, w), x, W)  # identical int8 tables, exact integer sums


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits", K.LUT_BITS)
def test_lut_gemv_exact_integer_path(path, bits):
    """x built so each 64-input chunk's largest table entry is exactly 127: the table scale is
    1, the int8 tables equal the float ones, and with unit scales the result is an exact integer."""
    N, Kf = 45, 192
    q, _, _ = random_codes(N, Kf, bits, 64)
    x = torch.randint(-31, 32, (1, Kf)).float()
    x[0, ::64], x[0, 1::64], x[0, 2::64], x[0, 3::64] = 31, 31, 31, 34
    w = K.pack_lut(q, torch.ones(N, 3), torch.zeros(N, 3), bits, 64)
    with K.use_simd(path):
        assert torch.equal(K.lut_gemv(x, w), (x.long() @ q.long().T).float())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,Kf,g", SHAPES)
@pytest.mark.parametrize("bits", K.LUT_BITS)
def test_lut_dequantize_matches_reference(path, N, Kf, g, bits):
    """The kernel rounds s*q - s*z once (one fma), the reference computes it in float64 and rounds:
    s*q is exact in float64 (24 x 4 bits), so the two differ by at most the double rounding, 1 ulp
    of |W| <= 1.6 here, far inside rtol = atol = 1e-6 (in practice they are bit-identical)."""
    q, s, z = random_codes(N, Kf, bits, g, seed=bits)
    w = K.pack_lut(q, s, z, bits, g)
    with K.use_simd(path):
        W = K.lut_dequantize(w)
    assert W.shape == (N, Kf) and W.is_contiguous()
    torch.testing.assert_close(W, R.lut_dequantize(w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(R.lut_dequantize(w), R.dequantize(K.pack_int(q, s, z, 8, g)), rtol=1e-6, atol=1e-6)


def test_lut_error_is_int8_table_rounding():
    """Against the exact float product the LUT's only error is the int8 rounding of the tables."""
    q, s, z = random_codes(64, 576, 4, 64)
    x = torch.randn(1, 576)
    exact = R.int_matmul(x, K.pack_int(q, s, z, 4, 64))
    rel = (K.lut_gemv(x, K.pack_lut(q, s, z, 4, 64)) - exact).norm() / exact.norm()
    assert rel < 0.05


@pytest.mark.parametrize("path", PATHS)
def test_int8_gemm_bit_exact(path):
    for M, N, Kf in [(1, 33, 100), (5, 7, 130), (3, 64, 576), (2, 3, 1)]:
        xq = torch.randint(-127, 128, (M, Kf), dtype=torch.int8)
        wq = torch.randint(-128, 128, (N, Kf), dtype=torch.int8)
        with K.use_simd(path):
            assert torch.equal(K.int8_gemm(xq, wq), R.int8_gemm(xq, wq))
    x = torch.randint(-127, 128, (2, 1000), dtype=torch.int8)  # AVX-512's 64-byte blocks and a 40-byte tail
    w = torch.randint(-128, 128, (3, 1000), dtype=torch.int8)
    with K.use_simd(path):
        assert torch.equal(K.int8_gemm(x, w), R.int8_gemm(x, w))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("a_bits,per_token", [(8, True), (8, False), (6, True)])
def test_w8a8_linear_equals_its_reference_bit_for_bit(path, a_bits, per_token):
    """The same activation codes (the same float operations), an exact int32 product, the same
    float operations after it: bit-identical, on odd shapes and 1 to 9 rows."""
    for M, N, Kf in [(1, 33, 100), (5, 7, 130), (9, 64, 576), (2, 3, 1)]:
        with torch.random.fork_rng():  # seeded weights: the error bound below is checked on the same layer every run
            torch.manual_seed(N * 1000 + Kf)
            lin = nn.Linear(Kf, N)
        layer = Mo.W8A8IntLinear.from_linear(lin, a_bits=a_bits, act_granularity="per_token" if per_token else "per_tensor")
        x = torch.randn(M, Kf, generator=torch.Generator().manual_seed(M)) * 3
        with K.use_simd(path):
            y = layer(x)
        assert torch.equal(y, R.w8a8_linear(x, layer.wq, layer.w_scale, layer.bias, a_bits, per_token))
        assert (y - lin(x)).abs().max() < 0.05 * lin(x).abs().max()


def random_24(N, Kf, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, -(-Kf // 4), 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(N, keep.shape[1], 4, dtype=torch.bool).scatter(2, keep, True).reshape(N, -1)[:, :Kf]
    return torch.randn(N, Kf, generator=gen), mask


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("N,Kf", [(33, 100), (7, 64), (64, 576), (5, 37), (1, 3)])
def test_sparse24_matches_reference(path, N, Kf):
    W, mask = random_24(N, Kf)
    w = K.pack_sparse24(W, mask)
    assert torch.equal(R.sparse24_dense(w), W * mask)
    with K.use_simd(path):
        for M in (1, 3, 9, 17, 33, 70):  # the GEMV kernel, x transposed (2 to 32 rows), the dense weight and the BLAS
            x = torch.randn(M, Kf, generator=torch.Generator().manual_seed(M))
            close(K.sparse24_matmul(x, w), R.sparse24_matmul(x, w), x, W * mask)


@pytest.mark.parametrize("N,Kf", [(33, 100), (7, 64), (64, 576), (5, 37), (1, 3)])
def test_sparse24_dense_matches_reference(N, Kf):
    """A scatter of the stored values (one portable path): exact."""
    W, mask = random_24(N, Kf)
    w = K.pack_sparse24(W, mask)
    assert torch.equal(K.sparse24_dense(w), R.sparse24_dense(w))


def test_bad_input_raises_clear_errors():
    q, s, z = random_codes(8, 64, 4, 32)
    w = K.pack_int(q, s, z, 4, 32)
    with pytest.raises(ValueError, match="bits"):
        K.pack_int(q, s, z, 5, 32)
    with pytest.raises(ValueError, match="bits"):
        K.pack_lut(q, s, z, 8, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        K.pack_int(q, torch.rand(8, 4), torch.rand(8, 4), 4, 16)
    with pytest.raises(TypeError, match="uint8"):
        K.pack_int(q.int(), s, z, 4, 32)
    with pytest.raises(TypeError, match="float32"):
        K.pack_int(q, s.double(), z, 4, 32)
    with pytest.raises(ValueError, match="shape"):
        K.pack_int(q, s[:, :1], z, 4, 32)
    with pytest.raises(ValueError, match="code"):
        K.pack_int(q, s, z, 2, 32)
    with pytest.raises(TypeError, match="float32"):
        K.int_matmul(torch.randn(1, 64).double(), w)
    with pytest.raises(ValueError, match="shape"):
        K.int_matmul(torch.randn(1, 63), w)
    with pytest.raises(ValueError, match="CPU"):
        K.int_matmul(torch.randn(1, 64, device="meta"), w)
    with pytest.raises(TypeError, match="int8"):
        K.int8_gemm(torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.int8))
    with pytest.raises(ValueError, match="disagree"):
        K.int8_gemm(torch.zeros(1, 4, dtype=torch.int8), torch.zeros(1, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="2:4"):
        K.pack_sparse24(torch.ones(2, 8))
    with pytest.raises(ValueError, match="not available"):
        with K.use_simd("neon"):
            pass
    with pytest.raises(RuntimeError, match="packed"):  # the C++ checks back the Python ones
        torch.ops.shrink.qmatmul(torch.randn(1, 64), w.packed[:, :-1].contiguous(), w.scales, w.szeros, w.codebook, 4, 32)
    wl = K.pack_lut(q, s, z, 4, 32)
    with pytest.raises(RuntimeError, match="packed"):
        K.lut_dequantize(P.PackedLUT(wl.packed[:, :-1].contiguous(), wl.scales, wl.szeros, 4, 32, 64, 8))
    with pytest.raises(RuntimeError, match="bits 1 to 4"):
        K.lut_dequantize(P.PackedLUT(wl.packed, wl.scales, wl.szeros, 5, 32, 64, 8))
    with pytest.raises(RuntimeError, match="N=40"):
        K.lut_dequantize(P.PackedLUT(wl.packed, wl.scales, wl.szeros, 4, 32, 64, 40))
    with pytest.raises(RuntimeError, match="in_features"):
        K.lut_dequantize(P.PackedLUT(wl.packed, wl.scales, wl.szeros, 4, 32, 20, 8))
    w24 = K.pack_sparse24(*random_24(8, 64))
    with pytest.raises(RuntimeError, match="disagree"):
        K.sparse24_dense(P.Packed24(w24.values, w24.index[:, :-1].contiguous(), 64, 8))
    with pytest.raises(RuntimeError, match="in_features"):
        K.sparse24_dense(P.Packed24(w24.values, w24.index, 40, 8))


def test_scales_are_stored_in_float16():
    """Both layouts store scales and s*z as float16 (0.5 bit per weight at g64); values float16
    cannot hold are refused at packing, and the C++ checks refuse float32 scales."""
    q, s, z = random_codes(40, 128, 4, 64)
    for w in (K.pack_int(q, s, z, 4, 64), K.pack_lut(q, s, z, 4, 64)):
        assert w.scales.dtype == w.szeros.dtype == torch.float16
    torch.testing.assert_close(K.pack_int(q, s, z, 4, 64).szeros, (s * z).half(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="float16"):
        K.pack_lut(q, s * 1e5, z, 4, 64)
    w = K.pack_int(q, s, z, 4, 64)
    with pytest.raises(RuntimeError, match="scales must be Half"):
        torch.ops.shrink.qmatmul(torch.randn(1, 128), w.packed, w.scales.float(), w.szeros, w.codebook, 4, 64)


def test_build_key_changes_with_sources(monkeypatch, tmp_path):
    key = K.build_key()
    src = tmp_path / "x.cpp"
    src.write_text("// changed")
    monkeypatch.setattr(K, "SOURCES", K.SOURCES + [src])
    assert K.build_key() != key


@pytest.mark.parametrize("fmt", list(Mo.FORMATS))
def test_model_runs_on_kernels(fmt):
    model = make_picollama(0, hidden=64, intermediate=96)
    ids = random_ids(2, 12, 128, seed=0)
    ref = model(ids).logits
    Mo.replace_linears_(model, fmt, lm_head=True)
    n_kernel = sum(isinstance(m, (Mo.IntLinear, Mo.LUTLinear, Mo.W8A8IntLinear)) for m in model.modules())
    assert n_kernel == 2 * 7 + 1
    out = model(ids).logits  # 24 rows: the dequantize + GEMM path of IntLinear and LUTLinear
    one = model(ids[:1, :3]).logits  # 3 rows: the GEMV / LUT kernels
    # float formats give the same rows whatever the batch; LUT and W8A8 quantize activations
    # (int8 tables / int8 rows), so batch-dependent float noise upstream may flip a rounding
    tol = 1e-4 if fmt.startswith(("int", "nf", "fp")) else 0.05 * ref.abs().max().item()
    torch.testing.assert_close(one, out[:1, :3], rtol=1e-4, atol=tol)
    bits = {"int2": 2, "lut2": 2, "int3": 3}.get(fmt, 4)
    assert (out - ref).abs().mean() < 0.5 * 2.0 ** (4 - bits) * ref.abs().mean()


def test_sparse24_module():
    lin = nn.Linear(40, 9)
    W, mask = random_24(9, 40)
    lin.weight.data = W * mask
    layer = Mo.Sparse24Linear.from_linear(lin, mask)
    for M in (3, 11):  # the GEMV kernel, then densified tiles and the BLAS
        x = torch.randn(M, 40)
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(11, 40, requires_grad=True)  # a gradient through x: F.linear on the dense weight
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, (W * mask).sum(0).expand(11, 40), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_lut_module_switches_to_gemm_above_threshold(monkeypatch, bf16):
    """Few rows go through the LUT kernel; many rows through lut_dequantize + F.linear (a float32
    GEMM: a tight tolerance against the dequantized reference; or, where the CPU multiplies
    bfloat16 natively, a bfloat16 GEMM: x and W rounded to 8 significant bits, each product off by
    at most ~2·2⁻⁹ of |x||w|, so checked at 1% of Σ|x||w|; both paths run on every CPU); a weight
    over DEQUANT_MAX_BYTES stays on the LUT kernel at any batch."""
    monkeypatch.setattr(Mo, "LUT_PREFILL_BF16", bf16)
    lin = nn.Linear(100, 33)
    layer = Mo.LUTLinear.from_linear(lin, 3, 32)
    w = P.PackedLUT(layer.packed, layer.scales, layer.szeros, 3, 32, 100, 33)
    few, many = torch.randn(2, Mo.LUT_GEMV_MAX_ROWS // 2, 100), torch.randn(3, Mo.LUT_GEMV_MAX_ROWS, 100)  # at, above
    torch.testing.assert_close(layer(few), K.lut_gemv(few, w) + lin.bias, rtol=0, atol=0)
    ref = many @ R.lut_dequantize(w).T + lin.bias
    if bf16:
        bound = many.abs() @ R.lut_dequantize(w).abs().T + lin.bias.abs()
        assert layer(many).dtype == torch.float32 and ((layer(many) - ref).abs() <= 0.01 * bound).all()
    else:
        torch.testing.assert_close(layer(many), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(Mo, "DEQUANT_MAX_BYTES", 0)
    torch.testing.assert_close(layer(many), K.lut_gemv(many, w) + lin.bias, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int4", "int3", "nf4"])
def test_int_layers_take_any_number_of_rows(fmt):
    """An int or codebook layer runs every batch on its kernel (the GEMV, or tiles of the dequantized
    weight and the BLAS): equal to F.linear on its dequantized weight for 1 to 51 rows of odd shapes;
    with a gradient through x it runs F.linear itself, and the gradient is the weight's column sums."""
    torch.manual_seed(0)
    for n, k in [(70, 100), (33, 200), (40, 37)]:
        layer = Mo.FORMATS[fmt](nn.Linear(k, n))
        W = layer.dequantized_weight()
        for shape in [(1, k), (4, k), (5, k), (3, 17, k)]:
            x = torch.randn(shape)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, W, layer.bias), rtol=1e-5, atol=1e-5)
        x = torch.randn(20, k, requires_grad=True)
        layer(x).sum().backward()
        torch.testing.assert_close(x.grad, W.sum(0).expand(20, k), rtol=1e-5, atol=1e-5)


def test_many_rows_dequantize_into_the_reused_buffer():
    """Above the GEMV threshold a LUT layer dequantizes into one reused float32 buffer and calls the
    GEMM: equal to F.linear on its dequantized weight, layer after layer of different (odd) shapes,
    a smaller one after a larger one included (the buffer is not shrunk, only viewed)."""
    torch.manual_seed(0)
    layers = [Mo.rtn_layer("lut", 3)(nn.Linear(k, n)) for n, k in [(70, 100), (33, 200), (40, 37)]]
    for _ in range(2):
        for layer in layers:
            x = torch.randn(3, 17, layer.in_features)
            ref = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
            if Mo.LUT_PREFILL_BF16:
                assert ((layer(x) - ref).abs() <= 0.01 * (x.abs() @ layer.dequantized_weight().abs().T + layer.bias.abs())).all()
            else:
                torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert K.scratch_bytes() >= 4 * 70 * 100  # the largest (out, in) asked for
    big = K.scratch(1, 1)
    assert big.shape == (1, 1) and K.scratch_bytes() >= 4 * 70 * 100  # viewed, never shrunk
    a, b = layers[0], layers[1]  # a gradient through x keeps its own weight, not the buffer
    x = torch.randn(20, a.in_features, requires_grad=True)
    y = a(x)
    b(torch.randn(20, b.in_features))  # overwrites the buffer between a's forward and backward
    y.sum().backward()
    Wa = a.dequantized_weight()  # dL/dx = Σ_o W[o, :]; a bfloat16 GEMM rounds each W to 8 significant bits
    bound = 2**-8 * Wa.abs().sum(0) if Mo.LUT_PREFILL_BF16 else 1e-5
    assert ((x.grad - Wa.sum(0)).abs() <= bound).all()


def test_forced_simd_level_names_the_path_or_refuses():
    assert K.forced_simd_level(None, 2) == 2 and K.forced_simd_level("", 1) == 1
    assert K.forced_simd_level("avx2", 2) == 1 and K.forced_simd_level("scalar", 2) == 0
    assert K.forced_simd_level("avx512-vnni", 2) == 2
    with pytest.raises(ValueError, match="not a SIMD path; choose from avx512-vnni, avx2, scalar"):
        K.forced_simd_level("neon", 2)
    with pytest.raises(ValueError, match="SHRINKLIB_SIMD=avx512-vnni: this CPU lacks it \\(it runs avx2, scalar\\)"):
        K.forced_simd_level("avx512-vnni", 1)


def test_tests_cover_every_path_of_this_run():
    """PATHS (the parametrization above) is every path this run may use; without SHRINKLIB_SIMD,
    every path the CPU has (AVX-512/VNNI too, where present)."""
    assert PATHS == K.simd_paths() and PATHS[-1] == "scalar" and K.simd_path() == PATHS[0]
    if not os.environ.get(K.SIMD_ENV):
        assert len(PATHS) == torch.ops.shrink.simd_max_level() + 1


def test_simd_env_forces_a_path_for_the_whole_run():
    """In a fresh process (the path is read once, at import): the scalar path every CPU has."""
    code = "import json; from shrinklib import kernels as K; print(json.dumps([K.simd_path(), K.simd_paths()]))"
    env = {**os.environ, K.SIMD_ENV: "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["scalar", ["scalar"]]
    env[K.SIMD_ENV] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "SHRINKLIB_SIMD='sse9' is not a SIMD path" in bad.stderr


def _op_samples() -> dict:
    """Inputs of every tensor operator: odd shapes, a 3-D x, one sample per layout."""
    q, s, z = random_codes(33, 100, 4, 32)
    w, wl = K.pack_int(q, s, z, 4, 32), K.pack_lut(q, s, z, 4, 32)
    qn, sn = Mo.codebook_codes(torch.randn(33, 100), K.NF4, 32)
    wn = K.pack_codebook(qn, sn, "nf4", 32)
    W24, mask = random_24(9, 40)
    w24 = K.pack_sparse24(W24, mask)
    wq = torch.randint(-127, 128, (9, 70), dtype=torch.int8)
    x = torch.randn(2, 3, 100)
    return {
        "qmatmul": [(x, w.packed, w.scales, w.szeros, w.codebook, 4, 32), (x[0], wn.packed, wn.scales, wn.szeros, wn.codebook, 4, 32)],
        "qdequant": [(w.packed, w.scales, w.szeros, w.codebook, 4, 32, 100)],
        "lut_gemv": [(x, wl.packed, wl.scales, wl.szeros, 4, 32, 33)],
        "lut_dequant": [(wl.packed, wl.scales, wl.szeros, 4, 32, 33, 100)],
        "int8_gemm": [(torch.randint(-127, 128, (5, 70), dtype=torch.int8), wq)],
        "w8a8_linear": [(torch.randn(2, 4, 70), wq, wq.sum(1, dtype=torch.int32), torch.rand(9) + 0.1, 127, True),
                        (torch.randn(3, 70), wq, wq.sum(1, dtype=torch.int32), torch.rand(9) + 0.1, 31, False)],
        "sparse24_dense": [(w24.values, w24.index, 40)],
        "sparse24_matmul": [(torch.randn(2, 5, 40), w24.values, w24.index)],
    }


@pytest.mark.parametrize("name", sorted(_op_samples()))
def test_custom_ops_pass_opcheck(name):
    """Each operator's schema, fake (meta) implementation and tracing agree with its CPU kernel."""
    for args in _op_samples()[name]:
        torch.library.opcheck(getattr(K.ops(), name).default, args)


def test_import_builds_nothing_and_kernels_need_no_models(tmp_path):
    """Importing the kernels (and the quantization package) compiles nothing; the first use does.
    The kernel package imports nothing of the model-loading module."""
    import ast
    from pathlib import Path

    code = ("import torch, shrinklib.kernels, shrinklib.kernels.modules, shrinklib.quant; "
            "print(hasattr(torch.ops.shrink, 'qmatmul'))")
    env = {**os.environ, "SHRINKLIB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False" and not (tmp_path / "kernels").exists()
    for src in Path(K.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "models" not in (node.module or "").split("."), (src.name, node.module)


def test_bf16_prefill_only_where_native(monkeypatch):
    """bfloat16 prefill is chosen at run time: never when torch runs (or is forced to) AVX2."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not Mo.native_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert Mo.native_bf16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
