"""Merge configurations in the shape of mergekit's YAML files, where the two overlap:

    merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties, slerp
    base_model: path/to/base
    models:
      - model: path/to/math
        parameters: {weight: 1.0, density: 0.5}
      - model: path/to/code
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0, t: 0.5, seed: 0}   # method-wide (and per-model defaults)
    dtype: float32

Not supported (a clear error): `slices` (layer ranges), and parameter gradients (lists of
values over layers). Keys such as `tokenizer_source` are kept for the round trip but unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..checks import check_field, check_fields, load_yaml
from ..io import atomic_write_text
from .checks import check_weights

MODEL_PARAMS = ("weight", "density")
KEPT_KEYS = ("tokenizer_source", "tokenizer", "chat_template", "out_dtype", "name")
# method-wide parameters the methods read, and their types (per-model defaults included)
PARAMETERS = {"normalize": bool, "lambda": float, "t": float, "seed": int, "weight": float, "density": float}
DTYPES = ("float32", "float16", "bfloat16")  # `dtype` of the merged tensors (None: the inputs' own)


@dataclass
class ModelSpec:
    """One input model: a folder, a safetensors file, or any name the caller resolves."""

    model: str
    weight: float | None = None  # None: the method-wide default (1.0)
    density: float | None = None  # None: the method-wide default

    def __post_init__(self):
        for k in MODEL_PARAMS:
            v = getattr(self, k)
            if isinstance(v, (list, dict)):
                raise ValueError(f"Model {self.model!r}: {k} must be a number (gradients over layers are "
                                 f"not supported), got {v!r}")
            check_field(f"Model {self.model!r}", k, v, float | None)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"Model {self.model!r}: {k} must be finite, got {v!r}")
        if self.density is not None and not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"Model {self.model!r}: density must be in (0, 1], got {self.density}")


@dataclass
class MergeConfig:
    """A merge: its method, input models with weights/densities, base model and parameters."""

    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None
    extra: dict = field(default_factory=dict)  # mergekit keys kept for the round trip, unused

    def __post_init__(self):
        from .registry import METHODS

        check_fields(self)
        if self.merge_method not in METHODS:
            raise ValueError(f"Unknown merge_method {self.merge_method!r}; supported: {sorted(METHODS)}")
        self.models = [m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in self.models]
        method = METHODS[self.merge_method]
        if method.needs_base and not self.base_model:
            raise ValueError(f"merge_method {self.merge_method!r} needs base_model")
        if not self.inputs():
            raise ValueError("A merge needs at least one model besides the base")
        if method.n_models is not None and len(self.inputs()) != method.n_models:
            raise ValueError(f"merge_method {self.merge_method!r} takes base_model plus exactly "
                             f"{method.n_models} other model(s), got {[m.model for m in self.inputs()]}")
        for k, v in self.parameters.items():
            if isinstance(v, (list, dict)):
                raise ValueError(f"parameter {k!r}: gradients (lists over layers) are not supported, got {v!r}")
            if k not in PARAMETERS:
                raise ValueError(f"unknown merge parameter {k!r}; supported: {', '.join(PARAMETERS)}")
            check_field("merge parameters", k, v, PARAMETERS[k])
        if "t" in self.parameters and not 0.0 <= float(self.parameters["t"]) <= 1.0:
            raise ValueError(f"t must be in [0, 1], got {self.parameters['t']}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)} or leave it out")
        check_weights(self.weights(), len(self.inputs()),
                      normalize=self.merge_method == "linear" and self.parameters.get("normalize", True))

    def inputs(self) -> list[ModelSpec]:
        """The models merged into the base (the base itself excluded when it is listed)."""
        return [m for m in self.models if m.model != self.base_model] if self.base_model else list(self.models)

    def weights(self) -> list[float]:
        return [float(m.weight if m.weight is not None else self.parameters.get("weight", 1.0)) for m in self.inputs()]

    def densities(self) -> list[float]:
        return [float(m.density if m.density is not None else self.parameters.get("density", 1.0)) for m in self.inputs()]


def config_from_dict(d: dict) -> MergeConfig:
    """A `MergeConfig` from a mergekit-shaped dict."""
    d = dict(d)
    if "slices" in d:
        raise ValueError("mergekit 'slices' (layer ranges) are not supported; list whole models under 'models'")
    unknown = set(d) - {"merge_method", "models", "base_model", "parameters", "dtype", *KEPT_KEYS}
    if unknown:
        raise ValueError(f"Unknown keys in the merge config: {sorted(unknown)}")
    models = []
    for m in d.get("models") or []:
        p = dict(m.get("parameters") or {})
        bad = set(p) - set(MODEL_PARAMS)
        if bad:
            raise ValueError(f"Model {m.get('model')!r}: unsupported parameters {sorted(bad)}")
        models.append(ModelSpec(str(m["model"]), p.get("weight"), p.get("density")))
    return MergeConfig(d.get("merge_method", ""), models, d.get("base_model"), dict(d.get("parameters") or {}),
                       d.get("dtype"), {k: d[k] for k in KEPT_KEYS if k in d})


def config_to_dict(c: MergeConfig) -> dict:
    """The mergekit-shaped dict of a config (only the parameters that are set)."""
    models = []
    for m in c.models:
        p = {k: getattr(m, k) for k in MODEL_PARAMS if getattr(m, k) is not None}
        models.append({"model": m.model, **({"parameters": p} if p else {})})
    d = {"merge_method": c.merge_method, "models": models}
    if c.base_model:
        d["base_model"] = c.base_model
    if c.parameters:
        d["parameters"] = dict(c.parameters)
    if c.dtype:
        d["dtype"] = c.dtype
    return {**d, **c.extra}


def load_config(source: str | Path) -> MergeConfig:
    """Read a mergekit-shaped YAML file (or YAML text containing a newline)."""
    text = source if isinstance(source, str) and "\n" in source else Path(source).read_text()
    data = load_yaml(text, "merge config")
    if not isinstance(data, dict):
        raise ValueError(f"a merge config is a mapping with merge_method and models, got {type(data).__name__}")
    return config_from_dict(data)


def save_config(config: MergeConfig, path: str | Path | None = None) -> str:
    """The YAML text of a config; written atomically to `path` when given."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    if path is not None:
        atomic_write_text(path, text)
    return text
