"""Checks of user input, written once: typed config fields, token ids, devices, vocabularies,
plain output names and YAML files. Each raises a one-line error that says what was wrong and
what to do.

    check_fields(self)                       # first line of every config's __post_init__
    check_token_ids(ids, model, ndim=2)      # wherever token ids enter a model
    device = check_device("cuda")            # before a model is loaded or moved
    check_shared_vocabulary({"target": t, "draft": d}, tokenizers)
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import typing
from dataclasses import fields

import numpy as np
import torch
from torch import Tensor, nn


class FieldTypeError(TypeError, ValueError):
    """A config field of the wrong type (a TypeError, and a ValueError like the other config errors)."""


class DeviceError(ValueError):
    """A device that this machine does not have, or a name torch does not know."""


class TokenIdsError(ValueError):
    """Token ids of the wrong shape, type or range for a model."""


class VocabularyMismatchError(ValueError):
    """Models that exchange token ids or logits do not share one vocabulary."""


class TokenizerMismatchError(VocabularyMismatchError):
    """Tokenizers that must be one tokenizer map some string to different ids."""


# ----------------------------------------------------------------------------- typed fields


def type_ok(value, annotation) -> bool:
    """Whether `value` fits a dataclass field annotation (bool, int, float, str, None, unions,
    Literal, classes, list/tuple/dict of anything). int is not bool; float takes any real
    number but bool; other annotations (callables) are not checked."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, (bool, np.bool_))
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, dict):
        return isinstance(value, origin)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null",
          list: "a list", tuple: "a tuple", dict: "a mapping"}


def type_name(annotation) -> str:
    """'an integer or null' for `int | None`, as a user reads it."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return _NAMES.get(typing.get_origin(annotation) or annotation, getattr(annotation, "__name__", str(annotation)))


@functools.cache
def _field_types(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def check_field(owner: str, name: str, value, annotation) -> None:
    """Raise FieldTypeError naming the field unless `value` fits its annotation (NaN is refused)."""
    if not type_ok(value, annotation):
        raise FieldTypeError(f"{owner}: {name} must be {type_name(annotation)}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"{owner}: {name} is NaN; give a number")


def check_fields(config) -> None:
    """Check every field of a dataclass instance against its annotation (call it first in
    `__post_init__`): `symmetric="false"` is refused instead of being read as true."""
    for name, annotation in _field_types(type(config)).items():
        check_field(type(config).__name__, name, getattr(config, name), annotation)


def options_of(fn, *names: str, check=None) -> type:
    """A frozen config dataclass of the keyword parameters `names` of a function, with the function's
    own annotations and defaults, checked by type (`check_fields`) and then by `check(self)`: a
    function's options become config fields without being declared a second time."""
    import dataclasses
    import inspect

    params, hints = inspect.signature(fn).parameters, typing.get_type_hints(fn)
    spec = [(n, hints[n], dataclasses.field(default=params[n].default)) for n in names]

    def post_init(self):
        check_fields(self)
        if check is not None:
            check(self)

    return dataclasses.make_dataclass(f"{fn.__name__}_options", spec, frozen=True, namespace={"__post_init__": post_init})


# ----------------------------------------------------------------------------- token ids


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's output layer (its logits), else its config's vocab_size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "vocab_size", None)


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions cover (config.max_position_embeddings)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "max_position_embeddings", None)


def check_token_ids(ids, model: nn.Module | None = None, ndim: int = 2, what: str = "input_ids",
                    min_len: int = 1, vocab: int | None = None, max_len: int | None = None) -> None:
    """Token ids a model can read: an integer tensor of `ndim` dimensions (2: (n, L)), not empty,
    at least `min_len` long, every id in [0, vocab size), and (n, L) no longer than the model's context.

    Args:
        model: gives the vocabulary size and context length (or pass `vocab`, `max_len`).
        ndim: 2 for (n, L) sequences, 1 for one stream of ids (cut into windows by the caller).
    """
    if not isinstance(ids, Tensor):
        raise TokenIdsError(f"{what} must be a torch tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TokenIdsError(f"{what} must hold integer token ids, got dtype {ids.dtype}; pass the tokenizer's "
                            "input_ids (torch.long)")
    if ids.dim() != ndim:
        shape = "(n, L): n sequences of L tokens" if ndim == 2 else "(N,): one sequence"
        raise TokenIdsError(f"{what} must be {ndim}-D {shape}, got shape {tuple(ids.shape)}")
    if ids.numel() == 0 or ids.shape[-1] < min_len:
        raise TokenIdsError(f"{what} needs at least {min_len} token(s) per sequence, got shape {tuple(ids.shape)}")
    vocab = vocab if vocab is not None else vocab_size(model) if model is not None else None
    if max_len is None and model is not None and ndim == 2:  # a 1-D stream is cut into windows by its reader
        max_len = context_length(model)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise TokenIdsError(f"{what} holds ids in [{lo}, {hi}] but the model's vocabulary is [0, {vocab}): "
                            "were they made by another model's tokenizer?")
    if max_len is not None and ids.shape[-1] > max_len:
        raise TokenIdsError(f"{what} has {ids.shape[-1]} tokens per sequence, more than the model's context of "
                            f"{max_len} (max_position_embeddings); use shorter sequences")


