"""Compression recipes: a YAML list of steps applied to a model, validated before any work starts.

    name: smollm2-depth-gptq
    calibration: {corpus: pydoc, n: 16, seq_len: 256, seed: 0}
    evaluation: {eval_tokens: 4096}          # perplexity after every step (0: off)
    steps:
      - minitron_depth: {n_drop: 6}
      - distill: {steps: 50}
      - gptq: {bits: 4, group_size: 64}
      - export_gguf: {format: Q8_0}

Each step is a registered function with a typed config (a dataclass validated in
`__post_init__`). `load_recipe` checks every step name, every field name and type, the
libraries each step calls (imported lazily, so a missing function is reported here, not
halfway through a run), the order of steps (nothing trains or prunes packed integer layers;
Q4 GGUF needs a ≤ 4-bit grid with groups of 32k), export names (plain names inside --out, no
two alike) and keys given twice. Errors name the step and the field. `prepare_run` then checks
what the recipe meets, still before any work and without loading the weights: the device,
--out, the model's config and shapes (built on the meta device), the corpus and its splits.
`run_recipe` applies the steps with progress bars into a temporary folder that becomes --out
only when every step succeeded, and returns one row per step (size, perplexity, seconds);
`summary_table` formats them.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import time
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import check_fields, check_plain_name, load_yaml, type_name, type_ok


class RecipeError(ValueError):
    """A recipe is malformed: unknown step, unknown or badly typed field, impossible order."""


class StepFailed(RuntimeError):
    """A step raised while the recipe ran; the message names the step and the cause."""


# ----------------------------------------------------------------------------- step configs


@dataclass(frozen=True)
class MinitronDepthConfig:
    """Drop the `n_drop` least important layers (Minitron, https://arxiv.org/abs/2407.14679)."""

    n_drop: int = 1
    metric: str = "ppl"  # "ppl" (loss increase when dropped) or "cosine" (Block Importance)
    iterative: bool = False

    def __post_init__(self):
        check_fields(self)
        if self.n_drop < 1:
            raise ValueError(f"n_drop must be ≥ 1, got {self.n_drop}")
        if self.metric not in ("ppl", "cosine"):
            raise ValueError(f"metric must be 'ppl' or 'cosine', got {self.metric!r}")


@dataclass(frozen=True)
class MinitronWidthConfig:
    """Keep the most important channels, neurons and heads (Minitron width pruning)."""

    hidden: int | None = None
    intermediate: int | None = None
    heads_per_group: int | None = None

    def __post_init__(self):
        check_fields(self)
        if all(v is None for v in (self.hidden, self.intermediate, self.heads_per_group)):
            raise ValueError("give at least one of hidden, intermediate, heads_per_group")
        for k in ("hidden", "intermediate", "heads_per_group"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise ValueError(f"{k} must be ≥ 1, got {getattr(self, k)}")


@dataclass(frozen=True)
class DistillStepConfig:
    """Logit distillation from the model as it was loaded (the teacher) into the current one."""

    steps: int = 20  # optimizer steps
    lr: float = 1e-4
    batch_size: int = 4  # sequences per step
    seq_len: int = 128  # tokens per sequence (training part of the corpus)
    divergence: str = "forward_kl"
    temperature: float = 1.0

    def __post_init__(self):
        check_fields(self)
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"steps, batch_size ≥ 1 and seq_len ≥ 2 needed, got {self.steps}, {self.batch_size}, {self.seq_len}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class PruneStepConfig:
    """Unstructured or N:M pruning (magnitude, Wanda, SparseGPT) of every block linear."""

    method: str = "wanda"
    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self):
        check_fields(self)


@dataclass(frozen=True)
class QuantStepConfig:
    """Weight-only quantization of every block linear (RTN, GPTQ, AWQ)."""

    bits: int = 4
    group_size: int | None = 64  # None: per channel
    symmetric: bool = False
    pack: bool = True  # store packed integer codes (QuantLinear); False: write dequantized floats back

    def __post_init__(self):
        check_fields(self)
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be ≥ 1 or null (per channel), got {self.group_size}")


@dataclass(frozen=True)
class EvaluateStepConfig:
    """Perplexity on the evaluation part (recorded in the summary)."""

    eval_tokens: int = 4096

    def __post_init__(self):
        check_fields(self)
        if self.eval_tokens < 2:
            raise ValueError(f"eval_tokens must be ≥ 2, got {self.eval_tokens}")


RESERVED_NAMES = ("summary.json", "summary.md", "FAILED.txt")  # files a recipe run writes into --out


def check_export_name(name) -> None:
    """An export's `name` is a plain relative name inside --out (not absolute, no '..', not empty)."""
    check_plain_name(name, "name")
    if name in RESERVED_NAMES:
        raise ValueError(f"name {name!r} is the recipe's own {name}; choose another name")


@dataclass(frozen=True)
class ExportSafetensorsStepConfig:
    """An ordinary transformers folder `<out>/<name>/` (dequantized, or packed codes)."""

    name: str = "model"
    packed: bool = False
    check: bool = True  # reload and compare logits

    def __post_init__(self):
        check_fields(self)
        check_export_name(self.name)

    def target(self) -> str:
        return self.name


@dataclass(frozen=True)
class ExportGGUFStepConfig:
    """A llama.cpp GGUF file `<out>/<name>.<format>.gguf`."""

    format: str = "Q8_0"  # F32, F16, Q8_0, Q4_0, Q4_1
    name: str = "model"
    embed_type: str | None = None  # storage of the token embedding (default by format)
    tokenizer: bool = True  # embed the tokenizer
    check: bool = True

    def __post_init__(self):
        check_fields(self)
        from .export import GGUF_FORMATS

        check_export_name(self.name)
        if self.format not in GGUF_FORMATS:
            raise ValueError(f"format must be one of {GGUF_FORMATS}, got {self.format!r}")
        if self.embed_type is not None and self.embed_type not in GGUF_FORMATS[:3]:
            raise ValueError(f"embed_type must be one of {GGUF_FORMATS[:3]} or null, got {self.embed_type!r}")

    def target(self) -> str:
        return f"{self.name}.{self.format}.gguf"


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
    eval_tokens: int = 4096  # perplexity after every step on this many evaluation tokens (0: off)
    seq_len: int = 512

    def __post_init__(self):
        check_fields(self)
        if self.eval_tokens < 0 or self.eval_tokens == 1:
            raise ValueError(f"eval_tokens must be 0 (off) or ≥ 2, got {self.eval_tokens}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be ≥ 2 (a window predicts all but its first token), got {self.seq_len}")


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Step:
    """One registered step: its config type, the function that runs it, and what it needs."""

    name: str
    config: type
    run: typing.Callable
    requires: tuple[str, ...] = ()  # "module:attribute" imported lazily, checked at validation
    kind: str = "transform"  # "transform", "quantize", "export", "evaluate"
    url: str = ""


STEPS: dict[str, Step] = {}


def register(name: str, config: type, requires: tuple[str, ...] = (), kind: str = "transform", url: str = ""):
    """Decorator adding `fn(state, config)` to STEPS under `name`."""

    def wrap(fn):
        STEPS[name] = Step(name, config, fn, requires, kind, url)
        return fn

    return wrap


def _need(ref: str):
    """Import "module:attr" (the other modules are imported only when a step runs)."""
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"needs {module}.{attr}, which is not available ({type(err).__name__}: {err})") from err


