"""Quantized checkpoints: save/load gives equal logits; files are written atomically."""

import json

import pytest
import torch

from shrinklib.quant import AWQConfig, GPTQConfig, QuantLinear, RTNConfig, load_quantized, quantize_, save_quantized

from common import make_picollama, make_picoopt, random_ids


@pytest.mark.parametrize("make, config", [(make_picollama, GPTQConfig(bits=3, group_size=24)),
                                          (make_picoopt, RTNConfig(bits=4, group_size=None)),
                                          (make_picollama, AWQConfig(bits=2, group_size=16))])
def test_round_trip_gives_equal_logits(tmp_path, make, config):
    model, ids = make(), random_ids(4, 16)
    quantize_(model, config, ids, progress=False)
    folder = save_quantized(model, tmp_path / "q")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "quantization.json"]
    loaded = load_quantized(folder)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    meta = json.loads((folder / "quantization.json").read_text())
    assert len(meta["layers"]) == sum(isinstance(m, QuantLinear) for m in model.modules())


def test_tied_embeddings_round_trip(tmp_path):
    model, ids = make_picollama(tie=True), random_ids(2, 8)
    quantize_(model, RTNConfig(bits=4, group_size=16), progress=False)
    loaded = load_quantized(save_quantized(model, tmp_path))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_packed_file_is_small(tmp_path):
    model = make_picollama(hidden=64, intermediate=128)
    dense = sum(p.numel() * 4 for p in model.parameters())
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=False)
    size = (save_quantized(model, tmp_path) / "model.safetensors").stat().st_size
    assert size < 0.6 * dense


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    model = make_picollama()
    quantize_(model, RTNConfig(bits=4, group_size=16), progress=False)
    import shrinklib.quant.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_quantized(model, tmp_path / "q")
    assert list((tmp_path / "q").iterdir()) == []


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="quantization.json"):
        load_quantized(tmp_path)