# ----------------------------------------------------------------------------- devices


def check_device(device) -> torch.device:
    """The torch.device for `device`, or DeviceError saying why this machine cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise DeviceError(f"device {device!r}: this PyTorch ({torch.__version__}) was built without CUDA; "
                              "install a CUDA build of torch or use device='cpu'")
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r}: no CUDA GPU is visible (torch.cuda.is_available() is False; "
                              "check the driver and CUDA_VISIBLE_DEVICES) or use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                              f"numbered from 0")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise DeviceError(f"device {device!r}: Apple's MPS backend is not available here; use device='cpu'")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise DeviceError(f"device {device!r} is not supported by the suite; use 'cpu', 'cuda' or 'mps'")
    return dev


# ----------------------------------------------------------------------------- vocabularies


def check_same_tokenizer(*tokenizers) -> None:
    """Raise TokenizerMismatchError unless every tokenizer maps the same strings to the same ids."""
    ref = tokenizers[0].get_vocab()
    for i, tok in enumerate(tokenizers[1:], start=1):
        vocab = tok.get_vocab()
        if vocab == ref:
            continue
        diff = sorted(set(vocab.items()) ^ set(ref.items()), key=lambda kv: kv[1])[:3]
        raise TokenizerMismatchError(
            f"the models must share one tokenizer: tokenizer {i} ({getattr(tok, 'name_or_path', '?')}, "
            f"{len(vocab)} tokens) differs from tokenizer 0 ({getattr(tokenizers[0], 'name_or_path', '?')}, "
            f"{len(ref)} tokens), e.g. {diff}. Use models of one family (same vocabulary)."
        )


def check_shared_vocabulary(sizes: dict[str, int | None], tokenizers=None, use: str = "this method",
                            allow_padding: bool = True) -> None:
    """Models that exchange token ids or logits share one vocabulary, checked as transformers'
    assisted generation does: equal vocabulary sizes are taken as one tokenizer; sizes that differ
    are refused unless `tokenizers` are given, are identical, and (`allow_padding`) the extra rows
    are padding beyond every id of that tokenizer. Given tokenizers are always compared.

    Args:
        sizes: {role: vocabulary size (logits per position)}, e.g. {"target": 49152, "draft": 49152}.
        tokenizers: optional tokenizers of the models, checked to be identical.
        use: what needs the shared vocabulary, for the message.
        allow_padding: accept sizes that differ by padding rows when the tokenizers agree.
    """
    listed = ", ".join(f"the {k} {v:,}" for k, v in sizes.items() if v is not None)
    known = {v for v in sizes.values() if v is not None}
    if tokenizers is not None:
        check_same_tokenizer(*tokenizers)
        need = max(tokenizers[0].get_vocab().values()) + 1
        if known and min(known) < need:
            raise VocabularyMismatchError(f"{use}: the tokenizer has ids up to {need - 1}, more than a model's "
                                          f"vocabulary holds ({listed} tokens)")
    if len(known) > 1 and (tokenizers is None or not allow_padding):
        how = ("models of one family, or pass their tokenizers to confirm one tokenizer with padded vocabularies"
               if allow_padding else "models of one family and one vocabulary size (transformers' "
               "generate(assistant_model=..., tokenizer=..., assistant_tokenizer=...) translates between two tokenizers)")
        raise VocabularyMismatchError(f"{use} needs one vocabulary, but the models' vocabulary sizes differ "
                                      f"({listed} tokens); use {how}")


# ----------------------------------------------------------------------------- names and files


def check_plain_name(name, what: str = "name") -> str:
    """A plain file or folder name (no separators, not hidden, not '.' or '..'), or ValueError."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a non-empty file name, got {name!r}")
    if "/" in name or "\\" in name or "\0" in name or name.startswith((".", "~")) or name != name.strip():
        raise ValueError(f"{what} must be a plain name inside the output folder (no '/', '\\', leading '.' or "
                         f"'~', or surrounding spaces), got {name!r}")
    return name


def check_not_quantized(model: nn.Module, what: str = "quantization") -> None:
    """Refuse a model whose block linears are already quantized (packed codes or W8A8), or that a
    quantized checkpoint configures (`quantization_config`)."""
    from .quant.smoothquant import W8A8Linear

    done = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "dequantized_weight") or isinstance(m, W8A8Linear)})
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if done or qc is not None:
        method = qc.get("quant_method", qc) if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        kind = ", ".join(done) if done else f"quantization_config {str(method)!r}"
        raise ValueError(f"{what}: this model is already quantized ({kind}); quantize the float model it came from")


def load_yaml(text: str, what: str = "YAML"):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(f"{what}: key {key!r} is given twice in one mapping (lines {seen[key] + 1} and "
                                 f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=Loader)