@dataclass
class State:
    """What the steps share while a recipe runs."""

    model: nn.Module
    tokenizer: object
    out: Path
    calibration: CalibrationConfig
    device: str = "cpu"
    teacher: nn.Module | None = None
    progress: bool = True
    eval_seq_len: int = 512  # perplexity window (the recipe's evaluation.seq_len)
    notes: list = field(default_factory=list)  # what the current step reports (exports, perplexity)
    _corpus: object = None
    _calib: torch.Tensor | None = None

    @property
    def corpus(self):
        if self._corpus is None:
            from .data import load_corpus

            self._corpus = load_corpus(self.calibration.corpus)
        return self._corpus

    def calib_ids(self) -> torch.Tensor:
        if self._calib is None:
            from .data import calibration_batch

            c = self.calibration
            self._calib = calibration_batch(self.corpus, self.tokenizer, c.n, c.seq_len, c.seed)
        return self._calib


@register("minitron_depth", MinitronDepthConfig, ("shrinklib.minitron:prune_depth_",), url="https://arxiv.org/abs/2407.14679")
def _minitron_depth(state: State, c: MinitronDepthConfig) -> None:
    dropped = _need("shrinklib.minitron:prune_depth_")(state.model, c.n_drop, state.calib_ids(), c.metric, c.iterative)
    state.notes.append(f"dropped layers {dropped}")


