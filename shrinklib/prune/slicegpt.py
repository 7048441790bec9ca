"""SliceGPT (Ashkboos et al., 2024): rotate the residual stream into its principal axes and
delete the least significant ones, so every weight matrix loses rows or columns.

Steps (Llama blocks): (1) fold each RMSNorm's scale into the linears that read it, so the
norms become scale-free and commute with rotations (RMSNorm(xQ) = RMSNorm(x)Q); (2) walk the
blocks in order with calibration data; at each residual point (block input, after attention,
after the MLP) take Q = the eigenvectors of XᵀX, sorted by eigenvalue; rotate the weights that
write to the stream by Qᵀ and those that read it by Q; (3) keep the first d' columns of each Q.

The residual stream is expressed in a different basis before and after each sub-layer, so
the skip connection needs the change of basis Q_inᵀQ_out: a bias-free (d', d') linear
`attn_shortcut` and `mlp_shortcut` in every block. That is the only extra module; a block
with them is `ShortcutLlamaDecoderLayer` (a Llama decoder layer whose residual adds go through
the shortcuts). `save_sliced`/`load_sliced` store the model as config.json (hidden_size = d',
plus a "slicegpt" entry) and model.safetensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..arch import blocks, layout
from ..calib import capture_block_inputs, run_block, to_device
from ..checks import check_fields
from ..io import staged_folder
from .llm_pruner import check_llama


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
    """Parameters of a Llama `config` sliced to d2: untied embedding and head, every block's
    linears reading or writing d2, two (d2, d2) shortcuts and two norms per block."""
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q, kv, inter = config.num_attention_heads * hd, config.num_key_value_heads * hd, config.intermediate_size
    block = d2 * (q + 2 * kv) + q * d2 + 3 * inter * d2 + 2 * d2 * d2 + 2 * d2
    return 2 * config.vocab_size * d2 + config.num_hidden_layers * block + d2


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


class ShortcutLlamaDecoderLayer(nn.Module):
    """Marker base: see `_shortcut_forward`; instances are LlamaDecoderLayers whose class was extended."""


def _shortcut_forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                      use_cache=False, position_embeddings=None, **kwargs):
    """The Llama decoder layer with the skip connections rotated: x·S_attn + attn, then ·S_mlp + mlp."""
    h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
                          position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache,
                          position_embeddings=position_embeddings, **kwargs)
    x = self.attn_shortcut(hidden_states) + h  # (b, L, d')
    return self.mlp_shortcut(x) + self.mlp(self.post_attention_layernorm(x))


_SHORTCUT_CLASSES: dict[type, type] = {}


def add_shortcuts_(layer: nn.Module, d_in: int, d_mid: int, d_out: int) -> nn.Module:
    """Give a Llama decoder layer the two shortcut linears and the rotated-skip forward."""
    kw = {"bias": False, "device": layer.self_attn.q_proj.weight.device, "dtype": layer.self_attn.q_proj.weight.dtype}
    layer.attn_shortcut = nn.Linear(d_in, d_mid, **kw)
    layer.mlp_shortcut = nn.Linear(d_mid, d_out, **kw)
    base = type(layer)
    if not issubclass(base, ShortcutLlamaDecoderLayer):
        if base not in _SHORTCUT_CLASSES:
            _SHORTCUT_CLASSES[base] = type("Shortcut" + base.__name__, (base, ShortcutLlamaDecoderLayer), {"forward": _shortcut_forward})
        layer.__class__ = _SHORTCUT_CLASSES[base]
    return layer


def _linear(W: Tensor, like: nn.Linear) -> nn.Linear:
    new = nn.Linear(W.shape[1], W.shape[0], bias=False, device=like.weight.device, dtype=like.weight.dtype)
    new.weight.data.copy_(W)
    return new


def _norm(norm: nn.Module, d: int, value: float) -> nn.Module:
    """The same RMSNorm module type at width d, weight filled with `value`."""
    norm.weight = nn.Parameter(torch.full((d,), value, dtype=norm.weight.dtype, device=norm.weight.device))
    return norm


@torch.no_grad()
def fold_norms_(model: nn.Module) -> None:
    """Fold every RMSNorm scale into the linears that read it (norm weights become 1); unties lm_head."""
    check_llama(model)
    for b in blocks(model):
        for norm, readers in ((b.input_layernorm, (b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj)),
                              (b.post_attention_layernorm, (b.mlp.gate_proj, b.mlp.up_proj))):
            for lin in readers:
                lin.weight.mul_(norm.weight[None, :].to(lin.weight.dtype))
            norm.weight.fill_(1.0)
    final, head = layout(model).final_norm(model), model.lm_head
    if head.weight is layout(model).embed(model).weight:  # the scale cannot be folded into a shared matrix
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    head.weight.mul_(final.weight[None, :].to(head.weight.dtype))
    final.weight.fill_(1.0)


def _signals(layer: nn.Module, x: Tensor, kwargs: dict, batch_size: int) -> tuple[Tensor, Tensor]:
    """(after attention, after MLP) residual signals of an unrotated, norm-folded layer; x (n, L, d)."""
    kwargs = to_device(kwargs, x.device)
    mids, outs = [], []
    for s in range(0, x.shape[0], batch_size):
        xb = x[s : s + batch_size]
        mid = xb + layer.self_attn(hidden_states=layer.input_layernorm(xb), **kwargs)[0]
        mids.append(mid)
        outs.append(mid + layer.mlp(layer.post_attention_layernorm(mid)))
    return torch.cat(mids), torch.cat(outs)


@torch.no_grad()
def slicegpt_(model: nn.Module, config: SliceGPTConfig, calib_ids: Tensor, batch_size: int = 8) -> dict:
    """Rotate and slice a Llama-architecture model in place; returns the kept dimension and
    the fraction of variance kept at every residual point.

    Args:
        model: a Llama-family causal LM (raises UnsupportedArchitectureError otherwise).
        config: the slicing fraction.
        calib_ids: (n, L) calibration ids for the PCA.
    """
    fold_norms_(model)
    d = model.config.hidden_size
    d2 = config.kept_dim(d)
    scale = math.sqrt(d / d2)  # RMSNorm over d' kept coordinates: ‖x̃‖ ≈ ‖x‖ but the mean divides by d'
    embed = layout(model).embed(model)
    Q, ev = pca_basis(embed.weight[calib_ids])
    Q = Q[:, :d2].to(embed.weight.dtype)  # (d, d')
    kept = [(ev[:d2].sum() / ev.sum()).item()]
    embed.weight = nn.Parameter(embed.weight @ Q)  # (V, d')
    embed.embedding_dim = d2
    hidden, kwargs = capture_block_inputs(model, calib_ids)  # (n, L, d') in the basis Q
    for layer in blocks(model):
        x = hidden @ Q.T  # (n, L, d) back in the original coordinates (exact when d' = d)
        mid, out = _signals(layer, x, kwargs, batch_size)
        Q_mid, ev_mid = pca_basis(mid)
        Q_out, ev_out = pca_basis(out)
        Q_mid, Q_out = Q_mid[:, :d2].to(Q.dtype), Q_out[:, :d2].to(Q.dtype)
        kept += [(ev_mid[:d2].sum() / ev_mid.sum()).item(), (ev_out[:d2].sum() / ev_out.sum()).item()]
        att, mlp = layer.self_attn, layer.mlp
        att.q_proj, att.k_proj, att.v_proj = (_linear(lin.weight @ Q, lin) for lin in (att.q_proj, att.k_proj, att.v_proj))
        att.o_proj = _linear(Q_mid.T @ att.o_proj.weight, att.o_proj)  # (d', heads·hd)
        mlp.gate_proj, mlp.up_proj = (_linear(lin.weight @ Q_mid, lin) for lin in (mlp.gate_proj, mlp.up_proj))
        mlp.down_proj = _linear(Q_out.T @ mlp.down_proj.weight, mlp.down_proj)  # (d', inter)
        _norm(layer.input_layernorm, d2, scale), _norm(layer.post_attention_layernorm, d2, scale)
        add_shortcuts_(layer, d2, d2, d2)
        layer.attn_shortcut.weight.copy_(Q_mid.T @ Q)  # x̃_in Qᵀ Q_mid, as a Linear (out, in)
        layer.mlp_shortcut.weight.copy_(Q_out.T @ Q_mid)
        hidden = run_block(layer, hidden, kwargs, batch_size)
        Q = Q_out
    _norm(layout(model).final_norm(model), d2, scale)
    model.lm_head = _linear(model.lm_head.weight @ Q, model.lm_head)  # (V, d')
    cfg = model.config
    cfg.head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
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
    """A sliced model saved by `save_sliced`: the Llama built from its config, plus the shortcuts."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if "slicegpt" not in json.loads((folder / "config.json").read_text()):
        raise ValueError(f"{folder} is not a SliceGPT model (no 'slicegpt' entry in config.json)")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    d2 = config.hidden_size
    for layer in blocks(model):
        add_shortcuts_(layer, d2, d2, d2)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _norm(norm, d2, 1.0)
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return model.to(device).eval()
