"""Compression recipes: a YAML list of steps applied to a model, validated before any work starts.

    name: smollm2-depth-gptq
    calibration: {corpus: pydoc, n: 16, seq_len: 256, seed: 0}
    evaluation: {eval_tokens: 2048}          # perplexity after every step (0: off)
    steps:
      - minitron_depth: {n_drop: 6}
      - distill: {steps: 50, top_k: 64}
      - gptq: {bits: 4, group_size: 64, act_order: true}
      - export_gguf: {fmt: Q8_0}

Each step registers the library's own configs and function, so nothing is declared twice: `gptq`
takes every field of `quant.GPTQConfig` plus `quantize_`'s `pack` and `backend`. STEPS holds a step
per quantizer of `quant.METHODS`, the pruners, Minitron, distillation, an evaluation and the
exports (a new export is one `register_export` call); `python -m shrinklib steps` lists them.
`recipe_checks` checks a recipe and what it meets before any work; `run_recipe` applies it into a
temporary folder that becomes --out when every step succeeded; `apply_recipe` applies it in memory.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import export, minitron, prune, quant
from .checks import options_of
from .data import WindowConfig, window_batches
from .distill import KDConfig, kd_loss_fn
from .recipe_checks import (CalibrationConfig, EvaluationConfig, ExportTarget, Params, Recipe,  # noqa: F401
                            RecipeError, check_backend, check_depth, check_distill, check_eval, check_gguf,
                            check_model, check_pattern, llm_pruner_sizes, load_recipe, parse_recipe, prepare_run,
                            q4_grid_after, slicegpt_sizes, width_sizes)
from .train import TrainConfig, train


class StepFailed(RuntimeError):
    """A step raised while the recipe ran; the message names the step and the cause."""


# ----------------------------------------------------------------------------- the registry


_none = lambda *args: None  # noqa: E731 (a hook that checks nothing)


@dataclass(frozen=True)
class Step:
    """One registered step: the library configs it takes, the function that runs it, what it needs."""

    name: str
    configs: tuple[type, ...]  # the library's config dataclasses; the step's fields are theirs
    run: Callable  # run(state, params)
    kind: str = "transform"  # "transform", "train" (needs a teacher, runs with gradients), "quantize", "export", "evaluate"
    url: str = ""
    reads: Callable[[Params], tuple[str, ...]] = lambda p: ()  # corpus splits it reads ("calib", "train", "eval")
    validate: Callable = _none  # validate(params, earlier steps): checks no single config can make
    check_model: Callable = _none  # check_model(params, ModelFacts): before loading the weights
    target: Callable[[Params], str] | None = None  # exports: the file or folder written in --out
    needs: Callable[[Params], tuple[str, ...]] = lambda p: ()  # techniques it asks of shrinklib.arch's entry
    exportable: bool = True  # the model it leaves is one an export can write


STEPS: dict[str, Step] = {}


def register(name: str, configs: tuple[type, ...], run: Callable, **kw) -> Step:
    """Add a step to STEPS (`kw`: the other fields of `Step`); the configs may not share a field name."""
    names = [f for c in configs for f in inspect.signature(c).parameters]
    if len(names) != len(set(names)):
        raise ValueError(f"step {name!r}: its configs share a field name ({names})")
    STEPS[name] = Step(name, configs, run, **kw)
    return STEPS[name]


@dataclass
class State:
    """What the steps share while a recipe runs."""

    model: nn.Module
    tokenizer: object
    out: Path | None
    calibration: CalibrationConfig
    device: str = "cpu"
    teacher: nn.Module | None = None
    progress: bool = True
    corpus: object = None  # loaded when a step first reads it
    notes: list = field(default_factory=list)  # what the current step reports (exports, perplexity)
    ppl: float | None = None  # set by an evaluate step
    _calib: torch.Tensor | None = None
    _splits: dict = field(default_factory=dict)

    def split(self, name: str) -> torch.Tensor:
        """The token ids of a corpus split (tokenized once)."""
        if self.corpus is None:
            from .data import load_corpus

            self.corpus = load_corpus(self.calibration.corpus)
        if name not in self._splits:
            self._splits[name] = self.corpus.tokens(self.tokenizer, name)
        return self._splits[name]

    def calib_ids(self) -> torch.Tensor:
        if self._calib is None:
            from .data import sample_windows

            c = self.calibration
            self._calib = sample_windows(self.split("calib"), c.n, c.seq_len, c.seed, self.corpus.describe("calib"))
        return self._calib


# ----------------------------------------------------------------------------- the steps


def _depth(state: State, p: Params) -> None:
    dropped = minitron.prune_depth_(state.model, p.n_drop, state.calib_ids(), p.metric, p.iterative)
    state.notes.append(f"dropped layers {dropped}")


register("minitron_depth", (minitron.MinitronDepthConfig,), _depth, url=minitron.MINITRON_URL,
         needs=lambda p: ("minitron_depth",),
         reads=lambda p: ("calib",), check_model=check_depth)
register("minitron_width", (minitron.MinitronWidthConfig,),
         lambda s, p: minitron.prune_width_iterative_(s.model, s.calib_ids(), p.hidden, p.intermediate,
                                                      p.heads_per_group, p.iterations),
         url=minitron.MINITRON_URL, reads=lambda p: ("calib",), check_model=width_sizes,
         needs=lambda p: ("minitron_width",) + (("minitron_hidden",) if p.hidden is not None else ()))


def _distill(state: State, p: Params) -> None:
    tc = p.of(TrainConfig)
    batch = window_batches(state.split("train"), p.of(WindowConfig), tc.steps * tc.grad_accum, tc.seed,
                           state.corpus.describe("train"))
    hist = train(state.model, batch, kd_loss_fn(state.teacher, p.of(KDConfig)),
                 replace(tc, progress=tc.progress and state.progress))
    state.model.eval()
    state.notes.append(f"KD loss {hist[0]['loss']:.3g} → {hist[-1]['loss']:.3g}")


register("distill", (KDConfig, TrainConfig, WindowConfig), _distill, kind="train", url="https://arxiv.org/abs/1503.02531",
         reads=lambda p: ("train",), validate=check_distill)


def _prune(state: State, p: Params) -> None:
    c = p.of(prune.PruneConfig)
    calib = state.calib_ids() if prune.METHODS[c.method].needs_calibration else None
    prune.prune_(state.model, c, calib, progress=state.progress)


register("prune", (prune.PruneConfig,), _prune, url=prune.METHODS["wanda"].url, check_model=check_pattern,
         reads=lambda p: ("calib",) if prune.METHODS[p.method].needs_calibration else ())


register("llm_pruner", (prune.LLMPrunerConfig,), lambda s, p: prune.llm_prune_(s.model, p.parts[0], s.calib_ids()),
         url="https://arxiv.org/abs/2305.11627", needs=lambda p: ("llm_pruner",), reads=lambda p: ("calib",),
         check_model=llm_pruner_sizes)
register("slicegpt", (prune.SliceGPTConfig,), lambda s, p: prune.slicegpt_(s.model, p.parts[0], s.calib_ids()),
         url="https://arxiv.org/abs/2401.15024", needs=lambda p: ("slicegpt",), reads=lambda p: ("calib",),
         check_model=slicegpt_sizes,
         exportable=False)


register("rotate", (quant.RotationConfig,), lambda s, p: quant.rotate_(s.model, p.parts[0]),
         url="https://arxiv.org/abs/2404.00456", needs=lambda p: ("rotate",), exportable=False)


QuantizeOptions = options_of(quant.quantize_, "pack", "backend", check=check_backend)
def _quantize(state: State, p: Params) -> None:
    config = p.parts[0]
    calib = state.calib_ids() if quant.reads_calibration(config) else None
    options = asdict(p.of(QuantizeOptions)) if len(p.parts) > 1 else {}
    quant.quantize_(state.model, config, calib, progress=state.progress, **options)


for _name, (_config, _url) in quant.METHODS.items():  # one step per quantizer, with the library's config
    register(_name, (_config,) if _name == "smoothquant" else (_config, QuantizeOptions), _quantize, kind="quantize",
             url=_url, reads=lambda p: ("calib",) if quant.reads_calibration(p.parts[0]) else (),
             needs={"awq": lambda p: ("fold",), "smoothquant": lambda p: ("fold",) if p.smooth else ()}.get(_name, lambda p: ()))


def _evaluate(state: State, p: Params) -> None:
    state.ppl = _perplexity(state, p.eval_tokens, p.seq_len)
    state.notes.append(f"ppl {state.ppl:.3f} on {p.eval_tokens} tokens")


register("evaluate", (EvaluationConfig,), _evaluate, kind="evaluate", reads=lambda p: ("eval",), validate=check_eval)


def register_export(name: str, fn: Callable, options: tuple[str, ...], target: Callable[[Params], str] = lambda p: p.name,
                    check: Callable = _none, **kw) -> Step:
    """An export step: `fn(model, <out>/<target>, tokenizer, **options)` returning an `export.ExportReport`;
    its fields are `ExportTarget`'s (name, tokenizer) and `fn`'s keyword parameters `options`."""

    def run(state: State, p: Params) -> None:
        if state.out is None:
            raise RecipeError(f"step '{name}' writes files: give an output folder")
        r = fn(state.model, state.out / target(p), state.tokenizer if p.tokenizer else None,
               **{k: getattr(p, k) for k in options})
        state.notes.append(f"{Path(r.path).name}: {r.size_bytes / 2**20:.1f} MiB" + ("" if r.ok is None else
                           f", reload max|Δlogit| {r.max_abs_logit_diff:.2g} (tol {r.tolerance:g} rel)"))
        if r.ok is False:
            raise RuntimeError(f"export check failed: {r}")

    return register(name, (ExportTarget, options_of(fn, *options, check=check)), run, kind="export", target=target, **kw)


register_export("export_safetensors", export.export_safetensors, ("packed", "check"))
register_export("export_gguf", export.export_gguf, ("fmt", "embed_type", "check"), lambda p: f"{p.name}.{p.fmt}.gguf",
                check=lambda o: export.check_gguf_options(o.fmt, o.embed_type), validate=q4_grid_after,
                check_model=check_gguf, needs=lambda p: ("gguf",), url="https://github.com/ggml-org/ggml/blob/master/docs/gguf.md")


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


def _perplexity(state: State, eval_tokens: int, seq_len: int) -> float:
    from .evaluate import perplexity

    return perplexity(state.model, state.split("eval")[:eval_tokens], seq_len=seq_len, max_tokens=eval_tokens).ppl


def apply_recipe(recipe: Recipe, model: nn.Module, tokenizer, corpus=None, teacher: nn.Module | None = None,
                 device: str = "cpu", progress: bool = False, out: Path | None = None) -> list[StepResult]:
    """Apply a validated recipe to a model in place (after `prepare_run`'s checks of the model and
    corpus); returns one StepResult per step, after the input's. Distillation's teacher defaults to
    a copy of the model as given; exports need `out`, an existing folder."""
    prepared, results = prepare_run(recipe, None, None, device, model=model, tokenizer=tokenizer, corpus=corpus), []
    _run_steps(recipe, model, tokenizer, prepared.corpus, teacher, device, progress, out, results)
    return results


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
        results: list[StepResult] = []
        try:
            _run_steps(recipe, model, tokenizer, prepared.corpus, None, device, progress, tmp, results, model_id)
        finally:  # after a failure: the steps that finished, beside FAILED.txt in <out>.failed
            (tmp / "summary.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
            (tmp / "summary.md").write_text(summary_table(results) + "\n")
    return results


def _run_steps(recipe: Recipe, model: nn.Module, tokenizer, corpus, teacher: nn.Module | None, device: str,
               progress: bool, out: Path | None, results: list[StepResult], model_id: str | None = None) -> None:
    """Apply the steps in order, appending one StepResult each (after the input's) to `results`;
    a step's error becomes StepFailed naming it."""
    from .evaluate import count_params, model_size_bytes

    if teacher is None and any(STEPS[name].kind == "train" for name, _ in recipe.steps):
        teacher = copy.deepcopy(model).eval()
    state = State(model, tokenizer, out, recipe.calibration, device, teacher, progress, corpus)
    ev = recipe.evaluation

    def row(step: str, config: dict, seconds: float) -> StepResult:
        if state.ppl is not None:
            ppl = state.ppl
        elif step in STEPS and STEPS[step].kind == "export":  # the model did not change
            ppl = results[-1].ppl
        else:
            ppl = _perplexity(state, ev.eval_tokens, ev.seq_len) if ev.eval_tokens else None
        return StepResult(step, config, seconds, model_size_bytes(state.model), count_params(state.model), ppl,
                          "; ".join(state.notes))

    results.append(row("input", {"model": model_id or getattr(model.config, "name_or_path", "")}, 0.0))
    bar = tqdm(recipe.steps, desc=recipe.name, disable=not state.progress)
    for i, (name, params) in enumerate(bar, 1):
        bar.set_postfix(step=name)
        state.notes, state.ppl = [], None
        t0 = time.perf_counter()
        try:
            with contextlib.nullcontext() if STEPS[name].kind == "train" else torch.no_grad():
                STEPS[name].run(state, params)
        except Exception as err:
            raise StepFailed(f"step {i} '{name}' failed: {type(err).__name__}: {' '.join(str(err).split())}") from err
        results.append(row(name, params.asdict(), time.perf_counter() - t0))


def summary_table(results: list[StepResult]) -> str:
    """A Markdown table: step, size, parameters, perplexity, seconds, notes."""
    lines = ["| step | size (MiB) | params (M) | perplexity | time (s) | notes |", "|---|---|---|---|---|---|"]
    for r in results:
        ppl = "–" if r.ppl is None else f"{r.ppl:.3f}"
        lines.append(f"| {r.step} | {r.size_bytes / 2**20:.1f} | {r.params / 1e6:.1f} | {ppl} | {r.seconds:.1f} | {r.notes} |")
    return "\n".join(lines)
