"""HQQ, GPTAQ and AutoRound-style learned rounding: closed forms, invariants and reduction checks."""

import copy

import pytest
import torch

from shrinklib.quant import (AutoRoundConfig, GPTAQConfig, HQQConfig, QuantLinear, autoround_quantize, dequantize,
                             gptaq_quantize, gptq_quantize, hqq_quantize, quantize, quantize_)
from shrinklib.quant.formats import dequantize_codes, grouped
from shrinklib.quant.hqq import hqq_zero_step, shrink_lp

from common import make_picollama, random_ids


def heavy_tailed(out=64, d=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((out, d)) * 0.02 if seed is None else \
        torch.randn(out, d, generator=gen) * torch.rand(out, d, generator=gen).pow(4) * 0.1


# ----------------------------------------------------------------------------- HQQ

def test_hqq_zero_update_is_the_closed_form_minimiser():
    gen = torch.Generator().manual_seed(0)
    Wg, We = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen) * 0.1
    Q, s = torch.randint(0, 8, (3, 2, 8), generator=gen).float(), torch.rand(3, 2, generator=gen) + 0.5
    mask = torch.ones_like(Wg)
    z = hqq_zero_step(Wg, Q, s, We, mask)
    objective = lambda z: ((Q - z[..., None] - (Wg - We) / s[..., None]) ** 2).sum(-1)  # noqa: E731
    for dz in (1e-3, -1e-3):  # a minimum: any move raises the quadratic
        assert (objective(z + dz) > objective(z)).all()
    mask[..., 6:] = 0  # a short last group: padding does not count
    z = hqq_zero_step(Wg, Q, s, We, mask)
    assert torch.allclose(z, (Q - (Wg - We) / s[..., None])[..., :6].mean(-1))


def test_shrink_is_the_lp_proximal_step():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    y = shrink_lp(x, beta=10.0, p=1.0)  # p = 1: soft threshold at 1/β
    assert torch.allclose(y, torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_never_has_a_larger_lp_error_than_rtn(bits):
    W = heavy_tailed()
    lp = lambda qt: (W - dequantize(qt)).abs().pow(0.7).sum()  # noqa: E731
    r, h = quantize(W, "int", bits, 32), hqq_quantize(W, bits, 32)
    assert lp(h) <= lp(r) * 1.001  # the stored zeros round to float16: a hair of slack
    assert torch.equal(h.scales, r.scales)  # HQQ moves the zeros only
    assert torch.equal(dequantize(hqq_quantize(W, bits, 32, iters=0)), dequantize(r))  # no iteration: RTN


# ----------------------------------------------------------------------------- GPTAQ

def _layer(seed=0, out=24, d=70, n=300):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, d, generator=gen)
    X = torch.randn(d, n, generator=gen) * (torch.rand(d, 1, generator=gen) * 3)  # (in, tokens)
    Xf = X + 0.3 * torch.randn(d, n, generator=gen)  # the float model's inputs for the same tokens
    return W, X, Xf, 2 * X @ X.T / n, 2 * (Xf - X) @ X.T / n


@pytest.mark.parametrize("group_size, block_size", [(None, 128), (16, 16), (32, 7)])
def test_gptaq_with_equal_inputs_is_gptq_exactly(group_size, block_size):
    W, _, _, H, _ = _layer()
    q1, s1, z1 = gptq_quantize(W, H, 3, group_size, False, 0.01, block_size)
    q2, s2, z2 = gptaq_quantize(W, H, torch.zeros_like(H), 3, group_size, False, 0.01, block_size)
    assert torch.equal(q1, q2) and torch.equal(s1, s2) and torch.equal(z1, z2)


def test_gptaq_does_not_depend_on_the_lazy_batch_size():
    W, _, _, H, dXXT = _layer()
    q = [gptaq_quantize(W, H, dXXT, 4, 16, False, 0.01, b, alpha=1.0)[0] for b in (1, 7, 128)]
    assert (q[0] != q[1]).sum() <= 1 and (q[0] != q[2]).sum() <= 1  # float reordering may flip a tie, no more


def test_gptaq_matches_a_slow_column_by_column_reference():
    W, _, _, H, dXXT = _layer(out=6, d=20)
    bits, alpha = 3, 0.5
    q, s, z = gptaq_quantize(W, H, dXXT, bits, None, False, 0.0, 128, alpha)
    # the update written out: column i rounds, the later columns move by -err_i U[i, j] + w_i P[i, j]
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    P = alpha * torch.triu(dXXT @ U.T, 1) @ U
    Wk, qs = W.clone(), []
    for i in range(W.shape[1]):
        w = Wk[:, i].clone()
        qi = torch.clamp(torch.round(w / s[:, 0] + z[:, 0]), 0, 2**bits - 1)
        err = (w - s[:, 0] * (qi - z[:, 0])) / U[i, i]
        Wk[:, i + 1:] -= err[:, None] * U[i, i + 1:] - w[:, None] * P[i, i + 1:]
        qs.append(qi)
    slow = torch.stack(qs, 1)
    assert (slow != q.float()).float().mean() < 0.02  # rounding-tie flips from float reordering only


