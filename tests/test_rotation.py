"""Rotations (QuaRot, SpinQuant): the Hadamard construction (H Hᵀ = n I for every order it
builds, Sylvester's against scipy's), the randomized Hadamard's orthogonality, and a rotated
float model computing the original's function."""

import pytest
import scipy.linalg
import torch

from shrinklib.quant.rotation import hadamard, hadamard_factors, is_hadamard, paley, random_hadamard, sylvester


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 60, 64, 72, 108, 576, 768, 1536, 2048])
def test_hadamard_is_hadamard(n):
    H = hadamard(n, torch.float64)
    assert H.shape == (n, n) and bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))  # integers: exact


def test_every_order_it_builds_up_to_512():
    built = []
    for n in range(1, 513):
        try:
            H = hadamard(n, torch.float64)
        except ValueError:
            continue
        assert is_hadamard(H), n
        built.append(n)
    assert all(n in (1, 2) or n % 4 == 0 for n in built)  # a Hadamard order is 1, 2 or a multiple of 4
    # orders below 100 that need more than Paley with q prime and Sylvester: 52 (q = 25, a prime power), 92 (Williamson)
    assert [n for n in range(4, 100, 4) if n not in built] == [52, 92]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_powers_of_two_equal_scipy_sylvester(n):
    assert torch.equal(hadamard(n, torch.float64), torch.from_numpy(scipy.linalg.hadamard(n)).double())


def test_factors_of_the_model_sizes():
    assert hadamard_factors(576) == (36, 4)   # SmolLM2 hidden: Paley II from q = 17, then 16·
    assert hadamard_factors(1536) == (12, 7)  # SmolLM2 intermediate: Paley I from q = 11, then 128·
    assert hadamard_factors(64) == (1, 6)     # head dimension: Sylvester alone


def test_paley_by_hand():
    # q = 3 (≡ 3 mod 4): order 4; q = 5 (≡ 1 mod 4): order 12
    assert is_hadamard(paley(3)) and paley(3).shape == (4, 4)
    assert is_hadamard(paley(5)) and paley(5).shape == (12, 12)
    assert is_hadamard(sylvester(paley(3)))
    with pytest.raises(ValueError, match="odd prime"):
        paley(9)


@pytest.mark.parametrize("n", [3, 6, 52, 0, -4])
def test_orders_it_cannot_build_raise(n):
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard(n)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    Q = random_hadamard(n, seed=3, dtype=torch.float64)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(Q, random_hadamard(n, seed=3, dtype=torch.float64))
    assert not torch.equal(Q, random_hadamard(n, seed=4, dtype=torch.float64))
    # columns are ±H's columns / √n
    H = hadamard(n, torch.float64)
    torch.testing.assert_close((Q * n ** 0.5).abs(), H.abs())


# ----------------------------------------------------------------------------- rotating a model

import copy  # noqa: E402

from archs import make_tiny, tiny_ids  # noqa: E402

from shrinklib.arch import UnsupportedArchitectureError  # noqa: E402
from shrinklib.quant import (GPTQConfig, RotationConfig, RTNConfig, SmoothQuantConfig, W8A8Linear, quantize_,  # noqa: E402
                             quantize_inputs_, rotate_)
from shrinklib.quant.rotation import hadamard_transform  # noqa: E402

# Tolerance of a rotated float32 model: every weight is a float32 product of the original with an
# orthogonal matrix rounded to float32 (relative error ~1e-7 per entry, growing as √(sum length)
# through a few matmuls); measured 2.4e-7 to 4.6e-7 of max |logit| on the tiny models. 1e-5 leaves
# room for other BLAS orders; a missed fold or rotation (tested below) moves logits by ~1e-1.
ROT_TOL = 1e-5


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("n", [12, 36, 64, 576, 1536])
def test_hadamard_transform_equals_the_dense_product(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x), x @ hadamard(n, torch.float64) / n ** 0.5, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt"])
@pytest.mark.parametrize("heads,online", [(True, True), (False, False)])
def test_rotated_float_model_computes_the_same_logits(arch, heads, online):
    model, ids = make_tiny(arch), tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        info = rotate_(model, RotationConfig(seed=3, heads=heads, online=online))
        assert rel_err(model(ids).logits, ref) < ROT_TOL
    assert info["untied"] == tied
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight


def test_each_step_matters():
    """Without the online Hadamard (weights rotated, input not) or the untying, the logits move."""
    model, ids = make_tiny("qwen3"), tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
        rotate_(model, RotationConfig())
        from shrinklib.arch import blocks

        for b in blocks(model):
            b.online_hadamard.remove()
        assert rel_err(model(ids).logits, ref) > 1e-2


