"""Calibration for models larger than memory: one decoder block resident at a time.

`shrinklib.calib.sequential` keeps the whole model in CPU memory and moves one block to the
compute device. Here even the CPU holds only the embedding and the current block: the model
is built on the `meta` device (shapes, no storage), and block i's weights are read from the
safetensors files when its turn comes, calibrated (e.g. GPTQ), written out, and dropped
again. Block inputs are captured and passed on with `shrinklib.calib`'s conventions
(`capture_block_inputs`, `BlockStep`, `run_block`), so a per-block `step` written for
`calib.sequential` runs here unchanged.

    python -m shrinklib.offload make  --folder /tmp/tinyllama-random [--layers 22]
    python -m shrinklib.offload measure --folder /tmp/tinyllama-random --mode layerwise
    python -m shrinklib.offload measure --folder /tmp/tinyllama-random --mode whole

`measure` runs in its own process and reports the peak resident memory (VmHWM), so the two
modes compare like for like.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .io import atomic_path, atomic_write_text

INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- random checkpoints on disk


def save_random_checkpoint(config, folder: str | Path, seed: int = 0, std: float = 0.02) -> Path:
    """Write a randomly initialised model of `config` as a sharded safetensors folder, one shard
    per block, never holding more than one block in memory."""
    from safetensors.torch import save_file

    from .arch import LAYOUTS
    from .params import build_on_meta

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_on_meta(config)
    blocks_path = LAYOUTS[config.model_type][0]
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, dict[str, Tensor]] = {}
    for name, p in model.named_parameters():
        if name.startswith(blocks_path + "."):
            shard = f"block-{int(name[len(blocks_path) + 1:].split('.')[0]):05d}.safetensors"
        else:
            shard = "rest.safetensors"
        shards.setdefault(shard, {})[name] = None
    weight_map = {}
    for shard, names in shards.items():
        params = dict(model.named_parameters())
        tensors = {}
        for name in names:
            shape = params[name].shape
            tensors[name] = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * std
            weight_map[name] = shard
        with atomic_path(folder / shard) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        del tensors
    atomic_write_text(folder / INDEX, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- reading weights lazily


class LazyCheckpoint:
    """The tensors of a safetensors folder (single file or sharded), read on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if (self.folder / INDEX).is_file():
            self.weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.folder / "model.safetensors", "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} has neither {INDEX} nor model.safetensors")

    def load(self, prefix: str) -> dict[str, Tensor]:
        """Every tensor whose name starts with `prefix`, keyed by the rest of its name."""
        from safetensors import safe_open

        out: dict[str, Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            if name.startswith(prefix):
                by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(self.folder / file, "pt") as f:
                for name in names:
                    out[name[len(prefix):]] = f.get_tensor(name)
        return out


def _materialize_(module: nn.Module, tensors: dict[str, Tensor], device) -> None:
    """Give a meta-device module real storage and the checkpoint's values."""
    module.to_empty(device=device)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
        raise ValueError(f"checkpoint does not match the module: missing {missing[:4]}, unexpected {unexpected[:4]}")


def skeleton(folder: str | Path, lazy: LazyCheckpoint, device="cpu") -> nn.Module:
    """The model with all blocks on the meta device and everything else loaded (embedding,
    final norm, LM head, rotary tables)."""
    from transformers import AutoConfig

    from .arch import LAYOUTS, get_path
    from .params import build_on_meta

    config = AutoConfig.from_pretrained(folder)
    model = build_on_meta(config)
    blocks_path = LAYOUTS[config.model_type][0]
    for name, child in model.named_modules():
        if name and not name.startswith(blocks_path) and not list(child.children()) and (
                list(child.parameters(recurse=False)) or list(child.buffers(recurse=False))):
            tensors = lazy.load(name + ".")
            if "rotary" in name:  # buffers computed from the config, not stored
                parent, _, attr = name.rpartition(".")
                setattr(get_path(model, parent) if parent else model, attr, type(child)(config=config).to(device))
                continue
            if not tensors and getattr(config, "tie_word_embeddings", False):
                continue
            _materialize_(child, tensors, device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------- the layer-wise loop


@dataclass
class OffloadStats:
    seconds: float
    blocks: int


@torch.no_grad()
def sequential_from_disk(folder: str | Path, input_ids: Tensor, step: Callable, on_block_done: Callable | None = None,
                         device="cpu", batch_size: int = 8, progress: bool = True) -> tuple[nn.Module, OffloadStats]:
    """`calib.sequential`, but block i is read from disk just before `step` and dropped after.

    Args:
        folder: a safetensors model folder (config.json + one or more shards).
        input_ids: (n, L) calibration ids.
        step: `step(s: calib.BlockStep)`, may change the block in place.
        on_block_done: `fn(index, block)` called after the block ran (write it out here).
    Returns:
        the skeleton model (blocks back on meta) and timing.
    """
    from tqdm.auto import tqdm

    from .arch import LAYOUTS, get_path
    from .calib import BlockStep, _to, capture_block_inputs

    t0 = time.perf_counter()
    lazy = LazyCheckpoint(folder)
    model = skeleton(folder, lazy)
    blocks_path = LAYOUTS[model.config.model_type][0]
    hidden, kwargs = capture_block_inputs(model, input_ids)  # (n, L, d): the embedding only ran
    blocks = get_path(model, blocks_path)
    for i in tqdm(range(len(blocks)), desc="blocks (from disk)", disable=not progress):
        block = blocks[i]
        _materialize_(block, lazy.load(f"{blocks_path}.{i}."), device)
        s = BlockStep(i, block, hidden.to(device), _to(kwargs, device), batch_size)
        step(s)
        hidden = s.forward().cpu()
        if on_block_done is not None:
            on_block_done(i, block)
        block.to("meta")  # frees the block's storage
    return model, OffloadStats(time.perf_counter() - t0, len(blocks))


# ----------------------------------------------------------------------------- GPTQ, block by block


def gptq_block_step(bits: int = 4, group_size: int = 64, symmetric: bool = False, records: dict | None = None):
    """A `step(s)` that GPTQ-quantizes every linear of a block (dequantized weights written back
    so the next block sees the quantized outputs); the codes go to `records[(block, path)]`."""
    from .arch import linears
    from .calib import collect_input_stats

    def step(s) -> None:
        from .quant import gptq_quantize  # lazily: the quantization package may be absent

        stats = collect_input_stats(s.block, s.forward, hessian=True)
        for path, lin in linears(s.block).items():
            g = min(group_size, lin.in_features)
            q, sc, z = gptq_quantize(lin.weight, stats[path].hessian, bits, g, symmetric)
            W = sc.repeat_interleave(g, 1)[:, : lin.in_features] * (q.float() - z.repeat_interleave(g, 1)[:, : lin.in_features])
            lin.weight.copy_(W.to(lin.weight.dtype))
            if records is not None:
                records[(s.index, path)] = (q, sc, z, g)

    return step


def stats_block_step():
    """A `step(s)` that only gathers each linear's input statistics (Hessians included): the
    calibration pass every method makes, without changing the weights (for measurements)."""
    from .calib import collect_input_stats

    def step(s) -> None:
        collect_input_stats(s.block, s.forward, hessian=True)

    return step


def quantize_from_disk(folder: str | Path, out: str | Path, input_ids: Tensor, bits: int = 4, group_size: int = 64,
                       symmetric: bool = False, device="cpu", progress: bool = True) -> Path:
    """GPTQ a model on disk with one block resident; writes a packed checkpoint (one shard per
    block: qweight/scales/zeros, `quantization.json` in shrinklib.quant's format)."""
    from safetensors.torch import save_file

    from .arch import LAYOUTS
    from .quant import pack_codes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: dict = {}
    layers, weight_map = {}, {}

    def done(i: int, block: nn.Module) -> None:
        tensors = {}
        prefix = f"{blocks_path}.{i}."
        for name, t in block.state_dict().items():
            path = name.rpartition(".")[0]
            if (i, path) in records:
                if name.endswith(".weight"):
                    q, sc, z, g = records.pop((i, path))
                    tensors[prefix + path + ".qweight"] = pack_codes(q, bits).cpu()
                    tensors[prefix + path + ".scales"] = sc.float().cpu().contiguous()
                    tensors[prefix + path + ".zeros"] = z.float().cpu().contiguous()
                    layers[prefix + path] = {"bits": bits, "group_size": g, "in_features": q.shape[1],
                                             "out_features": q.shape[0], "bias": False}
                continue
            tensors[prefix + name] = t.detach().cpu().contiguous()
        shard = f"block-{i:05d}.safetensors"
        with atomic_path(out / shard) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        weight_map.update({k: shard for k in tensors})

    from transformers import AutoConfig

    blocks_path = LAYOUTS[AutoConfig.from_pretrained(folder).model_type][0]
    model, _ = sequential_from_disk(folder, input_ids, gptq_block_step(bits, group_size, symmetric, records), done,
                                    device, progress=progress)
    rest = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(blocks_path + ".") and v.device.type != "meta"}
    if getattr(model.config, "tie_word_embeddings", False):
        rest.pop("lm_head.weight", None)
    with atomic_path(out / "rest.safetensors") as tmp:
        save_file(rest, str(tmp), metadata={"format": "pt"})
    weight_map.update({k: "rest.safetensors" for k in rest})
    atomic_write_text(out / INDEX, json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    atomic_write_text(out / "quantization.json", json.dumps({"format": "shrinklib-int", "layers": layers}, indent=1))
    model.config.save_pretrained(out)
    return out


def load_packed(folder: str | Path) -> nn.Module:
    """Load a checkpoint written by `quantize_from_disk` (QuantLinear layers), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .arch import set_module
    from .quant import QuantLinear

    folder = Path(folder)
    meta = json.loads((folder / "quantization.json").read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    for name, spec in meta["layers"].items():
        set_module(model, name, QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["bias"]))
    state = LazyCheckpoint(folder).load("")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{folder}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------- measurement


def vm_hwm() -> int:
    """Peak resident set size of this process (Linux VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("VmHWM not available (Linux only)")


def calibration_ids(vocab: int, n: int, length: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def measure(folder: str | Path, mode: str, n: int = 8, length: int = 128, bits: int = 4, group_size: int = 64,
            out: str | Path | None = None, method: str = "gptq") -> dict:
    """Run GPTQ (or, method="stats", only the calibration statistics) on the model in `folder`
    either "layerwise" (from disk) or "whole" (loaded first, then `calib.sequential`), and report
    this process's peak memory. Run each mode in a fresh process."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .calib import sequential

    config = AutoConfig.from_pretrained(folder)
    ids = calibration_ids(config.vocab_size, n, length)
    base = vm_hwm()
    t0 = time.perf_counter()
    if mode == "layerwise" and method == "gptq":
        quantize_from_disk(folder, out or Path(folder).with_name(Path(folder).name + "-gptq"), ids, bits, group_size,
                           progress=False)
    elif mode == "layerwise":
        sequential_from_disk(folder, ids, stats_block_step(), progress=False)
    elif mode == "whole":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        sequential(model, ids, gptq_block_step(bits, group_size) if method == "gptq" else stats_block_step(), progress=False)
    elif mode == "load":
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        raise ValueError(f"mode must be 'layerwise', 'whole' or 'load', got {mode!r}")
    return {"mode": mode, "method": method, "peak_bytes": vm_hwm(), "before_bytes": base, "seconds": time.perf_counter() - t0,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "n_calib": n, "seq_len": length}


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m shrinklib.offload")
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write a random TinyLlama-1.1B-shaped checkpoint")
    mk.add_argument("--folder", required=True)
    mk.add_argument("--layers", type=int, default=None, help="fewer layers than the published 22")
    ms = sub.add_parser("measure", help="peak memory of GPTQ layer-wise vs whole")
    ms.add_argument("--folder", required=True)
    ms.add_argument("--mode", choices=["layerwise", "whole", "load"], required=True)
    ms.add_argument("--n", type=int, default=8)
    ms.add_argument("--seq-len", type=int, default=128)
    ms.add_argument("--method", choices=["gptq", "stats"], default="gptq")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.cmd == "make":
        from .params import PUBLISHED, config_of

        config = config_of(PUBLISHED["TinyLlama-1.1B"])
        if args.layers:
            config.num_hidden_layers = args.layers
        save_random_checkpoint(config, args.folder)
        print(json.dumps({"folder": args.folder, "layers": config.num_hidden_layers}))
    else:
        print(json.dumps(measure(args.folder, args.mode, args.n, args.seq_len, method=args.method)))


if __name__ == "__main__":
    main()
