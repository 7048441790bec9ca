"""SliceGPT (Ashkboos et al., 2024): rotate the residual stream into its principal axes and
delete the least significant ones, so every weight matrix loses rows or columns.

Steps: (1) make every norm rotation-invariant: fold each norm's scale (and a LayerNorm's bias)
into the linears that read it, so the norms become scale-free and RMSNorm(xQ) = RMSNorm(x)Q; a
LayerNorm (OPT) also subtracts the mean, which commutes with no rotation, so the mean is removed
from everything that writes to the stream instead (embeddings, o and down rows and biases), after
which the LayerNorm equals an RMSNorm and is replaced by one (the paper's Sec. 3.2); (2) walk the
blocks in order with calibration data; at each residual point (block input, after attention,
after the MLP) take Q = the eigenvectors of XᵀX, sorted by eigenvalue; rotate the weights that
write to the stream by Qᵀ and those that read it by Q; (3) keep the first d' columns of each Q.

The residual stream is expressed in a different basis before and after each sub-layer, so
the skip connection needs the change of basis Q_inᵀQ_out: a bias-free (d', d') linear
`attn_shortcut` and `mlp_shortcut` in every block. They act through forward hooks on the
modules whose outputs are the residual branches (`shrinklib.arch`): the attention branch becomes
attn(x) + x·S_attn − x, so the block's own residual add gives x·S_attn + attn(x); the block's
forward is never copied, so any architecture of `shrinklib.arch` whose branches are modules works.
`save_sliced`/`load_sliced` store the model as config.json (hidden_size = d', plus a "slicegpt"
entry) and model.safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import arch
from ..calib import capture_block_inputs, run_block
from ..checks import check_fields
from ..io import staged_folder


@dataclass(frozen=True)
class SliceGPTConfig:
    """slicing: fraction of the embedding dimension deleted (SliceGPT's "slicing"), in [0, 1);
    multiple: the kept dimension d' is rounded down to a multiple of this (8 suits kernels)."""

    slicing: float = 0.25
    multiple: int = 8
    d_kept: int | None = None  # the kept dimension itself, overriding slicing (e.g. to match a parameter count)

    def __post_init__(self):
        check_fields(self)
        if not 0.0 <= self.slicing < 1.0:
            raise ValueError(f"slicing must be in [0, 1), got {self.slicing}")
        if self.multiple < 1 or (self.d_kept is not None and self.d_kept < 1):
            raise ValueError(f"multiple and d_kept must be ≥ 1, got {self.multiple}, {self.d_kept}")

    def kept_dim(self, d: int) -> int:
        if self.d_kept is not None:
            if self.d_kept > d:
                raise ValueError(f"d_kept={self.d_kept} exceeds the hidden size {d}")
            return self.d_kept
        return max(self.multiple, int(d * (1 - self.slicing)) // self.multiple * self.multiple) if self.slicing else d


def sliced_param_count(config, d2: int) -> int:
    """Parameters of a model of `config` sliced to d2: the architecture's formula at hidden d2 with
    an untied head, plus two (d2, d2) shortcuts per block (a LayerNorm model: its norms lose their
    biases, which move into the readers and a head bias)."""
    n = arch.param_count(config, hidden=d2, tied=False) + 2 * config.num_hidden_layers * d2 * d2
    if arch.ARCHS[config.model_type].norm == "layer":
        n += config.vocab_size - (2 * config.num_hidden_layers + 1) * d2
    return int(n)


def kept_dim_for_params(config, target: int, multiple: int = 8) -> int:
    """The largest kept dimension (a multiple of `multiple`) whose sliced model has at most `target` parameters."""
    d2 = config.hidden_size // multiple * multiple
    while d2 > multiple and sliced_param_count(config, d2) > target:
        d2 -= multiple
    return d2


def pca_basis(X: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of XᵀX sorted by decreasing eigenvalue: (Q (d, d), eigenvalues (d,)). X (..., d)."""
    X = X.reshape(-1, X.shape[-1]).double()  # (tokens, d)
    evals, Q = torch.linalg.eigh(X.T @ X)
    order = torch.argsort(evals, descending=True)
    return Q[:, order], evals[order]


class _Shortcuts:
    """The forward hooks that route a block's residual adds through its shortcut linears."""

    def __init__(self, lay: arch.Layout, layer: nn.Module):
        self.layer, self.x, self.mid = layer, None, None
        a = lay.arch
        layer.register_forward_pre_hook(self.on_block, with_kwargs=True)
        arch.get_path(layer, a.attn_branch).register_forward_hook(self.on_attn)
        arch.get_path(layer, a.mlp_norm).register_forward_pre_hook(self.on_mlp_norm)
        arch.get_path(layer, a.mlp_branch).register_forward_hook(self.on_mlp)

    def on_block(self, module, args, kwargs):
        self.x = args[0] if args else kwargs["hidden_states"]  # (b, L, d') the residual entering the block

    def on_attn(self, module, args, out):
        branch = out[0] if isinstance(out, tuple) else out
        branch = branch + self.layer.attn_shortcut(self.x) - self.x  # the add then gives x·S_attn + attn
        self.x = None
        return (branch, *out[1:]) if isinstance(out, tuple) else branch

    def on_mlp_norm(self, module, args):
        self.mid = args[0]  # the residual after attention

    def on_mlp(self, module, args, out):
        out = out + self.layer.mlp_shortcut(self.mid) - self.mid
        self.mid = None
        return out


def add_shortcuts_(layer: nn.Module, d_in: int, d_mid: int, d_out: int, lay: arch.Layout) -> nn.Module:
    """Give a decoder layer the two shortcut linears and the hooks that use them."""
    if not hasattr(layer, "attn_shortcut"):
        w = next(layer.parameters())
        layer.attn_shortcut = nn.Linear(d_in, d_mid, bias=False, device=w.device, dtype=w.dtype)
        layer.mlp_shortcut = nn.Linear(d_mid, d_out, bias=False, device=w.device, dtype=w.dtype)
        layer._slicegpt_hooks = _Shortcuts(lay, layer)
    return layer


def _set_linear_(lin: nn.Linear, W: Tensor, bias: Tensor | None = None) -> None:
    """Give a linear a new weight (any shape) and, if given, bias, in place."""
    lin.weight = nn.Parameter(W.contiguous())
    lin.out_features, lin.in_features = W.shape
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous())


def _norm(norm: nn.Module, d: int, value: float) -> nn.Module:
    """The same RMSNorm module at width d, weight filled with `value` (Gemma's x̂·(1 + w): pass the scale − 1)."""
    norm.weight = nn.Parameter(torch.full((d,), value, dtype=norm.weight.dtype, device=norm.weight.device))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (d,)
    return norm


def _center_(W: Tensor, dim: int) -> None:
    """Subtract the mean over `dim` (the stream's channels) in place: outputs become zero-mean."""
    W.sub_(W.mean(dim, keepdim=True))


def _rmsnorm_for(ln: nn.Module) -> nn.RMSNorm:
    """An RMSNorm equal to a LayerNorm on zero-mean inputs, weight 1 (its affine is folded out)."""
    w = ln.weight
    return nn.RMSNorm(w.shape[0], eps=ln.eps, device=w.device, dtype=w.dtype).requires_grad_(w.requires_grad)


@torch.no_grad()
def _fold_into_readers_(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    """reader(x̂·(offset + w) + β) = (W·diag(offset + w)) x̂ + (Wβ + b)."""
    scale = norm.weight + offset
    beta = getattr(norm, "bias", None)
    for lin in readers:
        if beta is not None:
            b = lin.weight @ beta.to(lin.weight.dtype)  # (out,)
            lin.bias = nn.Parameter(b if lin.bias is None else lin.bias + b)
        lin.weight.mul_(scale[None, :].to(lin.weight.dtype))


@torch.no_grad()
def fold_norms_(model: nn.Module, technique: str = "slicegpt", what: str = "SliceGPT") -> None:
    """Fold every norm's scale (and bias) into the linears that read it (norm weights become 1) and,
    for LayerNorm models, remove the mean from every writer and replace the LayerNorms by RMSNorms;
    unties lm_head. The model computes the same function.

    Args:
        technique, what: the `shrinklib.arch` technique the caller needs, and its name in the error.
    """
    lay = arch.require(model, technique, what)
    layer_norm, offset = lay.arch.norm == "layer", lay.norm_offset
    for b in lay.blocks(model):
        for path, readers in lay.readers(b).items():
            norm = arch.get_path(b, path)
            _fold_into_readers_(norm, readers, offset)
            if layer_norm:
                arch.set_module(b, path, _rmsnorm_for(norm))
            else:
                norm.weight.fill_(1.0 - offset)
        if layer_norm:
            for lin in lay.writers(b):
                _center_(lin.weight.data, 0)
                if lin.bias is not None:
                    _center_(lin.bias.data, 0)
    head, embed = model.get_output_embeddings(), lay.embed(model)
    if head.weight is embed.weight:  # the scale cannot be folded into a shared matrix
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    final = lay.final_norm(model)
    _fold_into_readers_(final, [head], offset)
    if layer_norm:
        for e in (embed, lay.positions(model)):
            _center_(e.weight.data, 1)
        arch.set_module(model, lay.norm_path, _rmsnorm_for(final))
    else:
        final.weight.fill_(1.0 - offset)


def _signals(layer: nn.Module, x: Tensor, kwargs: dict, batch_size: int, lay: arch.Layout) -> tuple[Tensor, Tensor]:
    """(after attention, after MLP) residual signals of an unrotated, norm-folded layer; x (n, L, d)."""
    mids = []
    hook = arch.get_path(layer, lay.arch.mlp_norm).register_forward_pre_hook(lambda m, args: mids.append(args[0]))
    try:
        out = run_block(layer, x, kwargs, batch_size)
    finally:
        hook.remove()
    return torch.cat(mids), out


@torch.no_grad()
def slicegpt_(model: nn.Module, config: SliceGPTConfig, calib_ids: Tensor, batch_size: int = 8) -> dict:
    """Rotate and slice a model in place; returns the kept dimension and the fraction of variance
    kept at every residual point.

    Args:
        model: a causal LM of an architecture `shrinklib.arch` knows (UnsupportedArchitectureError,
            before any change, where SliceGPT does not apply, e.g. Gemma 2's post-norms).
        config: the slicing fraction.
        calib_ids: (n, L) calibration ids for the PCA.
    """
    lay = arch.require(model, "slicegpt", "SliceGPT")
    fold_norms_(model)
    d = model.config.hidden_size
    d2 = config.kept_dim(d)
    scale = math.sqrt(d / d2)  # RMSNorm over d' kept coordinates: ‖x̃‖ ≈ ‖x‖ but the mean divides by d'
    hidden, _ = capture_block_inputs(model, calib_ids)  # (n, L, d) what block 0 reads
    Q, ev = pca_basis(hidden)
    Q = Q[:, :d2].to(hidden.dtype)  # (d, d')
    kept = [(ev[:d2].sum() / ev.sum()).item()]
    for e in (lay.embed(model), lay.positions(model)):
        if e is not None:
            e.weight = nn.Parameter(e.weight @ Q)  # (V, d')
            e.embedding_dim = d2
    hidden, kwargs = capture_block_inputs(model, calib_ids)  # (n, L, d') in the basis Q
    for layer in lay.blocks(model):
        x = hidden @ Q.T  # (n, L, d) back in the original coordinates (exact when d' = d)
        mid, out = _signals(layer, x, kwargs, batch_size, lay)
        Q_mid, ev_mid = pca_basis(mid)
        Q_out, ev_out = pca_basis(out)
        Q_mid, Q_out = Q_mid[:, :d2].to(Q.dtype), Q_out[:, :d2].to(Q.dtype)
        kept += [(ev_mid[:d2].sum() / ev_mid.sum()).item(), (ev_out[:d2].sum() / ev_out.sum()).item()]
        readers = lay.readers(layer)
        for lin in readers[lay.arch.attn_norm]:
            _set_linear_(lin, lin.weight @ Q)  # (out, d')
        for lin in readers[lay.arch.mlp_norm]:
            _set_linear_(lin, lin.weight @ Q_mid)
        for lin, Qw in zip(lay.writers(layer), (Q_mid, Q_out)):  # (d', in): rows in the new basis
            _set_linear_(lin, Qw.T @ lin.weight, None if lin.bias is None else lin.bias @ Qw)
        for path in (lay.arch.attn_norm, lay.arch.mlp_norm):
            _norm(arch.get_path(layer, path), d2, scale - lay.norm_offset)
        add_shortcuts_(layer, d2, d2, d2, lay)
        layer.attn_shortcut.weight.copy_(Q_mid.T @ Q)  # x̃_in Qᵀ Q_mid, as a Linear (out, in)
        layer.mlp_shortcut.weight.copy_(Q_out.T @ Q_mid)
        hidden = run_block(layer, hidden, kwargs, batch_size)
        Q = Q_out
    _norm(lay.final_norm(model), d2, scale - lay.norm_offset)
    head = model.get_output_embeddings()
    _set_linear_(head, head.weight @ Q)  # (V, d')
    cfg = model.config
    cfg.head_dim = arch.head_dim(cfg)
    cfg.slicegpt = {"original_hidden_size": d, "slicing": config.slicing}
    cfg.hidden_size = d2
    return {"d": d, "d_kept": d2, "variance_kept": kept}


def save_sliced(model: nn.Module, folder: str | Path, overwrite: bool = False) -> Path:
    """Write config.json and model.safetensors of a sliced model (read back with `load_sliced`), under
    a temporary name renamed at the end; an existing folder is replaced only when the suite wrote
    it (or with `overwrite`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with staged_folder(folder, overwrite, what="SliceGPT folder") as tmp:
        model.config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    return folder


def load_sliced(folder: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A sliced model saved by `save_sliced`: the model built from its config at the original width
    (so every head keeps its width, whatever the architecture derives it from), its norms made
    RMSNorms where they were LayerNorms, the shortcuts added, then every stored tensor put in place."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    entry = json.loads((folder / "config.json").read_text()).get("slicegpt")
    if entry is None:
        raise ValueError(f"{folder} is not a SliceGPT model (no 'slicegpt' entry in config.json)")
    d2 = config.hidden_size
    config.hidden_size = entry["original_hidden_size"]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lay = arch.layout(model)
    if lay.arch.norm == "layer":
        for b in lay.blocks(model):
            for path in (lay.arch.attn_norm, lay.arch.mlp_norm):
                arch.set_module(b, path, _rmsnorm_for(arch.get_path(b, path)))
        arch.set_module(model, lay.norm_path, _rmsnorm_for(lay.final_norm(model)))
    for layer in lay.blocks(model):
        add_shortcuts_(layer, d2, d2, d2, lay)
    state = load_file(str(folder / "model.safetensors"))
    missing = set(model.state_dict()) - set(state)
    if missing - {k for k in missing if k.endswith("lm_head.weight")}:
        raise ValueError(f"{folder}: tensors missing from model.safetensors: {sorted(missing)[:4]}")
    for key, t in state.items():
        owner, _, name = key.rpartition(".")
        module = arch.get_path(model, owner)
        setattr(module, name, nn.Parameter(t.to(dtype)) if t.is_floating_point() else t)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = module.weight.shape[1]
        elif hasattr(module, "normalized_shape"):
            module.normalized_shape = (module.weight.shape[0],)
    model.config.hidden_size = d2
    model.config.tie_word_embeddings = False
    return model.to(device).eval()
