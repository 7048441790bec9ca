"""Quantization-aware training: zero steps is RTN, the packed model computes what training last saw,
and training through the straight-through estimator lowers the quantized model's loss."""

import copy

import pytest
import torch

from shrinklib.quant import FakeQuant, QATConfig, QuantLinear, RTNConfig, dequantize, quantize, quantize_
from shrinklib.train import causal_lm_loss

from common import make_picollama, random_ids


def test_fake_quant_is_rtn_forward_and_identity_backward():
    W = torch.randn(6, 32, requires_grad=True)
    fq = FakeQuant(2, 16)
    out = fq(W)
    assert torch.equal(out.detach(), dequantize(quantize(W.detach(), "int", 2, 16)))
    (out * torch.arange(32.0)).sum().backward()
    assert torch.equal(W.grad, torch.arange(32.0).expand(6, 32))


def test_zero_steps_is_rtn():
    model, ref = make_picollama(), make_picollama()
    quantize_(model, QATConfig(bits=3, group_size=16, steps=0), random_ids(), progress=False)
    quantize_(ref, RTNConfig(bits=3, group_size=16), progress=False)
    ids = random_ids(seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_qat_lowers_the_quantized_loss_on_its_windows():
    model, ids = make_picollama(), random_ids(8, 32, seed=2)
    rtn = copy.deepcopy(model)
    quantize_(rtn, RTNConfig(bits=2, group_size=16), progress=False)
    history = quantize_(model, QATConfig(bits=2, group_size=16, steps=30, lr=1e-2, batch_size=8), ids, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14  # 2 blocks x 7 linears, packed
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        assert causal_lm_loss(model, batch) < 0.95 * causal_lm_loss(rtn, batch)
    assert history > 0  # quantize_ returns the seconds it took


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="steps"):
        QATConfig(steps=-1)
    with pytest.raises(ValueError, match="calib_ids"):
        quantize_(make_picollama(), QATConfig(), progress=False)
