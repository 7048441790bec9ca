"""Export to safetensors and GGUF, each checked by reloading and comparing logits."""

import numpy as np
import pytest
import torch
from common import make_picollama, make_picoopt

from shrinklib.export import (TOLERANCE, ExportError, export_gguf, export_safetensors, load_gguf, permute_rope_rows,
                              q4_blocks)


@pytest.mark.parametrize("fmt", ["F32", "F16", "Q8_0"])
def test_gguf_float_formats_reload_within_tolerance(tmp_path, fmt):
    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    r = export_gguf(model, tmp_path / f"m.{fmt}.gguf", fmt=fmt)
    assert r.ok, r
    assert r.rel_logit_diff <= TOLERANCE[fmt]
    if fmt == "F32":
        assert r.exact and r.max_abs_logit_diff == 0.0


def test_gguf_refuses_q4_off_grid(tmp_path):
    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    for fmt in ("Q4_0", "Q4_1"):
        with pytest.raises(ExportError, match="not on the .* grid"):
            export_gguf(model, tmp_path / "m.gguf", fmt=fmt)
    assert not (tmp_path / "m.gguf").exists()  # nothing half-written


def test_gguf_refuses_other_architectures(tmp_path):
    with pytest.raises(ExportError, match="Llama architecture"):
        export_gguf(make_picoopt(), tmp_path / "m.gguf")


@pytest.mark.parametrize("fmt,symmetric,bits,group", [("Q4_1", False, 4, 32), ("Q4_1", False, 3, 64), ("Q4_0", True, 4, 64)])
def test_gguf_q4_from_quantized_codes(tmp_path, fmt, symmetric, bits, group):
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    quantize_(model, RTNConfig(bits=bits, group_size=group, symmetric=symmetric), progress=False)
    # F32 embedding: the only difference left is the float16 rounding of the block constants
    r = export_gguf(model, tmp_path / "m.gguf", fmt=fmt, embed_type="F32")
    assert r.ok and r.tensor_types[fmt] == 14, r
    assert r.rel_logit_diff < 2e-3  # float16 constants: ~2⁻¹¹ relative per weight


def test_q4_0_needs_a_symmetric_grid(tmp_path):
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    quantize_(model, RTNConfig(bits=4, group_size=32, symmetric=False), progress=False)
    with pytest.raises(ExportError, match="Q4_0"):
        export_gguf(model, tmp_path / "m.gguf", fmt="Q4_0")


def test_q4_blocks_match_gguf_dequantize():
    """Our nibble packing, read back by the gguf package's own dequantizer: w = d·q + m."""
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (3, 64), generator=g, dtype=torch.uint8)
    d = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.125, 4.0]])
    m = torch.tensor([[-1.0, 0.5], [0.0, -3.0], [2.0, 1.0]])
    back = quants.dequantize(q4_blocks(q, d, m), GGMLQuantizationType.Q4_1).reshape(3, 64)
    expect = d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)
    np.testing.assert_array_equal(back, expect.numpy())
    back0 = quants.dequantize(q4_blocks(q, d, None), GGMLQuantizationType.Q4_0).reshape(3, 64)
    np.testing.assert_array_equal(back0, (d.repeat_interleave(32, 1) * (q.float() - 8)).numpy())


def test_rope_permutation_is_undone_by_transformers():
    """llama.cpp's q/k row order, undone by transformers' GGUF reader, gives the identity."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    for n_head in (1, 2, 4):
        W = torch.arange(8 * n_head * 3, dtype=torch.float32).reshape(8 * n_head, 3)
        stored = W[permute_rope_rows(W.shape[0], n_head)].numpy()
        back = LlamaTensorProcessor()._reverse_permute_weights(stored, n_head, n_head)
        np.testing.assert_array_equal(back, W.numpy())


def test_safetensors_dense_and_packed_reload_exactly(tmp_path):
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=False)
    dense = export_safetensors(model, tmp_path / "dense")
    packed = export_safetensors(model, tmp_path / "packed", packed=True)
    assert dense.ok and packed.ok and dense.max_abs_logit_diff == 0 == packed.max_abs_logit_diff
    assert packed.size_bytes < dense.size_bytes / 2
    export_safetensors(model, tmp_path / "dense")  # overwriting an existing export works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "packed"]  # no temporary folders left


def test_smollm2_q4_1_round_trip_is_exact(tmp_path):
    """The embedded SmolLM2 was shipped as Q4_1 (linears) + Q8_0 (embedding): its float32 weights
    sit on those grids, so exporting Q4_1 and reloading gives the same weights bit for bit.
    Two of its 30 blocks keep the test fast; the tokenizer goes through GGUF and back."""
    from shrinklib.minitron import drop_layers_
    from shrinklib.models import load_model

    model, tok = load_model()
    model = __import__("copy").deepcopy(model)
    drop_layers_(model, list(range(2, 30)))
    r = export_gguf(model, tmp_path / "smol.gguf", tokenizer=tok, fmt="Q4_1")
    assert r.exact and r.ok and r.tokenizer_ok and r.max_abs_logit_diff == 0.0, r
    assert r.tensor_types == {"Q8_0": 1, "Q4_1": 14, "F32": 5}
    reloaded = load_gguf(tmp_path / "smol.gguf").state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded[k]), k
