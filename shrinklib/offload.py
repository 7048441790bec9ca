"""Calibration for models larger than memory, measured: one decoder block resident at a time.

The machinery lives where it belongs: `calib.streamed_model` and `calib.FromDisk` stream the
blocks of a safetensors folder through `calib.sequential`, and `quant.quantize_from_disk` GPTQs
a model that way, writing the same checkpoint as `quant.save_quantized`. This module makes a
random model of a published shape on disk, one shard per block, and measures the peak memory
of the calibration pass from disk against the same pass on the model loaded whole.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from .io import INDEX, atomic_path, atomic_write_text


def save_random_checkpoint(config, folder: str | Path, seed: int = 0, std: float = 0.02) -> Path:
    """Write a randomly initialised model of `config` as a sharded safetensors folder, one shard
    per block, never holding more than one block in memory."""
    from safetensors.torch import save_file

    from .arch import layout
    from .params import build_on_meta

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_on_meta(config)
    blocks_path = layout(model).blocks_path
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, list[str]] = {}
    params = dict(model.named_parameters())
    for name in params:
        inside = name.startswith(blocks_path + ".")
        shard = f"block-{int(name[len(blocks_path) + 1:].split('.')[0]):05d}.safetensors" if inside else "rest.safetensors"
        shards.setdefault(shard, []).append(name)
    weight_map = {}
    for shard, names in shards.items():
        tensors = {n: torch.ones(params[n].shape) if n.endswith("norm.weight") else torch.randn(params[n].shape, generator=gen) * std
                   for n in names}
        with atomic_path(folder / shard) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
        del tensors
    atomic_write_text(folder / INDEX, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return folder


def calibration_ids(vocab: int, n: int, length: int, seed: int = 0) -> Tensor:
    """(n, length) random token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def measure(folder: str | Path, mode: str, n: int = 8, length: int = 128) -> dict:
    """Peak memory of the calibration pass every method makes (each linear's input statistics,
    Hessians included) on the model in `folder`, streamed "from_disk" or loaded "whole" first.
    Run each mode in a fresh process: the peak is the process's high-water mark."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .calib import collect_input_stats, sequential, streamed_model
    from .evaluate import peak_rss

    def stats(s) -> None:
        collect_input_stats(s.block, s.forward, hessian=True)

    config = AutoConfig.from_pretrained(folder)
    ids = calibration_ids(config.vocab_size, n, length)
    t0 = time.perf_counter()
    if mode == "from_disk":
        model, source = streamed_model(folder)
        sequential(model, ids, stats, progress=False, source=source)
    elif mode == "whole":
        sequential(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ids, stats, progress=False)
    else:
        raise ValueError(f"mode must be 'from_disk' or 'whole', got {mode!r}")
    return {"mode": mode, "peak_bytes": peak_rss(), "seconds": time.perf_counter() - t0,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "n_calib": n, "seq_len": length}