def test_rotation_spreads_an_outlier_channel():
    torch.manual_seed(0)
    x = torch.randn(64, 576)
    x[:, 7] *= 100  # one outlier channel
    Q = random_hadamard(576, seed=0)
    y = x @ Q
    ratio = lambda v: (v.abs().amax(0).max() / v.abs().amax(0).median()).item()  # noqa: E731
    assert ratio(x) > 50 and ratio(y) < 3
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)  # orthogonal: norms kept


def test_refusals_are_clear_and_change_nothing():
    model = make_tiny("gemma2")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UnsupportedArchitectureError, match="unsupported for gemma2 because"):
        rotate_(model, RotationConfig())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    q = make_tiny("llama")
    quantize_(q, RTNConfig(bits=4, group_size=16), progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        rotate_(q, RotationConfig())
    odd = make_tiny("llama", intermediate_size=52)  # 52 = 4·13: no Paley order from a prime
    with pytest.raises(ValueError, match="no Hadamard matrix of order 52"):
        rotate_(odd, RotationConfig())
    with pytest.raises(TypeError):
        RotationConfig(seed="0")
    done = make_tiny("llama")
    rotate_(done, RotationConfig())
    before = copy.deepcopy(done.state_dict())
    with pytest.raises(ValueError, match="already rotated"):
        rotate_(done, RotationConfig())
    assert all(torch.equal(v, done.state_dict()[k]) for k, v in before.items())


def test_a_deep_copy_keeps_its_own_online_hadamard():
    from shrinklib.arch import blocks

    model, ids = make_tiny("llama"), tiny_ids()
    with torch.no_grad():
        ref = model(ids).logits
        rotate_(model, RotationConfig())
        twin = copy.deepcopy(model)
        for b in blocks(twin):
            b.online_hadamard.remove()
        assert rel_err(model(ids).logits, ref) < ROT_TOL  # the original still transforms
        assert rel_err(twin(ids).logits, ref) > 1e-2  # the copy no longer does


def test_quantize_inputs_is_the_w8a8_layer_of_the_same_codes():
    """RTN per-channel symmetric weights + quantize_inputs_ equal SmoothQuant's naive W4A4 (same layer, same codes)."""
    model, ids = make_tiny("llama"), tiny_ids()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(a, RTNConfig(bits=4, group_size=None, symmetric=True), progress=False)
    quantize_inputs_(a, 4)
    quantize_(b, SmoothQuantConfig(smooth=False, w_bits=4, a_bits=4), progress=False)
    assert sum(isinstance(m, W8A8Linear) for m in a.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_online_hadamard_follows_the_quantized_layer():
    """After rotation, GPTQ and W4A8 replace the down projections; the online Hadamard still runs on
    their input: at 8-bit weights and activations the rotated quantized model stays close to float."""
    model, ids = make_tiny("llama"), tiny_ids()
    calib = tiny_ids(8, 32, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
        rotate_(model, RotationConfig())
        quantize_(model, GPTQConfig(bits=8, group_size=None, symmetric=True), calib, progress=False)
        quantize_inputs_(model, 8)
        assert rel_err(model(ids).logits, ref) < 0.02
        from shrinklib.arch import blocks

        for b in blocks(model):
            b.online_hadamard.remove()
        assert rel_err(model(ids).logits, ref) > 0.05


def test_the_rotate_recipe_step_equals_the_library_call():
    from test_recipe import CharTokenizer, assert_same_logits, toy_corpus, toy_recipe

    from shrinklib.recipe import RecipeError, apply_recipe, parse_recipe

    model, tok, corpus = make_tiny("llama"), CharTokenizer(), toy_corpus()
    expected = copy.deepcopy(model)
    rows = apply_recipe(toy_recipe({"rotate": {"seed": 2}}, {"smoothquant": {"smooth": False, "w_bits": 4, "a_bits": 4}},
                                   eval_tokens=0), model, tok, corpus=corpus)
    rotate_(expected, RotationConfig(seed=2))
    quantize_(expected, SmoothQuantConfig(smooth=False, w_bits=4, a_bits=4), progress=False)
    assert_same_logits(model, expected)
    assert [r.step for r in rows] == ["input", "rotate", "smoothquant"]
    with pytest.raises(RecipeError, match="cannot export"):  # the online Hadamard is not in any export format
        parse_recipe({"steps": [{"rotate": {}}, {"export_safetensors": {}}]})


# ----------------------------------------------------------------------------- exercises of notebook 13


def test_exercise_solutions():
    from shrinklib.exercises import ex13

    ex13.check_outlier_after_rotation(120 / 24)
    ex13.check_sylvester_doublings(7)
    ex13.check_sylvester_step(sylvester)
    for wrong in (lambda: ex13.check_outlier_after_rotation(120), lambda: ex13.check_sylvester_doublings(128),
                  lambda: ex13.check_sylvester_step(lambda H: torch.cat([torch.cat([H, H], 1), torch.cat([-H, H], 1)], 0)),
                  lambda: ex13.check_sylvester_step(lambda H: sylvester(H.T))):
        with pytest.raises(AssertionError):
            wrong()
