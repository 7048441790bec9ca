"""Quantized checkpoints: packed codes, scales and zeros in safetensors, plus a small config.

A folder holds `config.json` (the model's `transformers` config), `model.safetensors` (every
tensor of the state dict: float parameters and the QuantLinear buffers `qweight`, `scales`,
`zeros`) and `quantization.json` ({"format": "shrinklib-int", "layers": {name: {bits,
group_size, in_features, out_features, bias}}}). Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..arch import set_module
from ..io import atomic_path, atomic_write_text
from .qlinear import QuantLinear

QUANT_FILE = "quantization.json"


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without duplicates of tied tensors (safetensors refuses shared storage)."""
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        state[name] = t.detach().contiguous().cpu()
    return state


def save_quantized(model: nn.Module, folder: str | Path) -> Path:
    """Save a model whose linears are QuantLinear (see the module docstring); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {name: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
                     "out_features": m.out_features, "bias": m.bias is not None}
              for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(_state_for_saving(model), str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", model.config.to_json_string())
    atomic_write_text(folder / QUANT_FILE, json.dumps({"format": "shrinklib-int", "layers": layers}, indent=1))
    return folder


def load_quantized(folder: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_quantized` (architecture from config.json), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / QUANT_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {QUANT_FILE}: not a shrinklib quantized checkpoint")
    meta = json.loads((folder / QUANT_FILE).read_text())
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config)  # non-persistent buffers (rotary tables) are built here
    for name, spec in meta["layers"].items():
        set_module(model, name, QuantLinear(spec["in_features"], spec["out_features"], spec["bits"],
                                            spec["group_size"], spec["bias"]))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval()
