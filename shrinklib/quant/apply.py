"""Model-level quantization: walk the decoder blocks (shrinklib.arch), calibrate layer by layer
(shrinklib.calib), and replace each linear by its quantized version in place.

The token embedding, the final norm and the LM head stay in float32.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from ..arch import blocks, get_path, layout, linears, set_module
from ..calib import InputStats, collect_input_stats, record_inputs, sequential
from .awq import awq_search_clip, awq_search_scale
from .config import AWQConfig, GPTQConfig, MXConfig, RTNConfig, SmoothQuantConfig
from .folding import fold_scale_, foldable, role_groups
from .formats import QTensor, dequantize, int_params, quantize, quantize_codes, resolve_group_size
from .gptq import gptq_quantize, gptq_quantize_mx
from .qlinear import QuantLinear, backend_class
from .smoothquant import W8A8Linear, smooth_scales, w8a8_class


def _install(block: nn.Module, path: str, qt: QTensor, backend: str | None) -> None:
    """Replace the linear at `path` with a quantized linear on `backend`, or (backend None) write
    the dequantized weight into it."""
    lin = get_path(block, path)
    if backend is not None:
        bias = lin.bias.detach() if lin.bias is not None else None
        set_module(block, path, backend_class(backend).from_qtensor(qt, bias))
    else:
        lin.weight.data.copy_(dequantize(qt).to(lin.weight.dtype))


@torch.no_grad()
def set_backend_(model: nn.Module, backend: str) -> nn.Module:
    """Move every quantized linear of a model to `backend` ("reference", "int", "codebook", "lut"; W8A8
    layers: "reference" or "int"), in place and without loss: each layer's weight is repacked in the
    backend's layout."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear) and type(m) is not (cls := backend_class(backend)):
            set_module(model, name, cls.from_qtensor(m.qtensor(), m.bias))
        elif isinstance(m, W8A8Linear) and type(m) is not (cls := w8a8_class(backend)):
            set_module(model, name, cls.from_w8a8(m))
    return model


@torch.no_grad()
def rtn_(model: nn.Module, config: RTNConfig, backend: str | None = "reference", progress: bool = True) -> None:
    """Round every block linear to nearest (a per-tensor grid is written back as float weights).

    Args:
        backend: where the quantized linears run (`set_backend_`); None writes dequantized floats back.
    """
    backend = backend if config.group_size != "tensor" else None
    for block in blocks(model):
        for path, lin in linears(block).items():
            _install(block, path, quantize(lin.weight.float(), config.fmt, config.bits, config.group_size,
                                           config.symmetric), backend)


def shared_input_stats(block: nn.Module, forward) -> dict[str, tuple[InputStats, list[str]]]:
    """Input statistics (with Hessians) of a block's linears, gathered once per distinct input: a
    linear called right after another on the same tensor (q/k/v, gate/up) shares that one's
    statistics instead of accumulating an equal Hessian again. Returns, per distinct input, its
    statistics and the paths of the linears reading it."""
    lins = linears(block)
    owner: dict[str, str] = {}
    stats: dict[str, InputStats] = {}
    last: list = [None, None]  # (name, x) of the previous call, kept alive so its memory is not reused

    def add(name: str, x: Tensor) -> None:
        if name not in owner:
            prev, px = last
            same = prev is not None and px.shape == x.shape and px.data_ptr() == x.data_ptr() and torch.equal(px, x)
            owner[name] = owner[prev] if same else name
        last[:] = [name, x]
        if owner[name] == name:
            stats.setdefault(name, InputStats()).add(x)

    with record_inputs(lins, add):
        forward()
    groups: dict[str, list[str]] = {}
    for name in lins:
        groups.setdefault(owner[name], []).append(name)
    return {first: (stats[first], paths) for first, paths in groups.items()}


def gptq_step(config: GPTQConfig | MXConfig, backend: str | None = "reference"):
    """The per-block step of GPTQ for `calib.sequential`: every linear of the block quantized on
    the Hessian of its calibration inputs (an integer grid, or a microscaling format's for an
    MXConfig), installed on `backend`."""

    def step(s):
        for st, paths in shared_input_stats(s.block, s.forward).values():
            lins = [get_path(s.block, p) for p in paths]
            # GPTQ treats rows independently given H, so linears reading the same input (q/k/v,
            # gate/up) are quantized as one stacked matrix: the same result, one column loop.
            W = torch.cat([lin.weight.detach().float() for lin in lins])
            rows = [lin.out_features for lin in lins]
            if isinstance(config, MXConfig):
                qts = gptq_quantize_mx(W, st.hessian, config.fmt, config.block_size, config.damp, rows=rows)
            else:
                g = resolve_group_size(config.group_size, lins[0].in_features)
                q, sc, z = gptq_quantize(W, st.hessian, config.bits, g, config.symmetric,
                                         config.damp, config.block_size, config.act_order)
                qts = [QTensor(*(t[r] for t in (q, sc, z)), g, "int", config.bits) for r in _row_slices(rows)]
            for path, qt in zip(paths, qts):
                _install(s.block, path, qt, backend)

    return step


def _row_slices(rows: list[int]) -> list[slice]:
    """Consecutive row ranges of matrices with `rows` rows stacked in order."""
    return [slice(e - r, e) for r, e in zip(rows, itertools.accumulate(rows))]


