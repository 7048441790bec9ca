"""Everything a recipe is checked for before any work starts (`shrinklib.recipe` runs it).

`parse_recipe` / `load_recipe` (no model needed): every step name, every field name and type
(the library's own configs, validated by their `__post_init__`), values the configs cannot check
alone, the order of steps (nothing trains, prunes or quantizes packed layers; Q4 GGUF needs a
≤ 4-bit grid with groups of 32k), export names (plain names inside --out, no two alike) and keys
given twice. `prepare_run` then checks, still without loading the weights: the device, --out,
the model's config and shapes (built on the meta device), the corpus and its splits. Every error
is a `RecipeError` whose one line names the step and the field.
"""

from __future__ import annotations

import os
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from torch import nn

from .checks import check_fields, check_plain_name, load_yaml, type_name, type_ok
from .evaluate import EVAL_SEQ_LEN, EVAL_TOKENS


class RecipeError(ValueError):
    """A recipe is malformed: unknown step, unknown or badly typed field, impossible order."""


@dataclass(frozen=True)
class CalibrationConfig:
    corpus: str = "pydoc"
    n: int = 16  # calibration sequences
    seq_len: int = 256  # tokens per sequence
    seed: int = 0

    def __post_init__(self):
        check_fields(self)
        if self.n < 1 or self.seq_len < 2:
            raise ValueError(f"n ≥ 1 and seq_len ≥ 2 needed, got {self.n}, {self.seq_len}")


@dataclass(frozen=True)
class EvaluationConfig:
    eval_tokens: int = EVAL_TOKENS  # perplexity on this many evaluation tokens (after every step; 0: off)
    seq_len: int = EVAL_SEQ_LEN  # tokens per window

    def __post_init__(self):
        check_fields(self)
        if self.eval_tokens < 0 or self.eval_tokens == 1:
            raise ValueError(f"eval_tokens must be 0 (off) or ≥ 2, got {self.eval_tokens}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be ≥ 2 (a window predicts all but its first token), got {self.seq_len}")


RESERVED_NAMES = ("summary.json", "summary.md", "FAILED.txt")  # files a recipe run writes into --out


@dataclass(frozen=True)
class ExportTarget:
    """Where an export step writes inside --out, and whether it embeds the tokenizer."""

    name: str = "model"
    tokenizer: bool = True

    def __post_init__(self):
        check_fields(self)
        check_plain_name(self.name, "name")
        if self.name in RESERVED_NAMES:
            raise ValueError(f"name {self.name!r} is the recipe's own {self.name}; choose another name")


@dataclass(frozen=True)
class Params:
    """A step's validated configs (the library's own), read as one: `p.bits`, `p.pack`, `p.of(GPTQConfig)`."""

    parts: tuple

    def __getattr__(self, name):
        if name != "parts":
            for part in self.parts:
                if name in {f.name for f in fields(part)}:
                    return getattr(part, name)
        raise AttributeError(name)

    def of(self, cls: type):
        return next(p for p in self.parts if isinstance(p, cls))

    def asdict(self) -> dict:
        return {k: v for part in self.parts for k, v in asdict(part).items()}


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[tuple[str, Params], ...]  # (step name, validated configs)
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    warnings: tuple[str, ...] = ()  # odd but possible choices, printed before a run


def build_config(classes: type | tuple[type, ...], params: dict | None, where: str):
    """The configs of `classes` built from one mapping of fields (each field belongs to one class),
    with clear errors: unknown fields, wrong types, failed validation. One class: its instance."""
    single = isinstance(classes, type)
    classes = (classes,) if single else classes
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RecipeError(f"{where}: parameters must be a mapping, got {type(params).__name__} {params!r}")
    owner = {f.name: cls for cls in classes for f in fields(cls)}
    for key, value in params.items():
        if key not in owner:
            raise RecipeError(f"{where}: unknown field {key!r}; allowed fields: {', '.join(owner)}")
        hint = typing.get_type_hints(owner[key])[key]
        if not type_ok(value, hint):
            raise RecipeError(f"{where}: field {key!r} must be {type_name(hint)}, got {value!r}")
    missing = [f.name for cls in classes for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in params]
    if missing:
        raise RecipeError(f"{where}: missing field(s) {missing}")
    try:
        built = tuple(cls(**{k: v for k, v in params.items() if owner[k] is cls}) for cls in classes)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: {err}") from err
    return built[0] if single else Params(built)


