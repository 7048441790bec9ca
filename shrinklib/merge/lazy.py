"""Merging tensor by tensor: each tensor is read from every input's safetensors file
(`safetensors.safe_open`), merged, and written to an output shard, so memory holds one
output shard plus one tensor per input, never two whole models. The output folder is written
under a temporary name and renamed at the end (`shrinklib.io.staged_folder`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..io import SafetensorsReader, safetensors_files, staged_folder  # noqa: F401 (safetensors_files re-exported)
from ..units import GiB
from .checks import check_finite, check_weights
from .config import MergeConfig
from .registry import merge_tensor


def merge_state_dicts(method: str, state_dicts: list[dict[str, Tensor]], weights: list[float] | None = None,
                      densities: list[float] | None = None, base: dict[str, Tensor] | None = None,
                      params: dict | None = None) -> dict[str, Tensor]:
    """Merge in-memory state dicts with a registered method, tensor by tensor.

    Args:
        method: a key of `METHODS` ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp").
        state_dicts: the models merged into the base (not the base itself).
        weights, densities: one per model (default 1.0 each).
        base: the base model's state dict, for methods that need one.
        params: method parameters (normalize, lambda, t, seed).
    """
    n = len(state_dicts)
    weights = check_weights(weights, n)
    densities = check_weights(densities, n, "densities")
    ref_sd = base or state_dicts[0]
    for i, sd in enumerate(state_dicts):
        missing = sorted(set(ref_sd) - set(sd))
        if missing:
            raise ValueError(f"model {i} has no tensor {missing[0]!r} ({len(missing)} missing): merging needs "
                             "models of one architecture")
    out = {}
    for name, ref in ref_sd.items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        tensors = [sd[name] for sd in state_dicts]
        out[name] = merge_tensor(method, tensors, weights, densities, None if base is None else base[name],
                                 params or {}, name)
    return out


def merge_files(config: MergeConfig, out_dir: str | Path, max_shard_bytes: int = 2 * GiB, progress: bool = True,
                overwrite: bool = False) -> Path:
    """Run a merge config on safetensors checkpoints, one tensor at a time; writes the merged
    weights (sharded above `max_shard_bytes`) and the reference model's config.json to `out_dir`.

    An existing `out_dir` is replaced only when it is an output of the suite or with `overwrite`;
    a merge that fails (different shapes, a non-finite result) leaves nothing behind.
    """
    out_dir = Path(out_dir)
    ref_source = config.base_model or config.inputs()[0].model
    base = SafetensorsReader(config.base_model) if config.base_model else None
    readers = [SafetensorsReader(m.model) for m in config.inputs()]
    ref = base or readers[0]
    dtype = getattr(torch, config.dtype) if config.dtype else None
    with staged_folder(out_dir, overwrite, what="merge output folder", merge_method=config.merge_method) as tmp:
        _write_merge(config, tmp, ref, base, readers, dtype, max_shard_bytes, progress)
        ref_dir = Path(ref_source)
        if ref_dir.is_dir() and (ref_dir / "config.json").is_file():
            shutil.copyfile(ref_dir / "config.json", tmp / "config.json")
    return out_dir


def _write_merge(config: MergeConfig, out_dir: Path, ref: SafetensorsReader, base: SafetensorsReader | None,
                 readers: list[SafetensorsReader],
                 dtype, max_shard_bytes: int, progress: bool) -> None:
    labels = [m.model for m in config.inputs()]
    shards, shard, size = [], {}, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard, size = {}, 0

    for name in tqdm(sorted(ref.where), desc="merge", disable=not progress):
        r = ref.get(name)
        if r.is_floating_point():
            t = merge_tensor(config.merge_method, [rd.get(name) for rd in readers], config.weights(), config.densities(),
                             base.get(name) if base else None, config.parameters, name, labels)
            t = check_finite(name, t.to(dtype)) if dtype else t  # a float16 cast can overflow
        else:
            t = r
        shard[name] = t.contiguous()
        size += t.numel() * t.element_size()
        if size >= max_shard_bytes:
            flush()
    flush()
    if len(shards) == 1:
        (out_dir / shards[0][0]).replace(out_dir / "model.safetensors")
    else:
        weight_map = {k: f for f, keys in shards for k in keys}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
