"""Quantized checkpoints: packed codes, scales and zeros in safetensors, plus a small config.

A folder holds `config.json` (the model's `transformers` config), `model.safetensors` (every
tensor of the state dict: float parameters and, for each quantized linear, the reference
backend's buffers `qweight` (codes as a bit stream), `scales` and `szeros` (float16 s and s·z))
and `quantization.json` ({"format": "shrinklib-qtensor", "layers": {name: {bits, group_size,
fmt, in_features, out_features, bias}}}). Whatever backend a layer runs on, it is saved in this
one layout, and `load_quantized(folder, backend=...)` puts it on any backend. Every file is
written atomically.
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
FORMAT = "shrinklib-qtensor"


def layer_spec(m: QuantLinear) -> dict:
    """What `quantization.json` records of one quantized linear."""
    return {"bits": m.bits, "group_size": m.group_size, "fmt": m.fmt, "in_features": m.in_features,
            "out_features": m.out_features, "bias": m.bias is not None}


def saved_tensors(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for the quantized linear `name`: the reference layout,
    whatever backend `m` runs on."""
    ref = m if type(m) is QuantLinear else QuantLinear.from_qtensor(m.qtensor(), m.bias)
    return {f"{name}.{k}": t.detach().contiguous().cpu() for k, t in ref.state_dict().items()}


def write_quantization_json(folder: Path, layers: dict[str, dict]) -> None:
    atomic_write_text(folder / QUANT_FILE, json.dumps({"format": FORMAT, "layers": layers}, indent=1))


def _state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict, quantized linears in the reference layout, without duplicates of tied
    tensors (safetensors refuses shared storage)."""
    quant = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    state, seen = {}, {}
    for name, t in model.state_dict().items():
        if name.rpartition(".")[0] in quant:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        state[name] = t.detach().contiguous().cpu()
    for name, m in quant.items():
        state.update(saved_tensors(name, m))
    return state


def save_quantized(model: nn.Module, folder: str | Path) -> Path:
    """Save a model whose linears are QuantLinear (see the module docstring); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = {name: layer_spec(m) for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(_state_for_saving(model), str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", model.config.to_json_string())
    write_quantization_json(folder, layers)
    return folder


def read_quantization_json(folder: Path) -> dict[str, dict]:
    """The layers of a checkpoint's `quantization.json`, or a clear error."""
    if not (folder / QUANT_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {QUANT_FILE}: not a shrinklib quantized checkpoint")
    meta = json.loads((folder / QUANT_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder / QUANT_FILE} has format {meta.get('format')!r}; this version reads {FORMAT!r} "
                         "(re-run the quantization to write it)")
    return meta["layers"]


def empty_quantized_model(folder: Path, layers: dict[str, dict]) -> nn.Module:
    """The model of `folder`'s config.json with reference QuantLinear layers of the recorded shapes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))  # builds rotary tables too
    for name, spec in layers.items():
        set_module(model, name, QuantLinear.empty(spec["in_features"], spec["out_features"], spec["bits"],
                                                  spec["group_size"], spec["fmt"], spec["bias"]))
    return model


def load_quantized(folder: str | Path, device: str = "cpu", backend: str = "reference") -> nn.Module:
    """Rebuild a model saved by `save_quantized` (architecture from config.json), in eval mode,
    its quantized linears on `backend`."""
    folder = Path(folder)
    model = empty_quantized_model(folder, read_quantization_json(folder))
    config = model.config
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if backend != "reference":
        from .apply import set_backend_

        set_backend_(model, backend)
    return model.to(device).eval()