def _split_step(i: int, item) -> tuple[str, dict]:
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict) and "step" in item:
        params = dict(item)
        return params.pop("step"), params
    if isinstance(item, dict) and len(item) == 1:
        (name, params), = item.items()
        return name, params
    raise RecipeError(f"step {i}: write a step as '- name: {{field: value}}' or '- step: name', got {item!r}")


def parse_recipe(data: dict) -> Recipe:
    """Validate a recipe given as a dict (the parsed YAML); raises RecipeError naming step and field."""
    from .recipe import STEPS

    if not isinstance(data, dict):
        raise RecipeError(f"a recipe is a mapping with a 'steps' list, got {type(data).__name__}")
    unknown = set(data) - {"name", "steps", "calibration", "evaluation"}
    if unknown:
        raise RecipeError(f"unknown top-level key(s) {sorted(unknown)}; allowed: name, steps, calibration, evaluation")
    raw = data.get("steps")
    if not isinstance(raw, list) or not raw:
        raise RecipeError("the recipe needs a non-empty 'steps' list")
    steps = []
    for i, item in enumerate(raw, 1):
        name, params = _split_step(i, item)
        if name not in STEPS:
            raise RecipeError(f"step {i}: unknown step {name!r}; known steps: {', '.join(sorted(STEPS))}")
        p = build_config(STEPS[name].configs, params, f"step {i} '{name}'")
        try:
            STEPS[name].validate(p, [(j, n, q) for j, (n, q) in enumerate(steps, 1)])
        except ValueError as err:
            raise RecipeError(f"step {i} '{name}': {err}") from err
        steps.append((name, p))
    validate_order(steps)
    warnings = validate_exports(steps)
    return Recipe(str(data.get("name", "recipe")), tuple(steps),
                  build_config(CalibrationConfig, data.get("calibration"), "calibration"),
                  build_config(EvaluationConfig, data.get("evaluation"), "evaluation"), tuple(warnings))


def load_recipe(path_or_text: str | Path) -> Recipe:
    """Parse and validate a YAML recipe from a file path or a YAML string (a key given twice in
    one mapping is refused)."""
    import yaml

    text = str(path_or_text)
    path = Path(text) if "\n" not in text and len(text) < 4096 else None
    if path is not None and path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; give a YAML file (see shrinklib/recipes/)")
    if path is not None and (path.suffix in (".yaml", ".yml", ".json") or path.is_file()):
        if not path.is_file():
            raise RecipeError(f"recipe file {path} not found")
        text = path.read_text()
    try:
        data = load_yaml(text, "recipe")
    except yaml.YAMLError as err:
        raise RecipeError("recipe is not valid YAML: " + " ".join(str(err).split())) from err
    except ValueError as err:
        raise RecipeError(str(err)) from err
    return parse_recipe(data)


# ----------------------------------------------------------------------------- order and exports


def validate_order(steps: list[tuple[str, Params]]) -> None:
    """Nothing but exports and evaluations may follow a step that leaves packed layers."""
    from .recipe import STEPS

    frozen_at = None
    for i, (name, p) in enumerate(steps, 1):
        if frozen_at and STEPS[name].kind not in ("export", "evaluate"):
            j, quant, packs = frozen_at
            raise RecipeError(f"step {i} '{name}' cannot follow step {j} '{quant}' " + (
                "(pack: true): packed integer layers cannot be trained, pruned or quantized again; move it before, or "
                "set pack: false there" if packs else "(W8A8 layers): they cannot be trained, pruned or quantized "
                "again; move it before"))
        if STEPS[name].kind == "quantize" and getattr(p, "pack", True):
            frozen_at = (i, name, hasattr(p, "pack"))


