"""Layer-by-layer calibration, shared by GPTQ, AWQ, SmoothQuant, Wanda, SparseGPT, SliceGPT.

The model runs once up to its first block to capture that block's inputs. Then each block
in turn is moved to the compute device, handed to the algorithm (which may read its input
statistics and change its weights), and run again so that the next block is calibrated
on the outputs of the blocks already compressed (GPTQ's "sequential" order). Only one
block is on the compute device at a time.

Where the blocks come from is a block source: `InMemory` (the model's own blocks, moved to the
compute device in turn) or `FromDisk` (each block read from a safetensors folder when its turn
comes and dropped after, so a model larger than memory is calibrated with about one block
resident; `streamed_model` builds the model with only the embedding, final norm and head loaded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import blocks, get_path, layout, linears
from .checks import check_device, check_token_ids
from .io import SafetensorsReader


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first block."""


CACHE_KWARGS = ("past_key_values", "past_key_value", "use_cache")  # a block call's KV-cache arguments


def to_device(obj, device):
    """Move tensors (also inside tuples, lists and dicts, e.g. a batch or a block call's cached
    arguments) to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def block_inputs(model: nn.Module, index: int, **inputs) -> tuple[Tensor, dict]:
    """What decoder block `index` receives in the forward pass `model(**inputs)`, which stops there.

    Returns:
        hidden: the hidden states entering the block, (n, L, d).
        kwargs: the other arguments of the block call (position embeddings, masks), without the
            cache arguments (`past_key_values`, `use_cache`), which callers set for themselves.
    """
    captured: dict = {}

    def hook(module, args, kwargs):
        captured.update(kwargs, hidden=args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = blocks(model)[index].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    for key in ("hidden_states", *CACHE_KWARGS):
        captured.pop(key, None)
    return captured.pop("hidden"), captured


def cache_prefix(model: nn.Module, batch: dict, start: int) -> dict:
    """`batch` plus what block `start` receives: the hidden states computed once by the frozen
    embeddings and blocks below it, and the block call's other arguments (position embeddings,
    mask). `final_hidden` then runs only blocks `start`, `start + 1`, ... on it, so training or
    evaluating the top blocks costs a few blocks per step."""
    hidden, kwargs = block_inputs(model, start, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return {**batch, "hidden": hidden, "block_kwargs": kwargs, "start": start}


def final_hidden(model: nn.Module, batch: dict) -> Tensor:
    """The decoder's last hidden states (n, L, d), after its final norm: from the token ids, or
    from a `cache_prefix` batch by running only the blocks above the cached ones."""
    if "hidden" not in batch:
        out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state
    h = batch["hidden"]  # (n, L, d) entering block `start`
    for block in blocks(model)[batch["start"]:]:
        out = block(h, **batch["block_kwargs"])
        h = out[0] if isinstance(out, tuple) else out
    return layout(model).final_norm(model)(h)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: Tensor) -> tuple[Tensor, dict]:
    """Inputs of the first decoder block for every calibration sequence.

    Args:
        model: a causal LM supported by `shrinklib.arch`.
        input_ids: (n, L) token ids, all sequences of the same length.

    Returns:
        hidden: (n, L, d) hidden states entering block 0.
        kwargs: the other arguments of the block call (position embeddings, masks), captured
            for one sequence; they broadcast over the batch.
    """
    check_token_ids(input_ids, model, what="calibration input_ids")
    device = next(model.parameters()).device
    captured = [block_inputs(model, 0, input_ids=row[None].to(device)) for row in input_ids]
    return torch.cat([h for h, _ in captured]), {**captured[0][1], "use_cache": False}


@torch.no_grad()
def run_block(block: nn.Module, hidden: Tensor, kwargs: dict, batch_size: int = 8) -> Tensor:
    """Outputs of one block for all inputs, in batches. Shape (n, L, d) in and out."""
    device = next(block.parameters()).device
    kwargs = to_device(kwargs, device)
    outs = []
    for start in range(0, hidden.shape[0], batch_size):
        out = block(hidden[start : start + batch_size].to(device), **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out).to(hidden.device))
    return torch.cat(outs)


@contextmanager
def record_inputs(modules: dict[str, nn.Module], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
    """While active, every forward call of `modules[name]` calls `fn(name, x)` with its input."""
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: fn(name, args[0].detach()))
        for name, m in modules.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class InputStats:
    """Statistics of the inputs x (rows are tokens) of one linear layer.

    hessian: H = 2/N Σ x xᵀ, (in, in) (GPTQ Eq. 2 up to the factor; SparseGPT), if asked.
    sq_sum: Σ x², (in,); Wanda's ‖X_j‖₂ is sq_sum.sqrt().
    abs_sum: Σ |x|, (in,); AWQ's mean activation magnitude is abs_sum / n.
    abs_max: max |x|, (in,); SmoothQuant's activation range.
    n: number of tokens seen.
    """

    hessian: Tensor | None = None
    sq_sum: Tensor | None = None
    abs_sum: Tensor | None = None
    abs_max: Tensor | None = None
    n: int = 0
    keep_hessian: bool = field(default=True, repr=False)

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.sq_sum is None:
            d = x.shape[1]
            self.sq_sum = x.new_zeros(d)
            self.abs_sum = x.new_zeros(d)
            self.abs_max = x.new_zeros(d)
            if self.keep_hessian:
                self.hessian = x.new_zeros(d, d)
        n_new = x.shape[0]
        if self.hessian is not None:  # running mean of 2 x xᵀ, numerically stable
            self.hessian.mul_(self.n / (self.n + n_new)).addmm_(x.T, x, alpha=2.0 / (self.n + n_new))
        self.sq_sum += (x * x).sum(0)
        self.abs_sum += x.abs().sum(0)
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(0))
        self.n += n_new


def collect_input_stats(
    block: nn.Module, forward: Callable[[], Tensor], names: list[str] | None = None, hessian: bool = True
) -> dict[str, InputStats]:
    """Run `forward()` (the block on its calibration inputs) and gather each linear's input statistics."""
    mods = {k: v for k, v in linears(block).items() if names is None or k in names}
    stats = {k: InputStats(keep_hessian=hessian) for k in mods}
    with record_inputs(mods, lambda name, x: stats[name].add(x)):
        forward()
    return stats


