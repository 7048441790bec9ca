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
from safetensors.torch import save_file
from torch import nn

from ..arch import layout, set_module
from ..io import INDEX, SafetensorsReader, atomic_path, atomic_write_text
from .config import GPTQConfig
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
    state = SafetensorsReader(folder).load()  # one file or shards (`quantize_from_disk`)
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


def _module_tensors(prefix: str, module: nn.Module, skip: str = "\0") -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for a module: its state dict, quantized linears in the
    reference layout; `prefix` names it in the model; names starting with `skip` are left out."""
    quant = {name: m for name, m in module.named_modules() if isinstance(m, QuantLinear) and not name.startswith(skip)}
    out = {prefix + k: t.detach().contiguous().cpu() for k, t in module.state_dict().items()
           if k.rpartition(".")[0] not in quant and not k.startswith(skip)}
    for name, m in quant.items():
        out.update(saved_tensors(prefix + name, m))
    return out


@torch.no_grad()
def quantize_from_disk(folder: str | Path, out: str | Path, calib_ids: torch.Tensor, config: GPTQConfig,
                       device="cpu", progress: bool = True) -> Path:
    """GPTQ a safetensors model folder with about one block in memory (`calib.FromDisk`), writing the
    checkpoint of `save_quantized` one shard per block; `load_quantized(out)` reads it back."""
    from ..calib import sequential, streamed_model
    from .apply import gptq_step

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, source = streamed_model(folder)
    prefix = layout(model).blocks_path
    layers, weight_map = {}, {}
    quantize = gptq_step(config)

    def step(s) -> None:  # quantize the block, then write it out before it is dropped
        quantize(s)
        layers.update({f"{prefix}.{s.index}.{n}": layer_spec(m) for n, m in s.block.named_modules()
                       if isinstance(m, QuantLinear)})
        _write_shard(out, f"block-{s.index:05d}.safetensors", _module_tensors(f"{prefix}.{s.index}.", s.block), weight_map)

    sequential(model, calib_ids, step, device=device, desc="GPTQ (from disk)", progress=progress, source=source)
    rest = _module_tensors("", model, skip=prefix + ".")  # the blocks are written already
    if getattr(model.config, "tie_word_embeddings", False):
        rest.pop("lm_head.weight", None)
    _write_shard(out, "rest.safetensors", rest, weight_map)
    atomic_write_text(out / INDEX, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    write_quantization_json(out, layers)
    model.config.save_pretrained(out)
    return out


def _write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], weight_map: dict) -> None:
    with atomic_path(folder / name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    weight_map.update({k: name for k in tensors})