def q4_grid_after(p: Params, earlier: list[tuple[int, str, Params]]) -> None:
    """A Q4 GGUF export stores blocks of 32 on a ≤ 4-bit integer grid (Q4_0: symmetric), so the last
    quantization before it must have made that grid."""
    from .recipe import STEPS

    quant = [(j, n, q) for j, n, q in earlier if STEPS[n].kind == "quantize"]
    if p.fmt not in ("Q4_0", "Q4_1") or not quant:
        return
    j, qname, q = quant[-1]
    bits, g = getattr(q, "bits", 8), getattr(q, "group_size", None)
    if bits > 4 or not isinstance(g, int) or g % 32 or getattr(q, "fmt", "int") != "int":
        raise ValueError(f"fmt {p.fmt} needs blocks of 32 on a ≤ 4-bit integer grid, but step {j} '{qname}' uses "
                         f"bits={bits}, group_size={g}; use a group size that is a multiple of 32, or fmt Q8_0/F16")
    if p.fmt == "Q4_0" and not getattr(q, "symmetric", False):
        raise ValueError(f"Q4_0 is symmetric (w = d·(q−8)) but step {j} '{qname}' has symmetric: false; use Q4_1 or "
                         "symmetric: true")


def check_distill(p: Params, earlier) -> None:
    if p.hidden_weight:
        raise ValueError("hidden_weight needs projections from student to teacher layers, which a recipe does not "
                         "build; use shrinklib.distill.kd_loss_fn with projections")


def check_eval(p: Params, earlier) -> None:
    if p.eval_tokens < 2:
        raise ValueError(f"eval_tokens must be ≥ 2, got {p.eval_tokens}")


def check_backend(options) -> None:
    from .quant import BACKENDS

    if options.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {options.backend!r}")


def validate_exports(steps: list[tuple[str, Params]]) -> list[str]:
    """Refuse two exports writing the same path; warn of an export that comes before the last
    quantization step when no later step exports the quantized model. Returns the warnings."""
    from .recipe import STEPS

    seen: dict[str, int] = {}
    for i, (name, p) in enumerate(steps, 1):
        unexportable = [(j, n) for j, (n, _) in enumerate(steps[: i - 1], 1) if not STEPS[n].exportable]
        if STEPS[name].kind == "export" and unexportable:
            j, n = unexportable[0]
            raise RecipeError(f"step {i} '{name}' cannot export what step {j} '{n}' leaves (it is not a model the "
                              "exports write); evaluate it instead, or export before")
        if STEPS[name].kind == "export":
            target = STEPS[name].target(p)
            if target in seen:
                raise RecipeError(f"step {i} '{name}' writes {target!r} in --out, as step {seen[target]} does; give "
                                  "one of them another name")
            seen[target] = i
    kinds = [STEPS[name].kind for name, _ in steps]
    if "quantize" not in kinds or "export" not in kinds:
        return []
    last_quant = max(i for i, k in enumerate(kinds) if k == "quantize")
    last_export = max(i for i, k in enumerate(kinds) if k == "export")
    if last_export > last_quant:
        return []
    return [f"step {last_export + 1} '{steps[last_export][0]}' exports the model before step {last_quant + 1} "
            f"'{steps[last_quant][0]}' quantizes it, and no later step exports the quantized model"]


# ----------------------------------------------------------------------------- the model, corpus, device and --out


class ModelFacts:
    """What the model checks of the steps read: the model (or its meta skeleton) and the input sizes
    of its block linears by role, as the steps so far leave them (`sizes`, computed when first read)."""

    def __init__(self, model: nn.Module):
        self.model, self._sizes = model, None

    @property
    def sizes(self) -> dict[str, set[int]]:
        if self._sizes is None:
            from .arch import blocks, layout, linears

            roles, self._sizes = layout(self.model).roles(), {}
            for block in blocks(self.model):
                for path, lin in linears(block).items():
                    self._sizes.setdefault(roles.get(path, path), set()).add(lin.in_features)
        return self._sizes

    @sizes.setter
    def sizes(self, value):
        self._sizes = value