@dataclass
class BlockStep:
    """What the per-block callback receives."""

    index: int
    block: nn.Module
    hidden: Tensor  # (n, L, d) inputs of this block
    kwargs: dict
    batch_size: int

    def forward(self) -> Tensor:
        """Run the block (as it is now) on its calibration inputs."""
        return run_block(self.block, self.hidden, self.kwargs, self.batch_size)


class InMemory:
    """Block source: the model's own blocks, each moved to the compute device for its turn."""

    def __init__(self, model: nn.Module):
        self.home = next(model.parameters()).device

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        block.to(device)

    def release(self, index: int, block: nn.Module) -> None:
        block.to(self.home)


def materialize_(module: nn.Module, tensors: dict[str, Tensor], device) -> None:
    """Give a meta-device module real storage and the checkpoint's values."""
    module.to_empty(device=device)
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
        raise ValueError(f"checkpoint does not match the module: missing {missing[:4]}, unexpected {unexpected[:4]}")


class FromDisk:
    """Block source: block i read from a safetensors folder when its turn comes, dropped after
    (back to the meta device): about one block resident."""

    def __init__(self, folder: str | Path, blocks_path: str):
        self.reader, self.blocks_path = SafetensorsReader(folder), blocks_path

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        materialize_(block, self.reader.load(f"{self.blocks_path}.{index}."), device)

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")  # frees the block's storage


def streamed_model(folder: str | Path) -> tuple[nn.Module, FromDisk]:
    """The model of a safetensors folder with its blocks on the meta device (shapes, no storage) and
    everything else loaded (embedding, final norm, head, rotary tables), and the `FromDisk` source
    that reads the blocks in turn."""
    from transformers import AutoConfig

    from .params import build_on_meta

    config = AutoConfig.from_pretrained(folder)
    model = build_on_meta(config)
    source = FromDisk(folder, layout(model).blocks_path)
    for name, child in model.named_modules():
        if not name or name.startswith(source.blocks_path) or list(child.children()):
            continue
        if not (list(child.parameters(recurse=False)) or list(child.buffers(recurse=False))):
            continue
        tensors = source.reader.load(name + ".")
        if "rotary" in name:  # buffers computed from the config, not stored
            parent, _, attr = name.rpartition(".")
            setattr(get_path(model, parent) if parent else model, attr, type(child)(config=config))
        elif tensors or not getattr(config, "tie_word_embeddings", False):
            materialize_(child, tensors, "cpu")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), source


@torch.no_grad()
def sequential(
    model: nn.Module,
    input_ids: Tensor,
    step: Callable[[BlockStep], None],
    device: str | torch.device | None = None,
    batch_size: int = 8,
    desc: str = "blocks",
    progress: bool = True,
    source: InMemory | FromDisk | None = None,
) -> None:
    """Call `step` on each block in order; block i+1 is calibrated on the outputs of the
    already-changed blocks 0..i. Only the current block is on `device`.

    Args:
        model: a supported causal LM (see `shrinklib.arch`), or the skeleton of `streamed_model`.
        input_ids: (n, L) calibration token ids.
        step: called once per block; may change the block in place (and, from disk, write it out).
        device: compute device for the block (default: where the model is).
        batch_size: sequences per block call.
        desc: label of the progress bar.
        source: where the blocks come from (default `InMemory(model)`).
    """
    layout(model)  # fail early, with the adapter's message, on an unsupported model
    source = source or InMemory(model)
    home = next(p for p in model.parameters() if p.device.type != "meta").device
    device = check_device(device) if device is not None else home
    hidden, kwargs = capture_block_inputs(model, input_ids)
    for i, block in enumerate(tqdm(blocks(model), desc=desc, disable=not progress)):
        source.load(i, block, device)
        s = BlockStep(i, block, hidden.to(device), to_device(kwargs, device), batch_size)
        step(s)
        hidden = s.forward()
        source.release(i, block)