@register("minitron_width", MinitronWidthConfig,
          ("shrinklib.minitron:activation_importance", "shrinklib.minitron:prune_width_"), url="https://arxiv.org/abs/2407.14679")
def _minitron_width(state: State, c: MinitronWidthConfig) -> None:
    imp = _need("shrinklib.minitron:activation_importance")(state.model, state.calib_ids())
    _need("shrinklib.minitron:prune_width_")(state.model, imp, c.hidden, c.intermediate, c.heads_per_group)


@register("distill", DistillStepConfig, ("shrinklib.distill:kd_loss_fn", "shrinklib.distill:KDConfig",
                                         "shrinklib.train:train", "shrinklib.train:TrainConfig"),
          url="https://arxiv.org/abs/1503.02531")
def _distill(state: State, c: DistillStepConfig) -> None:
    from .data import sample_windows

    kd = _need("shrinklib.distill:KDConfig")(divergence=c.divergence, temperature=c.temperature)
    loss_fn = _need("shrinklib.distill:kd_loss_fn")(state.teacher, kd)
    ids = sample_windows(state.corpus.tokens(state.tokenizer, "train"), c.steps * c.batch_size, c.seq_len,
                         state.calibration.seed, state.corpus.describe("train"))  # (steps·b, L)
    cfg = _need("shrinklib.train:TrainConfig")(steps=c.steps, lr=c.lr, progress=state.progress, seed=state.calibration.seed)
    hist = _need("shrinklib.train:train")(state.model, lambda i: {"input_ids": ids[i * c.batch_size : (i + 1) * c.batch_size]},
                                          loss_fn, cfg)
    state.model.eval()
    state.notes.append(f"KD loss {hist[0]['loss']:.3g} → {hist[-1]['loss']:.3g}")


@register("prune", PruneStepConfig, ("shrinklib.prune:prune_", "shrinklib.prune:PruneConfig"), url="https://arxiv.org/abs/2306.11695")
def _prune(state: State, c: PruneStepConfig) -> None:
    config = _need("shrinklib.prune:PruneConfig")(method=c.method, sparsity=c.sparsity, n=c.n, m=c.m)
    _need("shrinklib.prune:prune_")(state.model, config, state.calib_ids(), progress=state.progress)


def _quant_config(method: str, c: QuantStepConfig):
    cls = {"rtn": "RTNConfig", "gptq": "GPTQConfig", "awq": "AWQConfig"}[method]
    return _need(f"shrinklib.quant:{cls}")(bits=c.bits, group_size=c.group_size, symmetric=c.symmetric)


def _quantize(method: str):
    def run(state: State, c: QuantStepConfig) -> None:
        quantize_ = _need("shrinklib.quant:quantize_")
        calib = None if method == "rtn" else state.calib_ids()
        quantize_(state.model, _quant_config(method, c), calib, pack=c.pack, progress=state.progress)

    return run


register("rtn", QuantStepConfig, ("shrinklib.quant:quantize_", "shrinklib.quant:RTNConfig"), "quantize",
         "https://arxiv.org/abs/2208.07339")(_quantize("rtn"))
register("gptq", QuantStepConfig, ("shrinklib.quant:quantize_", "shrinklib.quant:GPTQConfig"), "quantize",
         "https://arxiv.org/abs/2210.17323")(_quantize("gptq"))
register("awq", QuantStepConfig, ("shrinklib.quant:quantize_", "shrinklib.quant:AWQConfig"), "quantize",
         "https://arxiv.org/abs/2306.00978")(_quantize("awq"))