@torch.no_grad()
def gptq_(model: nn.Module, calib_ids: Tensor, config: GPTQConfig | MXConfig, backend: str | None = "reference", device=None,
          progress: bool = True, source=None) -> None:
    """GPTQ every block linear, block by block on the outputs of the already-quantized blocks.

    Args:
        source: where the blocks come from (`calib.InMemory`, the default, or `calib.FromDisk`).
    """
    sequential(model, calib_ids, gptq_step(config, backend), device=device, desc="GPTQ", progress=progress,
               source=source)


def _rtn_int(W: Tensor, bits: int, g: int, symmetric: bool, clip: float | Tensor = 1.0) -> QTensor:
    sc, z = int_params(W, bits, g, symmetric, clip)
    return QTensor(quantize_codes(W, sc, z, bits, g), sc, z, g, "int", bits)


@torch.no_grad()
def awq_(model: nn.Module, calib_ids: Tensor, config: AWQConfig, backend: str | None = "reference", device=None,
         progress: bool = True) -> dict:
    """AWQ: search and fold per-channel scales for each group of linears sharing an input, search
    clipping, then round to nearest. Returns the chosen α per block and role."""
    prev_of, lay = foldable(model), layout(model)
    roles = lay.roles()
    alphas: dict = {}

    def step(s):
        groups = role_groups(roles, s.block)
        covered = {p for grp in groups.values() for p in grp}
        for path, lin in linears(s.block).items():  # linears without a known role (e.g. fused qkv): plain RTN
            if path not in covered:
                W = lin.weight.float()
                gl = resolve_group_size(config.group_size, W.shape[1])
                _install(s.block, path, _rtn_int(W, config.bits, gl, config.symmetric), backend)
        firsts = {role: next(iter(g.values())) for role, g in groups.items()}
        inputs: dict[str, list[Tensor]] = {role: [] for role in groups}
        with record_inputs(firsts, lambda role, x: inputs[role].append(x.reshape(-1, x.shape[-1]))):
            s.forward()
        gen = torch.Generator().manual_seed(s.index)
        X = {}
        for role, xs in inputs.items():
            x = torch.cat(xs).float()  # (tokens, in)
            idx = torch.randperm(x.shape[0], generator=gen)[: config.max_tokens].to(x.device)
            X[role] = x[idx]
        for role, group in groups.items():
            if role in prev_of:
                g = resolve_group_size(config.group_size, X[role].shape[1])
                ws = [lin.weight.float() for lin in group.values()]
                sc, alpha = awq_search_scale(ws, X[role], X[role].abs().mean(0), config.bits, g, config.symmetric, config.n_grid)
                fold_scale_(get_path(s.block, prev_of[role]), list(group.values()), sc,
                            lay.prev_rows(role, s.block, model.config), lay.norm_offset)
                X[role] = X[role] / sc
                alphas[f"{s.index}.{role}"] = alpha
        for role, group in groups.items():
            for path, lin in group.items():
                W = lin.weight.float()
                g = resolve_group_size(config.group_size, W.shape[1])
                clip = 1.0
                if config.clip and path not in (lay.arch.q.path, lay.arch.k.path):  # AWQ leaves q/k unclipped
                    clip = awq_search_clip(W, X[role], config.bits, g, config.symmetric)
                _install(s.block, path, _rtn_int(W, config.bits, g, config.symmetric, clip), backend)

    sequential(model, calib_ids, step, device=device, desc="AWQ", progress=progress)
    return alphas


@torch.no_grad()
def smoothquant_(model: nn.Module, calib_ids: Tensor | None, config: SmoothQuantConfig, device=None,
                 progress: bool = True, backend: str = "reference") -> None:
    """Smooth (if config.smooth) then replace every block linear with a W8A8 linear on `backend`
    ("reference": float GEMM of the int8 codes; "int": the int8 GEMM kernel)."""
    cls = w8a8_class(backend)
    if config.smooth:
        if calib_ids is None:
            raise ValueError("SmoothQuant needs calibration ids to measure activation ranges")
        prev_of, lay = foldable(model), layout(model)
        roles = lay.roles()

        def step(s):
            stats = collect_input_stats(s.block, s.forward, hessian=False)
            for role, group in role_groups(roles, s.block).items():
                if role in prev_of and role != "mlp_out":  # the paper smooths the inputs after a norm
                    act_max = stats[next(iter(group))].abs_max
                    sc = smooth_scales(act_max, [lin.weight.float() for lin in group.values()], config.alpha)
                    fold_scale_(get_path(s.block, prev_of[role]), list(group.values()), sc,
                                lay.prev_rows(role, s.block, model.config), lay.norm_offset)

        sequential(model, calib_ids, step, device=device, desc="SmoothQuant", progress=progress)
    for block in blocks(model):
        for path, lin in linears(block).items():
            set_module(block, path, cls.from_linear(lin, config.w_bits, config.a_bits, config.act_granularity))


@torch.no_grad()
def quantize_inputs_(model: nn.Module, a_bits: int = 8, act_granularity: str = "per_token") -> None:
    """Add dynamic activation quantization to a weight-quantized model: every QuantLinear (a
    symmetric per-channel grid, e.g. GPTQ with group_size=None, symmetric=True) becomes the
    W8A8Linear of the same codes with `a_bits`-bit activations (W4A8, W4A4 ...)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            set_module(model, name, W8A8Linear(m.qtensor(), m.bias, a_bits, act_granularity))


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of a model by its full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_supported(model: nn.Module) -> None:
    """Raise the adapter's clear error if the model's layout is unknown."""
    layout(model)
