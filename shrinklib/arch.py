"""The one architecture adapter: where a decoder's blocks and linear layers are, and what they compute.

Every algorithm in the suite asks this module, never `isinstance` or class-name checks of its own,
and no other module indexes a model's layers or names its projections. A decoder is supported
when its blocks are a `ModuleList` of layers whose projections are linear-like: `nn.Linear`, or a
layer that stands for one (a quantized `QuantLinear` on any backend, a W8A8 or 2:4 sparse layer:
anything with `in_features` and `out_features` and no children).

An architecture is one `Arch` entry in `ARCHS`: the block list, embedding, final norm and learned
positions; each logical projection (q, k, v, o, gate, up, down) as a linear or one part of a fused
linear (Phi-3's qkv_proj and gate_up_proj); which norm feeds which linears; the modules whose
outputs are the residual branches (Gemma 2's post-norms); the kind of norm (RMSNorm, Gemma's
x̂·(1 + w), OPT's LayerNorm with bias); biases; and the techniques it cannot take, with the reason.
From the entry follow the roles (which linears share an input), the fold sites of AWQ/SmoothQuant,
the structured surgery of the pruners (`keep_heads_`, `keep_mlp_`, `keep_hidden_`, `keep_blocks_`)
and the analytic parameter count (`param_count`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class UnsupportedArchitectureError(ValueError):
    """The model's architecture cannot take this technique (the message says why)."""


@dataclass(frozen=True)
class Proj:
    """A logical projection: a whole linear (`part` None) or part `part` of a fused one."""

    path: str
    part: int | None = None


def _no_bias(config) -> dict[str, bool]:
    return {"qkv": False, "o": False, "mlp": False}


def _flag_bias(config) -> dict[str, bool]:
    """Llama-style flags: attention_bias (q, k, v, o) and mlp_bias."""
    att = bool(getattr(config, "attention_bias", False))
    return {"qkv": att, "o": att, "mlp": bool(getattr(config, "mlp_bias", False))}


@dataclass(frozen=True)
class Arch:
    """Where things are in one architecture, and what its blocks compute (paths inside a block
    unless they name the model)."""

    model_type: str
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    positions: str | None = None  # learned position embedding (OPT), a writer of the residual stream
    q: Proj = Proj("self_attn.q_proj")
    k: Proj = Proj("self_attn.k_proj")
    v: Proj = Proj("self_attn.v_proj")
    o: Proj = Proj("self_attn.o_proj")
    gate: Proj | None = Proj("mlp.gate_proj")  # None: a plain (ungated) MLP, act(up(x)) then down
    up: Proj = Proj("mlp.up_proj")
    down: Proj = Proj("mlp.down_proj")
    attn: str = "self_attn"  # the attention module
    mlp: str | None = "mlp"  # the MLP module (None: the block calls its linears one by one)
    attn_norm: str = "input_layernorm"  # feeds q, k, v
    mlp_norm: str = "post_attention_layernorm"  # feeds gate, up
    attn_branch: str = "self_attn"  # module whose output is added to the residual stream
    mlp_branch: str = "mlp"
    branch_norms: tuple[str, ...] = ()  # norms of a branch's output before the add (Gemma 2)
    head_norms: tuple[str, ...] = ()  # per-head norms of q and k (Qwen3)
    norm: str = "rms"  # "rms": x̂·w; "rms1p": x̂·(1 + w) (Gemma); "layer": LayerNorm with bias (OPT)
    mlp_size: str = "intermediate_size"  # config field of the MLP width
    biases: Callable = _flag_bias  # config -> which projections carry a bias
    embed_scale: bool = False  # the embedding output is multiplied by √hidden (Gemma)
    unsupported: dict = field(default_factory=dict)  # technique -> reason

    def fused_parts(self, path: str) -> list[str]:
        """Names of the logical projections stored in the linear at `path`, in row order."""
        return [n for n in ("q", "k", "v", "gate", "up") if getattr(self, n) is not None and getattr(self, n).path == path]