@register("evaluate", EvaluateStepConfig, kind="evaluate")
def _evaluate(state: State, c: EvaluateStepConfig) -> None:
    state.notes.append(f"ppl {_perplexity(state, c.eval_tokens, state.eval_seq_len):.3f} on {c.eval_tokens} tokens")


@register("export_safetensors", ExportSafetensorsStepConfig, kind="export")
def _export_safetensors(state: State, c: ExportSafetensorsStepConfig) -> None:
    from .export import export_safetensors

    r = export_safetensors(state.model, state.out / c.name, state.tokenizer, packed=c.packed, check=c.check)
    _report_export(state, r)


@register("export_gguf", ExportGGUFStepConfig, ("gguf:GGUFWriter",), kind="export", url="https://github.com/ggml-org/ggml/blob/master/docs/gguf.md")
def _export_gguf(state: State, c: ExportGGUFStepConfig) -> None:
    from .export import export_gguf

    r = export_gguf(state.model, state.out / f"{c.name}.{c.format}.gguf", state.tokenizer if c.tokenizer else None,
                    c.format, c.embed_type, check=c.check)
    _report_export(state, r)


def _report_export(state: State, r) -> None:
    state.notes.append(f"{Path(r.path).name}: {r.size_bytes / 2**20:.1f} MiB" +
                       ("" if r.ok is None else f", reload max|Δlogit| {r.max_abs_logit_diff:.2g} (tol {r.tolerance:g} rel)"))
    if r.ok is False:
        raise RuntimeError(f"export check failed: {r}")


# ----------------------------------------------------------------------------- validation of the recipe


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[tuple[str, object], ...]  # (step name, validated config)
    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    warnings: tuple[str, ...] = ()  # odd but possible choices, printed before a run


def build_config(cls: type, params: dict | None, where: str):
    """`cls(**params)` with clear errors: unknown fields, wrong types, failed validation."""
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise RecipeError(f"{where}: parameters must be a mapping, got {type(params).__name__} {params!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in fields(cls)]
    for key, value in params.items():
        if key not in allowed:
            raise RecipeError(f"{where}: unknown field {key!r}; allowed fields: {', '.join(allowed)}")
        if not type_ok(value, hints[key]):
            raise RecipeError(f"{where}: field {key!r} must be {type_name(hints[key])}, got {value!r}")
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in params]
    if missing:
        raise RecipeError(f"{where}: missing field(s) {missing}")
    try:
        return cls(**params)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"{where}: {err}") from err


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


def validate_order(steps: list[tuple[str, object]]) -> None:
    """Reject orders that cannot work, before anything runs."""
    packed_at = None
    quant: tuple[int, str, QuantStepConfig] | None = None
    for i, (name, c) in enumerate(steps, 1):
        kind = STEPS[name].kind
        if packed_at and (kind == "quantize" or name in ("minitron_depth", "minitron_width", "distill", "prune")):
            raise RecipeError(f"step {i} '{name}' cannot follow step {packed_at[0]} '{packed_at[1]}' (pack: true): "
                              "packed integer layers cannot be trained, pruned or quantized again; move it before, "
                              "or set pack: false there")
        if kind == "quantize":
            quant = (i, name, c)
            if c.pack:
                packed_at = (i, name)
        if name == "export_gguf" and c.format in ("Q4_0", "Q4_1") and quant is not None:
            j, qname, qc = quant
            if qc.bits > 4 or (qc.group_size is not None and qc.group_size % 32):
                raise RecipeError(f"step {i} 'export_gguf': format {c.format} needs blocks of 32 on a ≤ 4-bit grid, "
                                  f"but step {j} '{qname}' uses bits={qc.bits}, group_size={qc.group_size}; "
                                  "use a group size that is a multiple of 32, or format Q8_0/F16")
            if c.format == "Q4_0" and not qc.symmetric:
                raise RecipeError(f"step {i} 'export_gguf': Q4_0 is symmetric (w = d·(q−8)) but step {j} '{qname}' "
                                  "has symmetric: false; use Q4_1 or symmetric: true")


