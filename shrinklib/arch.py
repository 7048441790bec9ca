"""The one architecture adapter: where a decoder's blocks and linear layers are.

Every algorithm in the suite asks this module, never `isinstance` or class-name checks of
its own. A decoder is supported when its blocks are a `ModuleList` of layers whose
projections are `nn.Linear` (Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, ...).
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
    if not isinstance(blocks, nn.ModuleList) or not any(isinstance(m, nn.Linear) for m in blocks[0].modules()):
        raise UnsupportedArchitectureError(
            f"'{model_type}' blocks at {found.blocks_path} are not a ModuleList of nn.Linear layers"
        )
    return found


def blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a model, in order."""
    return layout(model).blocks(model)


def linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The `nn.Linear` layers of a block by their path inside it, in definition order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def named_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the decoder blocks, named `"<block index>.<path>"` (lm_head excluded)."""
    return {f"{i}.{name}": m for i, b in enumerate(blocks(model)) for name, m in linears(b).items()}


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at `path` (e.g. "self_attn.q_proj") with `new`."""
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, new)