ARCHS = {
    "llama": Arch("llama"),
    "mistral": Arch("mistral"),
    "qwen2": Arch("qwen2", biases=lambda c: {"qkv": True, "o": False, "mlp": False}),
    "qwen3": Arch("qwen3", head_norms=("self_attn.q_norm", "self_attn.k_norm")),
    "gemma": Arch("gemma", norm="rms1p", embed_scale=True, unsupported={
        "minitron_hidden": "its embedding output is scaled by √hidden_size and tied to the output head, so a narrower "
                           "stream changes the scale of the tied weights"}),
    "gemma2": Arch(
        "gemma2", mlp_norm="pre_feedforward_layernorm", attn_branch="post_attention_layernorm",
        mlp_branch="post_feedforward_layernorm", branch_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
        norm="rms1p", embed_scale=True, unsupported={
            "slicegpt": "its post-attention and post-feedforward RMSNorms scale each branch's output per channel after "
                        "normalising it, which does not commute with a rotation of the residual stream",
            "rotate": "its post-attention and post-feedforward RMSNorms scale each branch's output per channel after "
                      "normalising it, which does not commute with a rotation of the residual stream",
            "minitron_hidden": "its embedding output is scaled by √hidden_size and tied to the output head, so a "
                               "narrower stream changes the scale of the tied weights"}),
    "phi3": Arch("phi3", q=Proj("self_attn.qkv_proj", 0), k=Proj("self_attn.qkv_proj", 1), v=Proj("self_attn.qkv_proj", 2),
                 gate=Proj("mlp.gate_up_proj", 0), up=Proj("mlp.gate_up_proj", 1), biases=_no_bias),
    "opt": Arch(
        "opt", blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm", positions="model.decoder.embed_positions",
        o=Proj("self_attn.out_proj"), gate=None, up=Proj("fc1"), down=Proj("fc2"), mlp=None,
        attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", mlp_branch="fc2", norm="layer",
        mlp_size="ffn_dim", biases=lambda c: dict.fromkeys(("qkv", "o", "mlp"), bool(getattr(c, "enable_bias", True))),
        unsupported={
            "moe": "its MLP is not a module: the decoder layer calls fc1, the activation and fc2 one by one",
            "minitron_hidden": "its config derives the head width from hidden_size (it has no head_dim), so a narrower "
                               "stream cannot keep its heads' width when reloaded",
            "gguf": "llama.cpp's GGUF 'llama' architecture describes Llama blocks; convert OPT with llama.cpp's "
                    "convert_hf_to_gguf.py"}),
    "mixtral": Arch("mixtral", gate=None, up=Proj("mlp.experts"), down=Proj("mlp.experts"), unsupported={
        t: "its experts are fused 3-D parameters, not linear layers" for t in
        ("slicegpt", "llm_pruner", "minitron_width", "minitron_hidden", "moe", "gguf", "fold", "rotate")}),
}
for _t in ("mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"):
    ARCHS[_t].unsupported.setdefault(
        "gguf", f"llama.cpp's GGUF 'llama' architecture describes Llama blocks; {_t} has its own GGUF architecture, "
                "written by llama.cpp's convert_hf_to_gguf.py")

# model_type -> (path to the block list, path to the token embedding, path to the final norm)
LAYOUTS = {t: (a.blocks, a.embed, a.final_norm) for t, a in ARCHS.items()}


def get_path(root: nn.Module, path: str) -> nn.Module:
    """`get_path(model, "model.layers")` is `model.model.layers`."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def has_path(root: nn.Module, path: str) -> bool:
    try:
        get_path(root, path)
        return True
    except AttributeError:
        return False


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at `path` (e.g. "self_attn.q_proj") with `new`."""
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    setattr(parent, name, new)


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or a leaf layer standing for one (quantized, W8A8, 2:4 sparse)."""
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children()))


# ----------------------------------------------------------------------------- config facts


def kv_heads(config) -> int:
    """Key/value heads (multi-head attention without the field, e.g. OPT: as many as query heads)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def mlp_width(config) -> int:
    """The MLP's hidden width (intermediate_size; OPT's ffn_dim)."""
    return getattr(config, ARCHS[config.model_type].mlp_size)