def test_gptaq_moves_towards_the_float_models_output():
    W, X, Xf, H, dXXT = _layer()
    target = W @ Xf
    err = lambda q, s, z: ((dequantize_codes(q, s, z, 70) @ X - target).norm() / target.norm()).item()  # noqa: E731
    for bits, gain in ((3, 1.0), (8, 0.97)):  # at 8 bits rounding is nearly free: what moves is the asymmetry term
        gptq = err(*gptq_quantize(W, H, bits, None, False, 0.01))
        gptaq = err(*gptaq_quantize(W, H, dXXT, bits, None, False, 0.01, alpha=1.0))
        assert gptaq < gain * gptq, (bits, gptaq, gptq)


# ----------------------------------------------------------------------------- AutoRound

@pytest.mark.parametrize("bits, group_size", [(3, 32), (2, 16), (4, None)])
def test_learned_rounding_with_zero_steps_is_rtn(bits, group_size):
    W = heavy_tailed(d=80)
    X = torch.randn(64, 80)
    a, r = autoround_quantize(W, X, bits, group_size, steps=0), quantize(W, "int", bits, group_size)
    assert torch.equal(a.q, r.q) and torch.equal(a.scales, r.scales) and torch.equal(a.zeros, r.zeros)


def test_learned_rounding_lowers_the_output_error_it_optimises():
    gen = torch.Generator().manual_seed(1)
    W = heavy_tailed(d=128)
    X = torch.randn(256, 128, generator=gen) * torch.rand(128, generator=gen) * 3
    err = lambda qt: ((X @ (dequantize(qt) - W).T).norm() / (X @ W.T).norm()).item()  # noqa: E731
    a, r = autoround_quantize(W, X, 3, 32, steps=100), quantize(W, "int", 3, 32)
    assert err(a) < 0.97 * err(r)


# ----------------------------------------------------------------------------- the model level

@pytest.mark.parametrize("config", [HQQConfig(3, 16), GPTAQConfig(3, 16), AutoRoundConfig(3, 16, steps=3, max_tokens=32)])
def test_every_method_quantizes_a_model_through_quantize_(config):
    model, ids = make_picollama(), random_ids()
    ref = copy.deepcopy(model)
    quantize_(model, config, random_ids(4, 16, seed=1) if not isinstance(config, HQQConfig) else None, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bits == 3 and m.fmt == "int" for m in layers)
    with torch.no_grad():
        out, base = model(ids).logits, ref(ids).logits
    assert torch.isfinite(out).all() and (out - base).abs().mean() < 0.5 * base.abs().mean()


def test_gptaq_and_autoround_need_calibration_data():
    for config in (GPTAQConfig(), AutoRoundConfig()):
        with pytest.raises(ValueError, match="calib_ids"):
            quantize_(make_picollama(), config, progress=False)


@pytest.mark.parametrize("make, message", [
    (lambda: HQQConfig(p=0), "0 < p"), (lambda: GPTAQConfig(alpha=-1), "alpha"),
    (lambda: GPTAQConfig(bits=9), "bits"), (lambda: AutoRoundConfig(steps=-1), "steps"),
])
def test_bad_configs_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("method", ["mxfp8", "hqq", "gptaq", "autoround", "qat"])
@pytest.mark.parametrize("name", __import__("archs").ARCH_NAMES)
def test_every_architecture(name, method):
    """8-bit (MXFP8) or 8-bit g16 of every block linear on a tiny model of each architecture the
    adapter knows: every linear quantized, logits within 3% of the float model's (MXFP8, whose E4M3
    elements keep 3 mantissa bits and whose blocks clip up to 1/8 of their maximum: 10%)."""
    from archs import make_tiny, tiny_ids

    from shrinklib import arch
    from shrinklib.quant import MXConfig, QATConfig

    model, ids = make_tiny(name), tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
    config = {"mxfp8": MXConfig("mxfp8", block_size=16), "hqq": HQQConfig(8, 16), "gptaq": GPTAQConfig(8, 16),
              "autoround": AutoRoundConfig(8, 16, steps=2, max_tokens=32), "qat": QATConfig(8, 16, steps=1)}[method]
    quantize_(model, config, tiny_ids(seed=1), progress=False)
    layers = [m for b in arch.blocks(model) for m in arch.linear_layers(b).values()]
    assert layers and all(isinstance(m, QuantLinear) for m in layers)
    with torch.no_grad():
        assert ((model(ids).logits - ref).norm() / ref.norm()).item() < (0.1 if method == "mxfp8" else 0.03)