def validate_exports(steps: list[tuple[str, object]]) -> list[str]:
    """Refuse two exports writing the same path; warn of an export that comes before the last
    quantization step when no later step exports the quantized model. Returns the warnings."""
    seen: dict[str, int] = {}
    for i, (name, c) in enumerate(steps, 1):
        if STEPS[name].kind == "export":
            if c.target() in seen:
                raise RecipeError(f"step {i} '{name}' writes {c.target()!r} in --out, as step {seen[c.target()]} "
                                  "does; give one of them another name")
            seen[c.target()] = i
    kinds = [STEPS[name].kind for name, _ in steps]
    if "quantize" not in kinds or "export" not in kinds:
        return []
    last_quant = max(i for i, k in enumerate(kinds) if k == "quantize")
    last_export = max(i for i, k in enumerate(kinds) if k == "export")
    if last_export > last_quant:
        return []
    return [f"step {last_export + 1} '{steps[last_export][0]}' exports the model before step {last_quant + 1} "
            f"'{steps[last_quant][0]}' quantizes it, and no later step exports the quantized model"]


def parse_recipe(data: dict) -> Recipe:
    """Validate a recipe given as a dict (the parsed YAML); raises RecipeError naming step and field."""
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
        spec = STEPS[name]
        config = build_config(spec.config, params, f"step {i} '{name}'")
        for ref in spec.requires:
            try:
                _need(ref)
            except RecipeError as err:
                raise RecipeError(f"step {i} '{name}' {err}") from err
        try:  # the library's own configs check what the step configs pass on
            if spec.kind == "quantize":
                _quant_config(name, config)
            elif name == "prune":
                _need("shrinklib.prune:PruneConfig")(method=config.method, sparsity=config.sparsity, n=config.n, m=config.m)
            elif name == "distill":
                _need("shrinklib.distill:KDConfig")(divergence=config.divergence, temperature=config.temperature)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"step {i} '{name}': {err}") from err
        steps.append((name, config))
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


# ----------------------------------------------------------------------------- validation against the model, corpus, device and --out


CALIBRATED = ("minitron_depth", "minitron_width", "prune", "gptq", "awq")  # steps that read calibration sequences


def _input_sizes(model: nn.Module) -> dict[str, set[int]]:
    """Input sizes of the block linears by role (attn_in, attn_out, mlp_in, mlp_out)."""
    from .arch import blocks, layout, linears

    roles, sizes = layout(model).roles(), {}
    for block in blocks(model):
        for path, lin in linears(block).items():
            sizes.setdefault(roles.get(path, path), set()).add(lin.in_features)
    return sizes


def _after_width(sizes: dict[str, set[int]], config, c: MinitronWidthConfig) -> dict[str, set[int]]:
    """The input sizes after Minitron width pruning keeps c.hidden / c.intermediate / c.heads_per_group."""
    from .arch import head_dim, kv_heads

    sizes = dict(sizes)
    hd = head_dim(config)
    if c.hidden is not None:
        sizes["attn_in"] = sizes["mlp_in"] = {min(c.hidden, v) for v in sizes["attn_in"]}
    if c.intermediate is not None:
        sizes["mlp_out"] = {min(c.intermediate, v) for v in sizes["mlp_out"]}
    if c.heads_per_group is not None:
        sizes["attn_out"] = {min(kv_heads(config) * c.heads_per_group * hd, v) for v in sizes["attn_out"]}
    return sizes


def _check_multiple(sizes: dict[str, set[int]], m: int, where: str, why: str, instead: str) -> None:
    bad = sorted({v for vs in sizes.values() for v in vs if v % m})
    if bad:
        raise RecipeError(f"{where}: {why} needs every linear's input size to be a multiple of {m}, but this model "
                          f"has input size(s) {bad}; {instead}")


def _check_lengths(recipe: Recipe, context: int | None) -> None:
    """Calibration, evaluation and distillation sequences fit the model's context."""
    needs = splits_needed(recipe)
    lengths = [(f"step {i} 'distill'", c.seq_len) for i, (n, c) in enumerate(recipe.steps, 1) if n == "distill"]
    if "calib" in needs:
        lengths.append(("calibration", recipe.calibration.seq_len))
    if "eval" in needs:
        lengths.append(("evaluation", recipe.evaluation.seq_len))
    for where, length in lengths:
        if context is not None and length > context:
            raise RecipeError(f"{where}: seq_len={length} exceeds the model's context of {context} tokens "
                              "(max_position_embeddings)")