@dataclass(frozen=True)
class Layout:
    """Where things are in one model (its `Arch` entry, read against its config)."""

    model_type: str
    blocks_path: str
    embed_path: str
    norm_path: str
    arch: Arch = field(repr=False, default=None)

    # --- where things are
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_path(model, self.blocks_path)

    def embed(self, model: nn.Module) -> nn.Embedding:
        return get_path(model, self.embed_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return get_path(model, self.norm_path)

    def positions(self, model: nn.Module) -> nn.Module | None:
        return get_path(model, self.arch.positions) if self.arch.positions else None

    def mlp_width(self, config) -> int:
        return getattr(config, self.arch.mlp_size)

    def require(self, technique: str, what: str | None = None) -> Layout:
        """Raise UnsupportedArchitectureError "<what> is unsupported for <arch> because <reason>"."""
        reason = self.arch.unsupported.get(technique)
        if reason:
            raise UnsupportedArchitectureError(f"{what or technique} is unsupported for {self.model_type} because {reason}")
        return self

    # --- roles of the physical linears
    def roles(self) -> dict[str, str]:
        """Path of every linear inside a block -> its role: attn_in (q, k, v), attn_out (o), mlp_in
        (gate, up), mlp_out (down). Linears of one role share their input."""
        a, out = self.arch, {}
        for names, role in ((("q", "k", "v"), "attn_in"), (("o",), "attn_out"), (("gate", "up"), "mlp_in"), (("down",), "mlp_out")):
            for n in names:
                if getattr(a, n) is not None:
                    out.setdefault(getattr(a, n).path, role)
        return out

    def prev(self) -> dict[str, str]:
        """Role -> path of the operation producing that role's input, for the roles whose input
        scale can be folded into it (AWQ, SmoothQuant). attn_out (o_proj) is left out: with
        grouped-query attention its input channels do not map one-to-one onto v_proj's rows."""
        a = self.arch
        return {"attn_in": a.attn_norm, "mlp_in": a.mlp_norm, "mlp_out": a.up.path}

    def prev_rows(self, role: str, block: nn.Module, config) -> slice | None:
        """The rows of the previous operation that produce the role's input (the up half of a fused
        gate_up for mlp_out), or None for all."""
        if role == "mlp_out" and self.arch.up.part is not None:
            return proj_slice(self, block, config, "up")[1]
        return None

    @property
    def norm_offset(self) -> float:
        """Norms compute x̂·(offset + w): 1 for Gemma, 0 otherwise."""
        return 1.0 if self.arch.norm == "rms1p" else 0.0

    # --- the residual stream
    def stream_norms(self, block: nn.Module) -> list[nn.Module]:
        """The norms inside a block that read (or write, Gemma's post-norms) the residual width."""
        a = self.arch
        return [get_path(block, p) for p in (a.attn_norm, a.mlp_norm, *a.branch_norms)]

    def readers(self, block: nn.Module) -> dict[str, list[nn.Module]]:
        """The linears reading the normed stream, by the norm that feeds them."""
        r = self.roles()
        a = self.arch
        return {a.attn_norm: [get_path(block, p) for p, x in r.items() if x == "attn_in"],
                a.mlp_norm: [get_path(block, p) for p, x in r.items() if x == "mlp_in"]}

    def writers(self, block: nn.Module) -> list[nn.Module]:
        """The linears writing to the residual stream (o and down)."""
        return [get_path(block, self.arch.o.path), get_path(block, self.arch.down.path)]


def layout(model: nn.Module) -> Layout:
    """The layout of a `transformers` causal LM, or a clear error naming what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if model_type not in ARCHS:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported by shrinklib's layer-wise methods; "
            f"supported: {sorted(ARCHS)}. Add its entry to shrinklib.arch.ARCHS."
        )
    a = ARCHS[model_type]
    found = Layout(model_type, a.blocks, a.embed, a.final_norm, a)
    try:
        blocks = found.blocks(model)
    except AttributeError as err:
        raise UnsupportedArchitectureError(f"'{model_type}' model has no {found.blocks_path}: {err}") from err
    if not isinstance(blocks, nn.ModuleList) or not any(is_linear(m) for m in blocks[0].modules()):
        raise UnsupportedArchitectureError(
            f"'{model_type}' blocks at {found.blocks_path} are not a ModuleList of linear layers"
        )
    return found


def layout_of_type(model_type: str) -> Layout:
    """The layout of an architecture by its model_type, without a model."""
    a = ARCHS[model_type]
    return Layout(model_type, a.blocks, a.embed, a.final_norm, a)


def require(model: nn.Module, technique: str, what: str | None = None) -> Layout:
    """The model's layout, or "<what> is unsupported for <arch> because <reason>" before any work."""
    return layout(model).require(technique, what)


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


def block_weight_names(model: nn.Module) -> list[str]:
    """Full parameter names of the weights of every block linear (e.g. for gradients)."""
    lay = layout(model)
    return [f"{lay.blocks_path}.{name}.weight" for name in named_linears(model)]


def linear_leaf_names(model: nn.Module) -> list[str]:
    """The attribute names of a block's linears (LoRA's target_modules: q_proj, fc1, qkv_proj, ...)."""
    return sorted({p.rsplit(".", 1)[-1] for p in layout(model).roles()})


# ----------------------------------------------------------------------------- logical projections


def _part_sizes(lay: Layout, config, path: str, lin: nn.Module) -> list[int]:
    parts = lay.arch.fused_parts(path)
    if "gate" in parts:  # gate and up halves of equal width (Phi-3 chunks the output in two)
        return [lin.out_features // 2] * 2
    sizes = {"q": config.num_attention_heads * head_dim(config), "k": kv_heads(config) * head_dim(config),
             "v": kv_heads(config) * head_dim(config)}
    return [sizes[p] for p in parts]


def proj_slice(lay: Layout, block: nn.Module, config, name: str) -> tuple[nn.Module, slice]:
    """(the linear holding logical projection `name`, its rows there)."""
    proj = getattr(lay.arch, name)
    lin = get_path(block, proj.path)
    if proj.part is None:
        return lin, slice(0, lin.out_features)
    sizes = _part_sizes(lay, config, proj.path, lin)
    start = sum(sizes[: proj.part])
    return lin, slice(start, start + sizes[proj.part])


def proj_weight(lay: Layout, block: nn.Module, config, name: str) -> Tensor:
    """The (out, in) weight of logical projection `name` (a view of its rows in a fused linear)."""
    lin, rows = proj_slice(lay, block, config, name)
    return lin.weight[rows]


def slice_linear_(lin: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Keep the given output rows (and bias entries) and input columns of a linear layer, in place."""
    W = lin.weight.data  # (out, in)
    if rows is not None:
        W = W[rows.to(W.device)]
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data[rows.to(W.device)].clone())
    if cols is not None:
        W = W[:, cols.to(W.device)]
    lin.weight = nn.Parameter(W.contiguous().clone())
    lin.out_features, lin.in_features = W.shape


def _keep_rows_(lay: Layout, block: nn.Module, config, keep: dict[str, Tensor]) -> None:
    """Keep, of each logical projection named in `keep`, the rows listed there (fused linears: the
    other parts stay whole)."""
    by_path: dict[str, list] = {}
    for name, idx in keep.items():
        lin, rows = proj_slice(lay, block, config, name)
        by_path.setdefault(getattr(lay.arch, name).path, []).append((rows, idx))
    for path, picks in by_path.items():
        lin = get_path(block, path)
        parts = [p for p in (proj_slice(lay, block, config, n)[1] for n in lay.arch.fused_parts(path))] or [slice(0, lin.out_features)]
        chosen = {rows.start: idx for rows, idx in picks}
        index = [rows.start + (chosen[rows.start].cpu() if rows.start in chosen else torch.arange(rows.stop - rows.start))
                 for rows in parts]
        slice_linear_(lin, rows=torch.cat(index))


def keep_block_heads_(lay: Layout, block: nn.Module, config, heads: Tensor) -> None:
    """Keep the query heads `heads` (sorted ids, the same count per KV group) of one block: their
    q rows and o columns (the caller updates the config once every block is done)."""
    hd, n = head_dim(config), len(heads)
    rows = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()  # head -> its hd rows
    _keep_rows_(lay, block, config, {"q": rows})
    slice_linear_(get_path(block, lay.arch.o.path), cols=rows)
    attn = get_path(block, lay.arch.attn)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = n // kv_heads(config)
    if hasattr(attn, "num_heads"):
        attn.num_heads = n


def set_heads(config, n: int) -> None:
    """The config of a model whose blocks keep `n` query heads each."""
    config.head_dim = head_dim(config)  # explicit: hidden_size / heads no longer gives it
    config.num_attention_heads = n


def keep_heads_(model: nn.Module, keep: list[Tensor]) -> None:
    """Keep the query heads `keep[i]` of every block i (`keep_block_heads_`); the config follows."""
    lay, cfg = layout(model), model.config
    for block, heads in zip(lay.blocks(model), keep):
        keep_block_heads_(lay, block, cfg, heads)
    set_heads(cfg, len(keep[0]))


def keep_mlp_(model: nn.Module, keep: list[Tensor]) -> None:
    """Keep the MLP channels `keep[i]` (sorted ids, the same count in every block) of every block
    i: rows of gate and up (and their biases), columns of down; the config follows."""
    lay, cfg = layout(model), model.config
    for block, idx in zip(lay.blocks(model), keep):
        select_mlp_channels_(lay, block, cfg, idx)
    setattr(cfg, lay.arch.mlp_size, len(keep[0]))


def select_mlp_channels_(lay: Layout, block: nn.Module, config, idx: Tensor, down_scale: float = 1.0) -> None:
    """Rows `idx` of gate/up and the same columns of down (repeats allowed: widening), down × down_scale."""
    _keep_rows_(lay, block, config, {n: idx for n in ("gate", "up") if getattr(lay.arch, n) is not None})
    down = get_path(block, lay.arch.down.path)
    slice_linear_(down, cols=idx)
    if down_scale != 1.0:
        down.weight.data.mul_(down_scale)


def _slice_vector_(module: nn.Module, keep: Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(module, name, None)
        if p is not None:
            setattr(module, name, nn.Parameter(p.data[keep.to(p.device)].clone()))
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (len(keep),)


def keep_hidden_(model: nn.Module, keep: Tensor) -> None:
    """Keep the embedding channels `keep` (sorted ids) everywhere the residual stream passes:
    embedding (and positions), every stream norm, the readers' columns, the writers' rows, the
    final norm and the head; the config follows."""
    lay, cfg = layout(model), model.config
    lay.require("minitron_hidden", "pruning embedding channels")
    cfg.head_dim = head_dim(cfg)
    emb = lay.embed(model)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    for e in (emb, lay.positions(model)):
        if e is not None:
            e.weight = nn.Parameter(e.weight.data[:, keep].contiguous().clone())  # (V, hidden)
            e.embedding_dim = len(keep)
    for b in lay.blocks(model):
        for norm in lay.stream_norms(b):
            _slice_vector_(norm, keep)
        for lin in (x for r in lay.readers(b).values() for x in r):
            slice_linear_(lin, cols=keep)
        for lin in lay.writers(b):
            slice_linear_(lin, rows=keep)
    _slice_vector_(lay.final_norm(model), keep)
    if tied:
        head.weight = emb.weight
    else:
        slice_linear_(head, cols=keep)
    cfg.hidden_size = len(keep)


def keep_blocks_(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder blocks `keep` (in that order) and renumber them for the KV cache;
    the config follows (depth pruning). In place; returns the model."""
    lay = layout(model)
    full = lay.blocks(model)
    if not keep or any(not 0 <= i < len(full) for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep must be distinct block indices in [0, {len(full)}), got {keep}")
    kept = nn.ModuleList([full[i] for i in keep])
    for j, b in enumerate(kept):
        for m in b.modules():  # the KV cache is indexed by layer_idx (on the attention, sometimes the block)
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    set_module(model, lay.blocks_path, kept)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return model


@contextmanager
def without_blocks(model: nn.Module, drop: list[int]) -> Iterator[nn.Module]:
    """Temporarily run `model` with the blocks in `drop` skipped (nothing renumbered; the config's
    per-layer attention types follow, as the decoder picks each block's mask by its position)."""
    lay, cfg = layout(model), model.config
    full, types, n = lay.blocks(model), getattr(cfg, "layer_types", None), cfg.num_hidden_layers
    set_module(model, lay.blocks_path, nn.ModuleList([b for i, b in enumerate(full) if i not in set(drop)]))
    if types:
        cfg.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]
    cfg.num_hidden_layers = len(lay.blocks(model))
    try:
        yield model
    finally:
        set_module(model, lay.blocks_path, full)
        cfg.num_hidden_layers = n
        if types:
            cfg.layer_types = types


# ----------------------------------------------------------------------------- MLP as a module


def mlp_module(model: nn.Module, block: nn.Module) -> nn.Module:
    """The block's MLP (input: the normed stream, output: the branch before any post-norm)."""
    lay = require(model, "moe", "replacing the MLP")
    return get_path(block, lay.arch.mlp)


def set_mlp(model: nn.Module, block: nn.Module, module: nn.Module) -> None:
    lay = require(model, "moe", "replacing the MLP")
    set_module(block, lay.arch.mlp, module)


def mlp_branch(model: nn.Module, block: nn.Module) -> nn.Module:
    """A module computing the block's MLP branch from its input (the normed stream) to what is
    added to the residual: the MLP, then Gemma 2's post-norm; OPT's fc1, activation, fc2."""
    a = layout(model).arch
    if a.mlp is None:
        return nn.Sequential(get_path(block, a.up.path), block.activation_fn, get_path(block, a.down.path))
    post = [get_path(block, a.mlp_branch)] if a.mlp_branch != a.mlp else []
    return nn.Sequential(get_path(block, a.mlp), *post) if post else get_path(block, a.mlp)


@contextmanager
def record_mlp_branch(model: nn.Module, block: nn.Module, seen: dict) -> Iterator[None]:
    """While active, a forward of `block` stores its MLP branch's input in seen["x"] and output
    (what is added to the residual) in seen["y"]."""
    a = layout(model).arch
    first = get_path(block, a.mlp if a.mlp is not None else a.up.path)
    last = get_path(block, a.mlp_branch)
    hooks = [first.register_forward_pre_hook(lambda m, args: seen.update(x=args[0])),
             last.register_forward_hook(lambda m, args, out: seen.update(y=out))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------- parameter count


def param_kind(name: str) -> str:
    """Which part of the network a parameter belongs to, from its full name: embedding (and learned
    positions), lm_head, experts, attention, mlp (a MoE router, "gate", too) or norm."""
    parts = name.split(".")
    if any(p in ("embed_tokens", "embed_positions") for p in parts):
        return "embedding"
    if "lm_head" in parts:
        return "lm_head"
    if "experts" in parts:
        return "experts"
    attn = {a.attn for a in ARCHS.values()}
    mlp = {p for a in ARCHS.values() for p in (a.mlp, a.up.path, a.down.path) if p} | {"gate"}
    for i in range(len(parts)):
        if ".".join(parts[i:i + 1]) in attn:
            return "attention"
        if parts[i] in mlp or ".".join(parts[i:i + 2]) in mlp:
            return "mlp"
    return "norm"



def param_count(config, model_type: str | None = None, hidden: float | None = None, intermediate: float | None = None,
                heads: int | None = None, layers: int | None = None, embeddings: bool = True,
                tied: bool | None = None) -> float:
    """Parameters of a model of this config, by hand (optionally with hidden size, MLP width, query
    heads or layers replaced): embeddings (+ untied head, learned positions), per block the
    attention (GQA), the MLP (gated or plain), biases and norms, and the final norm.

    Args:
        embeddings: False counts only the blocks and the final norm (Minitron's "non-embedding").
        tied: whether the output head shares the embedding (default: the config's tie_word_embeddings).
    """
    a = ARCHS[model_type or config.model_type]
    d = config.hidden_size if hidden is None else hidden
    f = getattr(config, a.mlp_size) if intermediate is None else intermediate
    H = config.num_attention_heads if heads is None else heads
    L = config.num_hidden_layers if layers is None else layers
    hd, kv, V = head_dim(config), kv_heads(config), config.vocab_size
    bias = a.biases(config)
    nb = 2 if a.norm == "layer" else 1  # LayerNorm: weight and bias
    attn = d * H * hd + 2 * d * kv * hd + H * hd * d + bias["qkv"] * (H + 2 * kv) * hd + bias["o"] * d
    mlp = (3 if a.gate is not None else 2) * d * f + bias["mlp"] * ((2 if a.gate is not None else 1) * f + d)
    norms = (2 + len(a.branch_norms)) * nb * d + len(a.head_norms) * hd
    total = L * (attn + mlp + norms) + nb * d
    if embeddings:
        pos = config.max_position_embeddings + 2 if a.positions else 0  # OPT's learned positions, offset 2
        tied = getattr(config, "tie_word_embeddings", False) if tied is None else tied
        total += V * d + pos * d + (0 if tied else V * d)
    return total
