"""One representation, several backends: GPTQ, AWQ and RTN weights run on the reference, packed-int,
codebook and LUT backends, and moving between them loses nothing.

Tolerances, stated once:
- "int" and "codebook" compute y = x Wᵀ with the same stored s, s·z and codes as the reference, in
  float32 but in another summation order: logits agree to 1e-4.
- "lut" rounds the tables of each 64-input chunk of x to int8 (T-MAC): each table entry is off by
  at most 1/254 of the chunk's largest, about 0.4%, and these errors add up through the quantized
  layers (measured: 0.7-2.1% here). The LUT's logits stay within 5% of the reference's (‖Δ‖ ≤ 0.05‖ref‖),
  and pick the same next token.
"""

import copy

import pytest
import torch

from shrinklib import arch
from shrinklib.quant import AWQConfig, GPTQConfig, QuantLinear, RTNConfig, backend_class, quantize_, set_backend_

from common import make_picollama, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(config, seed=0):
    model, ids = make_picollama(seed, hidden=64, intermediate=128), random_ids(8, 32)
    ref = copy.deepcopy(model)
    quantize_(model, config, ids, progress=False)
    return ref, model


def _qtensors(model):
    return [m.qtensor() for m in model.modules() if isinstance(m, QuantLinear)]


def check_backends(float_model, model, ids, backends=("int", "lut")):
    """Each backend's logits against the reference's, on decode-sized (GEMV) and prefill-sized inputs."""
    with torch.no_grad():
        for x in (ids[:1, :3], ids):  # 3 rows: the kernels' GEMV paths; 2x12: dequantize + GEMM for int
            ref, fp = model(x).logits, float_model(x).logits  # fp: the quantization's own error, in messages
            for backend in backends:
                moved = set_backend_(copy.deepcopy(model), backend)
                assert {type(m) for m in moved.modules() if isinstance(m, QuantLinear)} == {backend_class(backend)}
                out = moved(x).logits
                if backend == "lut":
                    assert (out - ref).norm() <= 0.05 * ref.norm(), ((out - ref).norm() / ref.norm(), (ref - fp).norm() / ref.norm())
                    assert torch.equal(out[:, -1].argmax(-1), ref[:, -1].argmax(-1))
                else:
                    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=32), GPTQConfig(bits=3, group_size=32, symmetric=True),
                                    AWQConfig(bits=4, group_size=32), AWQConfig(bits=2, group_size=64)],
                         ids=["gptq4", "gptq3sym", "awq4", "awq2"])
def test_gptq_and_awq_run_on_the_kernels(config):
    float_model, model = _quantized(config)
    check_backends(float_model, model, random_ids(2, 12, seed=1))


def test_codebook_backend_runs_nf4_and_fp4():
    for fmt in ("nf4", "fp4"):
        float_model, model = _quantized(RTNConfig(bits=4, group_size=32, fmt=fmt))
        check_backends(float_model, model, random_ids(2, 12, seed=1), backends=("codebook",))


def test_moving_between_backends_loses_nothing():
    _, model = _quantized(GPTQConfig(bits=3, group_size=32))
    before, ids = _qtensors(model), random_ids(2, 12, seed=1)
    logits = model(ids).logits
    for backend in ("lut", "int", "reference"):
        set_backend_(model, backend)
    for a, b in zip(before, _qtensors(model)):
        assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert torch.equal(model(ids).logits, logits)


def test_quantize_onto_a_backend_equals_moving_there():
    ids = random_ids(8, 32)
    a, b = make_picollama(0, hidden=64, intermediate=128), make_picollama(0, hidden=64, intermediate=128)
    quantize_(a, GPTQConfig(bits=4, group_size=32), ids, backend="lut", progress=False)
    quantize_(b, GPTQConfig(bits=4, group_size=32), ids, progress=False)
    set_backend_(b, "lut")
    x = random_ids(1, 5, seed=2)
    assert torch.equal(a(x).logits, b(x).logits)


def test_stored_bytes_are_those_of_the_backend():
    """4-bit g32: reference and int store 4 bits per weight plus a float16 scale and s·z per group."""
    from shrinklib.evaluate import model_size_bytes

    _, model = _quantized(RTNConfig(bits=4, group_size=32))
    lin = [m for m in model.modules() if isinstance(m, QuantLinear)]
    weights, groups = sum(m.in_features * m.out_features for m in lin), sum(m.in_features // 32 * m.out_features for m in lin)
    rest = model_size_bytes(model) - sum(model_size_bytes(m) for m in lin)
    for backend in ("reference", "int"):
        set_backend_(model, backend)
        assert model_size_bytes(model) - rest == weights // 2 + 4 * groups


def test_kernel_backends_refuse_what_they_cannot_run():
    _, model = _quantized(RTNConfig(bits=8, group_size=32))
    with pytest.raises(ValueError, match="bits"):
        set_backend_(copy.deepcopy(model), "lut")
    _, model = _quantized(RTNConfig(bits=4, group_size=16))
    with pytest.raises(ValueError, match="multiple of 32"):
        set_backend_(model, "int")
    with pytest.raises(ValueError, match="backend"):
        quantize_(make_picollama(), RTNConfig(), backend="gpu")


def test_smollm2_gptq_and_awq_on_the_kernels():
    """The embedded SmolLM2 cut to its first two blocks (all of its layer shapes: 576, 192, 1536),
    GPTQ- and AWQ-quantized at 4-bit g64 on 4x64 calibration tokens, on every kernel backend."""
    from shrinklib.minitron import drop_layers_
    from shrinklib.models import load_model

    base, tok = load_model("smollm2-135m")
    drop_layers_(base, list(range(2, len(arch.blocks(base)))))
    calib = torch.randint(0, base.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    ids = tok("def fibonacci(n): return n if n < 2 else", return_tensors="pt").input_ids
    for config in (GPTQConfig(bits=4, group_size=64), AWQConfig(bits=4, group_size=64, n_grid=5)):
        model = copy.deepcopy(base)
        quantize_(model, config, calib, progress=False)
        check_backends(base, model, ids)


def test_arch_walks_quantized_models():
    """The adapter finds the blocks and linear layers of a model whose linears are all quantized."""
    _, model = _quantized(RTNConfig(bits=4, group_size=32))
    for backend in ("reference", "lut"):
        set_backend_(model, backend)
        block = arch.blocks(model)[0]
        assert len(arch.linear_layers(block)) == 7 and not arch.linears(block)
