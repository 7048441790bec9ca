"""The one architecture adapter: where a decoder's blocks and linear layers are.

Every algorithm in the suite asks this module, never `isinstance` or class-name checks of
its own. A decoder is supported when its blocks are a `ModuleList` of layers whose
projections are linear-like: `nn.Linear`, or a layer that stands for one (a quantized
`QuantLinear` on any backend, a W8A8 or 2:4 sparse layer: anything with `in_features` and
`out_features` and no children) (Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, ...).

Each architecture is one entry per table: LAYOUTS (blocks, embedding, final norm), ROLES
(which linears share an input) and PREV (the operation producing each role's input, where a
per-channel scale can be folded).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# model_type -> (path to the block list, path to the token embedding, path to the final norm)
LAYOUTS = {
    "llama": ("model.layers", "model.embed_tokens", "model.norm"),
    "mistral": ("model.layers", "model.embed_tokens", "model.norm"),
    "mixtral": ("model.layers", "model.embed_tokens", "model.norm"),
    "qwen2": ("model.layers", "model.embed_tokens", "model.norm"),
    "qwen3": ("model.layers", "model.embed_tokens", "model.norm"),
    "gemma": ("model.layers", "model.embed_tokens", "model.norm"),
    "gemma2": ("model.layers", "model.embed_tokens", "model.norm"),
    "phi3": ("model.layers", "model.embed_tokens", "model.norm"),
    "opt": ("model.decoder.layers", "model.decoder.embed_tokens", "model.decoder.final_layer_norm"),
}

# Roles of the linears inside a block, by their attribute path; used by methods that
# must know which linears share an input (AWQ, SmoothQuant) or form a dependency group.
LLAMA_ROLES = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_out",
}
OPT_ROLES = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.out_proj": "attn_out",
    "fc1": "mlp_in",
    "fc2": "mlp_out",
}
ROLES = {"opt": OPT_ROLES}

# Role -> path (inside the block) of the operation producing that role's input, for the roles
# whose input scale can be folded into it (AWQ, SmoothQuant). attn_out (o_proj) is left out: with
# grouped-query attention its input channels do not map one-to-one onto v_proj's output rows.
LLAMA_PREV = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm", "mlp_out": "mlp.up_proj"}
OPT_PREV = {"attn_in": "self_attn_layer_norm", "mlp_in": "final_layer_norm", "mlp_out": "fc1"}
PREV = {"opt": OPT_PREV}


class UnsupportedArchitectureError(ValueError):
    """The model's layout is not one the suite's layer-wise algorithms can walk."""


def get_path(root: nn.Module, path: str) -> nn.Module:
    """`get_path(model, "model.layers")` is `model.model.layers`."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass(frozen=True)
class Layout:
    """Where things are in one model."""

    model_type: str
    blocks_path: str
    embed_path: str
    norm_path: str

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.blocks_path)

    def embed(self, model: nn.Module) -> nn.Embedding:
        return get_path(model, self.embed_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return get_path(model, self.norm_path)

    def roles(self) -> dict[str, str]:
        return ROLES.get(self.model_type, LLAMA_ROLES)

    def prev(self) -> dict[str, str]:
        """Role -> path of the operation producing that role's input (see PREV)."""
        return PREV.get(self.model_type, LLAMA_PREV)


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or a leaf layer standing for one (quantized, W8A8, 2:4 sparse)."""
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children()))


def layout(model: nn.Module) -> Layout:
    """The layout of a `transformers` causal LM, or a clear error naming what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in LAYOUTS:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported by shrinklib's layer-wise methods; "
            f"supported: {sorted(LAYOUTS)}. Add its block/embedding/norm paths to shrinklib.arch.LAYOUTS."
        )
    found = Layout(model_type, *LAYOUTS[model_type])
    try:
        blocks = found.blocks(model)
    except AttributeError as err:
        raise UnsupportedArchitectureError(f"'{model_type}' model has no {found.blocks_path}: {err}") from err
    if not isinstance(blocks, nn.ModuleList) or not any(is_linear(m) for m in blocks[0].modules()):
        raise UnsupportedArchitectureError(
            f"'{model_type}' blocks at {found.blocks_path} are not a ModuleList of linear layers"
        )
    return found


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model, in order."""
    return layout(model).blocks(model)


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The float `nn.Linear` layers of a block (what a method can still change) by their path inside
    it, in definition order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like layer of a block (float, quantized on any backend, W8A8, sparse) by path."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


def named_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the decoder blocks, named `"<block index>.<path>"` (lm_head excluded)."""
    return {f"{i}.{name}": m for i, b in enumerate(blocks(model)) for name, m in linears(b).items()}


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at `path` (e.g. "self_attn.q_proj") with `new`."""
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, new)