def width_sizes(p: Params, facts: ModelFacts) -> None:
    """The input sizes after Minitron width pruning keeps p.hidden / p.intermediate / p.heads_per_group."""
    from .arch import head_dim, kv_heads

    config, sizes = facts.model.config, dict(facts.sizes)
    hd = head_dim(config)
    if p.hidden is not None:
        sizes["attn_in"] = sizes["mlp_in"] = {min(p.hidden, v) for v in sizes["attn_in"]}
    if p.intermediate is not None:
        sizes["mlp_out"] = {min(p.intermediate, v) for v in sizes["mlp_out"]}
    if p.heads_per_group is not None:
        sizes["attn_out"] = {min(kv_heads(config) * p.heads_per_group * hd, v) for v in sizes["attn_out"]}
    facts.sizes = sizes


def llm_pruner_sizes(p: Params, facts: ModelFacts) -> None:
    """The input sizes after LLM-Pruner removes p.ratio of the MLP channels and p.head_ratio of the heads."""
    from .arch import head_dim, kv_heads

    config, sizes = facts.model.config, dict(facts.sizes)
    hd, kv = head_dim(config), kv_heads(config)
    per_kv = config.num_attention_heads // kv
    drop = min(round((p.ratio if p.head_ratio is None else p.head_ratio) * per_kv), per_kv - 1)
    sizes["mlp_out"] = {v - int(v * p.ratio) for v in sizes["mlp_out"]}
    sizes["attn_out"] = {kv * (per_kv - drop) * hd}
    facts.sizes = sizes


def slicegpt_sizes(p: Params, facts: ModelFacts) -> None:
    """The input sizes after SliceGPT keeps d' of the hidden size d (the residual shortcuts read d' too)."""
    d2 = p.parts[0].kept_dim(facts.model.config.hidden_size)
    facts.sizes = dict(facts.sizes) | {"attn_in": {d2}, "mlp_in": {d2}, "attn_shortcut": {d2}, "mlp_shortcut": {d2}}


def check_multiple(sizes: dict[str, set[int]], m: int, why: str, instead: str) -> None:
    bad = sorted({v for vs in sizes.values() for v in vs if v % m})
    if bad:
        raise ValueError(f"{why} needs every linear's input size to be a multiple of {m}, but this model has input "
                         f"size(s) {bad}; {instead}")


def check_depth(p: Params, facts: ModelFacts) -> None:
    if p.n_drop >= facts.model.config.num_hidden_layers:
        raise ValueError(f"n_drop={p.n_drop} but the model has only {facts.model.config.num_hidden_layers} layers")


def check_pattern(p: Params, facts: ModelFacts) -> None:
    if p.n:
        check_multiple(facts.sizes, p.m, f"{p.n}:{p.m} pruning", "choose another pattern or unstructured sparsity")


def check_gguf(p: Params, facts: ModelFacts) -> None:
    from .export import QK, check_llama_exportable

    check_llama_exportable(facts.model)
    if p.fmt in ("Q4_0", "Q4_1"):
        check_multiple(facts.sizes, QK, f"format {p.fmt} (blocks of {QK} inputs)", "use fmt Q8_0 or F16")


def check_model(recipe: Recipe, model: nn.Module) -> None:
    """Checks that need the model (its config and shapes; a model on the meta device will do),
    before any step runs: architecture, already quantized, each step's own model check (layer
    counts, N:M and Q4 block sizes after width pruning), sequence lengths within its context."""
    from .arch import require
    from .checks import check_not_quantized, context_length
    from .recipe import STEPS

    context = context_length(model)
    for where, length in window_lengths(recipe):
        if context is not None and length > context:
            raise RecipeError(f"{where}: seq_len={length} exceeds the model's context of {context} tokens "
                              "(max_position_embeddings)")
    facts = ModelFacts(model)
    for i, (name, p) in enumerate(recipe.steps, 1):
        where, step = f"step {i} '{name}'", STEPS[name]
        try:
            for technique in step.needs(p):  # "<step> is unsupported for <arch> because <reason>"
                require(model, technique, name)
            if step.kind == "quantize":
                check_not_quantized(model, where)
            step.check_model(p, facts)
        except ValueError as err:
            raise RecipeError(err if str(err).startswith(where) else f"{where}: {err}") from err