def check_model(recipe: Recipe, model: nn.Module) -> None:
    """Checks that need the model (its config and shapes; a model on the meta device will do),
    before any step runs: architecture, already quantized, layer counts, N:M and Q4 block sizes
    against every linear's input size (after width pruning), sequence lengths within its context."""
    from .checks import check_not_quantized, context_length

    model_type = getattr(model.config, "model_type", "?")
    _check_lengths(recipe, context_length(model))
    sizes = None
    for i, (name, c) in enumerate(recipe.steps, 1):
        where = f"step {i} '{name}'"
        if name in ("minitron_depth", "minitron_width", "export_gguf") and model_type != "llama":
            raise RecipeError(f"{where} needs a Llama-architecture model; this one is '{model_type}'")
        if STEPS[name].kind == "quantize":
            try:
                check_not_quantized(model, where)
            except ValueError as err:
                raise RecipeError(str(err)) from err
        if name == "minitron_depth" and c.n_drop >= model.config.num_hidden_layers:
            raise RecipeError(f"{where}: n_drop={c.n_drop} but the model has only "
                              f"{model.config.num_hidden_layers} layers")
        if name in ("prune", "export_gguf", "minitron_width") and sizes is None:
            try:
                sizes = _input_sizes(model)
            except ValueError as err:
                raise RecipeError(f"{where}: {err}") from err
        if name == "minitron_width":
            sizes = _after_width(sizes, model.config, c)
        if name == "prune" and c.n:
            _check_multiple(sizes, c.m, where, f"{c.n}:{c.m} pruning", "choose another pattern or unstructured sparsity")
        if name == "export_gguf":
            from .export import ExportError, check_llama_exportable

            try:
                check_llama_exportable(model)
            except ExportError as err:
                raise RecipeError(f"{where}: {err}") from err
            if c.format in ("Q4_0", "Q4_1"):
                _check_multiple(sizes, 32, where, f"format {c.format} (blocks of 32 inputs)", "use format Q8_0 or F16")


def splits_needed(recipe: Recipe) -> dict[str, tuple[int, str]]:
    """{corpus split: (tokens it must hold, what needs them)} for this recipe's steps."""
    need: dict[str, tuple[int, str]] = {}

    def add(split, n, why):
        if n > need.get(split, (0, ""))[0]:
            need[split] = (n, why)

    for i, (name, c) in enumerate(recipe.steps, 1):
        if name in CALIBRATED:
            add("calib", recipe.calibration.seq_len + 1, f"step {i} '{name}' (calibration windows of "
                f"{recipe.calibration.seq_len} tokens)")
        if name == "distill":
            add("train", c.seq_len + 1, f"step {i} 'distill' (windows of {c.seq_len} tokens)")
        if name == "evaluate":
            add("eval", 2, f"step {i} 'evaluate'")
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


def prepare_run(recipe: Recipe, model_id: str | None = None, out: str | Path = "compressed", device: str = "cpu",
                overwrite: bool = False, model: nn.Module | None = None, tokenizer=None) -> Prepared:
    """Everything `run_recipe` checks before any work, without loading the weights: the device,
    --out, the model (its config and shapes, built on the meta device), the corpus and its splits.
    `python -m shrinklib compress --dry-run` stops here."""
    from .checks import check_device, vocab_size
    from .data import load_corpus

    check_device(device)
    check_out(out, overwrite)
    if model is None:
        from .models import load_skeleton

        model, tokenizer = load_skeleton(model_id)
    check_model(recipe, model)
    if tokenizer is not None and vocab_size(model) is not None and len(tokenizer) > vocab_size(model):
        raise RecipeError(f"the model's tokenizer has {len(tokenizer):,} tokens but its vocabulary only "
                          f"{vocab_size(model):,} rows: the tokenizer belongs to another model")
    corpus = None
    if splits_needed(recipe):
        corpus = load_corpus(recipe.calibration.corpus)
        check_corpus(recipe, corpus, tokenizer)
    return Prepared(model, tokenizer, corpus)