def window_lengths(recipe: Recipe) -> list[tuple[str, int]]:
    """(who reads, window length) of every corpus split a step reads: calibration, evaluation, training."""
    from .recipe import STEPS

    lengths = []
    for i, (name, p) in enumerate(recipe.steps, 1):
        for split in STEPS[name].reads(p):
            lengths.append(("calibration", recipe.calibration.seq_len) if split == "calib" else
                           (f"step {i} '{name}'", p.seq_len))
    if recipe.evaluation.eval_tokens:
        lengths.append(("evaluation", recipe.evaluation.seq_len))
    return lengths


def splits_needed(recipe: Recipe) -> dict[str, tuple[int, str]]:
    """{corpus split: (tokens it must hold, what needs them)} for this recipe's steps."""
    from .recipe import STEPS

    need: dict[str, tuple[int, str]] = {}

    def add(split, n, why):
        if n > need.get(split, (0, ""))[0]:
            need[split] = (n, why)

    for i, (name, p) in enumerate(recipe.steps, 1):
        for split in STEPS[name].reads(p):
            length = recipe.calibration.seq_len if split == "calib" else p.seq_len
            what = "calibration windows" if split == "calib" else "windows"
            add(split, 2 if split == "eval" else length + 1, f"step {i} '{name}'" +
                ("" if split == "eval" else f" ({what} of {length} tokens)"))
    if recipe.evaluation.eval_tokens:
        add("eval", 2, "evaluation after every step")
    return need


def check_corpus(recipe: Recipe, corpus, tokenizer) -> None:
    """Every split a step reads holds enough tokens (an empty or too-short corpus names the split)."""
    for split, (n, why) in splits_needed(recipe).items():
        try:
            got = corpus.tokens(tokenizer, split).numel()
        except ValueError as err:  # an empty split
            raise RecipeError(f"{why}: {err}") from err
        if got < n:
            raise RecipeError(f"{corpus.describe(split)} has {got} tokens, but {why} needs at least {n}; use a "
                              "longer corpus")


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """--out must be a folder that is absent, empty, a previous recipe output, or `overwrite`."""
    from .io import TargetExistsError, check_folder_target

    out = Path(out)
    try:
        check_folder_target(out, overwrite, "--out")
    except TargetExistsError as err:
        raise RecipeError(str(err).replace("pass overwrite=True", "pass --overwrite")) from err
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RecipeError(f"--out {out}: cannot create it, {parent} is not a writable folder")
    return out


@dataclass
class Prepared:
    """What `prepare_run` checked and loaded without the weights: reused by the run."""

    model: nn.Module  # the model itself, or its skeleton on the meta device
    tokenizer: object
    corpus: object | None


def prepare_run(recipe: Recipe, model_id: str | None = None, out: str | Path | None = "compressed", device: str = "cpu",
                overwrite: bool = False, model: nn.Module | None = None, tokenizer=None, corpus=None) -> Prepared:
    """Everything a run checks before any work, without loading the weights: the device, --out
    (None: no output folder), the model (its config and shapes, built on the meta device), the
    corpus and its splits. `python -m shrinklib compress --dry-run` stops here."""
    from .checks import check_device, vocab_size
    from .data import load_corpus

    check_device(device)
    if out is not None:
        check_out(out, overwrite)
    if model is None:
        from .models import load_skeleton

        model, tokenizer = load_skeleton(model_id)
    check_model(recipe, model)
    if tokenizer is not None and vocab_size(model) is not None and len(tokenizer) > vocab_size(model):
        raise RecipeError(f"the model's tokenizer has {len(tokenizer):,} tokens but its vocabulary only "
                          f"{vocab_size(model):,} rows: the tokenizer belongs to another model")
    if splits_needed(recipe):
        corpus = corpus if corpus is not None else load_corpus(recipe.calibration.corpus)
        check_corpus(recipe, corpus, tokenizer)
    return Prepared(model, tokenizer, corpus)