# ----------------------------------------------------------------------------- running


@dataclass
class StepResult:
    step: str
    config: dict
    seconds: float
    size_bytes: int
    params: int
    ppl: float | None
    notes: str = ""


def _perplexity(state: State, eval_tokens: int, seq_len: int = 512) -> float:
    from .evaluate import perplexity

    ids = state.corpus.tokens(state.tokenizer, "eval", max_tokens=eval_tokens)
    return perplexity(state.model, ids, seq_len=seq_len, max_tokens=eval_tokens).ppl


def run_recipe(recipe: Recipe, model_id: str | None = None, out: str | Path = "compressed", device: str = "cpu",
               model: nn.Module | None = None, tokenizer=None, progress: bool = True,
               overwrite: bool = False) -> list[StepResult]:
    """Check everything (`prepare_run`), load the model (or use `model`/`tokenizer`), apply each step.

    Returns one StepResult per step, preceded by the loaded model's ("input"). The exports and
    `summary.json`/`summary.md` are written to a temporary folder that becomes `out` only when
    every step succeeded; after a failure it is kept as `<out>.failed` (with FAILED.txt) and `out`
    is untouched. An existing `out` is replaced only when it is a previous recipe output (or with
    `overwrite`).
    """
    from .io import staged_folder

    prepared = prepare_run(recipe, model_id, out, device, overwrite, model, tokenizer)
    if model is None:
        from .models import load_model

        model, tokenizer = load_model(model_id, device=device)
        check_model(recipe, model)
    with staged_folder(out, overwrite, keep_failed=True, what="--out", recipe=recipe.name) as tmp:
        needs_teacher = any(name == "distill" for name, _ in recipe.steps)
        state = State(model, tokenizer, tmp, recipe.calibration, device,
                      copy.deepcopy(model).eval() if needs_teacher else None, progress, recipe.evaluation.seq_len,
                      _corpus=prepared.corpus)
        results: list[StepResult] = []
        try:
            _run_steps(recipe, state, model_id, progress, results)
        finally:  # after a failure: the steps that finished, beside FAILED.txt in <out>.failed
            (tmp / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
            (tmp / "summary.md").write_text(summary_table(results) + "\n")
    return results


def _run_steps(recipe: Recipe, state: State, model_id: str | None, progress: bool, results: list[StepResult]) -> None:
    """Apply the steps in order, appending one StepResult each (after the input's) to `results`;
    a step's error becomes StepFailed naming it."""
    from .evaluate import count_params, model_size_bytes

    ev = recipe.evaluation

    def row(step: str, config: dict, seconds: float) -> StepResult:
        if step in STEPS and STEPS[step].kind == "export":  # the model did not change
            ppl = results[-1].ppl
        else:
            ppl = _perplexity(state, ev.eval_tokens, ev.seq_len) if ev.eval_tokens else None
        return StepResult(step, config, seconds, model_size_bytes(state.model), count_params(state.model), ppl,
                          "; ".join(state.notes))

    results.append(row("input", {"model": model_id or getattr(state.model.config, "name_or_path", "")}, 0.0))
    bar = tqdm(recipe.steps, desc=recipe.name, disable=not progress)
    for i, (name, config) in enumerate(bar, 1):
        bar.set_postfix(step=name)
        state.notes = []
        t0 = time.perf_counter()
        try:
            with contextlib.nullcontext() if name == "distill" else torch.no_grad():  # only distillation trains
                STEPS[name].run(state, config)
        except Exception as err:
            raise StepFailed(f"step {i} '{name}' failed: {type(err).__name__}: {' '.join(str(err).split())}") from err
        results.append(row(name, asdict(config), time.perf_counter() - t0))


def summary_table(results: list[StepResult]) -> str:
    """A Markdown table: step, size, parameters, perplexity, seconds, notes."""
    lines = ["| step | size (MiB) | params (M) | perplexity | time (s) | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        ppl = "–" if r.ppl is None else f"{r.ppl:.3f}"
        lines.append(f"| {r.step} | {r.size_bytes / 2**20:.1f} | {r.params / 1e6:.1f} | {ppl} | {r.seconds:.1f} | {r.notes} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- comparing results


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Labels of the points no other point dominates (smaller-or-equal in both coordinates and
    strictly smaller in one), sorted by the first coordinate. points: {label: (cost, error)}."""
    front = []
    for k, (x, y) in points.items():
        dominated = any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for k2, (x2, y2) in points.items() if k2 != k)
        if not dominated:
            front.append(k)
    return sorted(front, key=lambda k: points[k])


_PPL_KEYS = ("ppl", "perplexity")
_SIZE_KEYS = ("size_bytes", "bytes", "model_bytes", "size")
_PARAM_KEYS = ("params",)  # parameter counts: float32 bytes = 4 per parameter
_LATENCY_KEYS = ("latency_s", "s_per_token", "decode_s_per_token", "decode_latency", "latency")
_BASELINE_NAMES = ("fp32", "original", "dense", "base")
_BASELINE_KEYS = ("ppl_fp32", "ppl_dense", "ppl_teacher", "perplexity", "ppl")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def results_points(results: list[dict]) -> list[dict]:
    """(size, perplexity[, latency]) points found in results files of the suite's shape.

    Two shapes are read from each file's `metrics`, at any depth:
    - a dict holding a perplexity key and a size key (bytes), e.g. {"ppl": 12.1, "size_bytes": 1e8};
    - parallel dicts keyed by technique, e.g. {"ppl": {"fp32": 11.9, "gptq/4bit": 14.1},
      "size_bytes": {"fp32": 5e8, "gptq/4bit": 1.8e8}} (or "params", counted as float32 bytes),
      with an optional latency dict of the same keys.
    Each point carries `baseline_ppl`, the notebook's own uncompressed perplexity on the same
    evaluation tokens when the file has one (a "fp32"/"original"/"dense" entry, or a scalar
    such as `ppl_dense`), else None: notebooks evaluate on different token counts, so only
    perplexity *ratios* to their own baseline compare across notebooks. Files or entries of
    another shape are skipped, so the frontier shows what exists.
    """
    points = []

    def first(obj, keys, test):
        low = {k.lower(): k for k in obj if isinstance(k, str)}
        return next((obj[low[k]] for k in keys if k in low and test(obj[low[k]])), None)

    def walk(obj, path, notebook, baseline):
        if not isinstance(obj, dict):
            return
        ppl, size = first(obj, _PPL_KEYS, _number), first(obj, _SIZE_KEYS, _number)
        if ppl is not None and size is not None and size > 0:
            lat = first(obj, _LATENCY_KEYS, _number)
            points.append({"notebook": notebook, "technique": "/".join(path) or notebook, "size_bytes": float(size),
                           "ppl": float(ppl), "latency_s": None if lat is None else float(lat), "baseline_ppl": baseline})
        ppls = first(obj, _PPL_KEYS, lambda v: isinstance(v, dict))
        sizes = first(obj, _SIZE_KEYS, lambda v: isinstance(v, dict))
        scale = 1.0
        if sizes is None:
            sizes, scale = first(obj, _PARAM_KEYS, lambda v: isinstance(v, dict)), 4.0
        if ppls is not None and sizes is not None:
            lats = first(obj, _LATENCY_KEYS, lambda v: isinstance(v, dict)) or {}
            own = next((ppls[b] for b in _BASELINE_NAMES if _number(ppls.get(b))), baseline)
            for k, p in ppls.items():
                if _number(p) and _number(sizes.get(k)) and sizes[k] > 0:
                    lat = lats.get(k)
                    points.append({"notebook": notebook, "technique": "/".join(path + [str(k)]), "ppl": float(p),
                                   "size_bytes": scale * float(sizes[k]), "latency_s": float(lat) if _number(lat) else None,
                                   "baseline_ppl": None if own is None else float(own)})
        for k, v in obj.items():
            walk(v, path + [str(k)], notebook, baseline)

    for r in results:
        if isinstance(r, dict) and isinstance(r.get("metrics"), dict):
            base = first(r["metrics"], _BASELINE_KEYS, _number)
            walk(r["metrics"], [], str(r.get("notebook", "?")), None if base is None else float(base))
    return points
