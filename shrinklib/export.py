"""Export a compressed model to the tools users deploy with, and check every export by reloading it.

Two targets:
    safetensors  an ordinary `transformers` folder (config.json + model.safetensors + tokenizer):
                 quantized linears written as their dequantized float weights (any tool loads
                 them), or `packed=True` for shrinklib's packed-codes checkpoint
                 (`shrinklib.quant.save_quantized`); structurally pruned models carry their
                 smaller config.
    GGUF         llama.cpp's single-file format, written here with `gguf.GGUFWriter` for the
                 Llama architecture: F32, F16, Q8_0 (a lossy rounding done on export), and
                 Q4_0 / Q4_1 only when the weights already sit on that grid (llama.cpp's blocks
                 of 32 inputs: Q4_0 w = d·(q − 8), Q4_1 w = d·q + m, d and m stored as float16).
                 A model quantized by RTN/GPTQ/AWQ to ≤ 4 bits with groups that are multiples of
                 32 fits Q4_1 (asymmetric or symmetric) or Q4_0 (symmetric); anything else is
                 refused with a message saying what to do.

Every export is reloaded (GGUF through `AutoModelForCausalLM.from_pretrained(folder,
gguf_file=...)`) and its logits compared with the model before export: `ExportReport` holds
the error and the tolerance it was held to.

Exports never destroy a user's files: a target that exists is replaced only when it is a
previous export of the suite (a folder holding `shrinklib.io.MARKER`, a GGUF file carrying the
`MARKER_KEY` metadata) or when the caller passes `overwrite=True`; everything is written under a
temporary name and renamed at the end, and temporaries left by a killed export are removed by
the next export into that folder (`shrinklib.io`).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .checks import check_token_ids
from .evaluate import folder_size_bytes
from .io import atomic_path, check_file_target, staged_folder
from .models import drop_gguf_quantizer

GGUF_FORMATS = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
K_FORMATS = ("Q4_K", "Q6_K")  # llama.cpp's k-quants, encoded by shrinklib.kquants with an importance matrix
QK = 32  # llama.cpp's block length (inputs per block) for Q4_0, Q4_1 and Q8_0

# Largest accepted max|Δlogit| / max|logit| after reloading. F32 and grid-exact exports must
# reproduce the logits exactly (tolerance 0, see `ExportReport.exact`); float16 storage (of
# weights, or of Q4 block constants) rounds each weight by up to 2⁻¹¹ relative; Q8_0 rounds
# each weight by up to half a step of an 8-bit absmax grid per block of 32.
TOLERANCE = {"F32": 0.0, "F16": 1e-2, "Q8_0": 5e-2, "Q4_0": 1e-2, "Q4_1": 1e-2, "safetensors": 0.0, "compressed-tensors": 0.0}

LLAMA_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K": 14, "Q6_K": 18}  # 14: Q4_K_S
MARKER_KEY = "shrinklib.export_version"  # GGUF metadata marking a file as the suite's export (it may be replaced)


class ExportError(ValueError):
    """The model cannot be written in the requested format (the message says why and what to do)."""


@dataclass
class ExportReport:
    """What was written, and how well it reloads."""

    format: str
    path: str
    size_bytes: int
    exact: bool  # every stored tensor dequantizes bit for bit to the model's weight
    max_abs_logit_diff: float | None = None
    rel_logit_diff: float | None = None  # max|Δlogit| / max|logit|
    top1_agreement: float | None = None
    tolerance: float | None = None
    ok: bool | None = None  # the reload met the tolerance (None: not checked)
    tokenizer_ok: bool | None = None  # the reloaded tokenizer encodes the test strings identically
    tensor_types: dict = field(default_factory=dict)  # GGUF type -> number of tensors
    float_rel_logit_diff: float | None = None  # k-quants: max|Δlogit| / max|logit| against the model itself

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- dense weights


def _quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that store their weight in another form (QuantLinear: packed codes) by name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "dequantized_weight")}


def linear_weight(module: nn.Module) -> Tensor:
    """The float weight (out, in) a linear-like module applies: nn.Linear, QuantLinear, W8A8Linear."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight().detach().float()
    return module.weight.detach().float()


def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every quantized linear replaced by its dequantized `weight`
    (and bias), as a plain `transformers` model of the same config expects it."""
    quant = _quantized_modules(model)
    state = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quant:
            continue
        state[key] = t.detach()
    for name, m in quant.items():
        state[f"{name}.weight"] = m.dequantized_weight().detach().float().contiguous()
        if getattr(m, "bias", None) is not None:
            state[f"{name}.bias"] = m.bias.detach()
    return state


def export_safetensors(model: nn.Module, folder: str | Path, tokenizer=None, packed: bool = False,
                       check: bool = True, check_ids: Tensor | None = None, overwrite: bool = False) -> ExportReport:
    """Save as a `transformers` folder (atomically) and check it by reloading.

    Args:
        packed: keep QuantLinear layers as packed codes (`shrinklib.quant.save_quantized`,
            reload with `load_quantized`); default: dequantized float weights that any
            `transformers` install loads with `from_pretrained`.
        check: reload and compare logits (exact equality is required).
        check_ids: (n, L) token ids for the comparison (default: 2 random sequences of 32).
        overwrite: replace an existing folder that is not a previous export of the suite
            (without it such a folder is refused and left untouched).
    """
    folder = Path(folder)
    was_quantized = bool(_quantized_modules(model))
    fmt = "safetensors-packed" if packed and was_quantized else "safetensors"
    if check_ids is not None:
        check_token_ids(check_ids, model, what="check_ids")

    def write(tmp: Path) -> None:
        if packed and was_quantized:
            from .quant import save_quantized

            save_quantized(model, tmp)
        else:
            drop_gguf_quantizer(model)
            model.save_pretrained(tmp, state_dict=dense_state_dict(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    with staged_folder(folder, overwrite, what="export folder", format=fmt) as tmp:
        write(tmp)
    report = ExportReport(fmt, str(folder), folder_size_bytes(folder), exact=True)
    if check:
        if packed and was_quantized:
            from .quant import load_quantized

            loaded = load_quantized(folder)
        else:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        _fill_check(report, model, loaded, check_ids, TOLERANCE["safetensors"])
    return report


# ----------------------------------------------------------------------------- compressed-tensors


CT_FORMAT = "pack-quantized"  # compressed-tensors' format for integer weights of 1-8 bits (llm-compressor's W4A16/W8A16)


def ct_codes(module: nn.Module, name: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """A QuantLinear's grid as compressed-tensors stores it: (weight_packed int32 (out, ceil(in·b/32)),
    weight_scale float32 (out, groups), weight_zero_point int8 (out, groups) or None for symmetric).

    compressed-tensors dequantizes w = s·(v − zp) with signed codes v in [−2^(b−1), 2^(b−1) − 1] and
    integer zero points, and packs u = v + 2^(b−1) densely, element i at bit i·b of each row's
    little-endian int32 stream. Our codes q = v + 2^(b−1) with zero z = zp + 2^(b−1): the same bits.
    """
    from .quant.qlinear import pack_codes

    q, scales, zeros = module.unpacked()  # (out, in) uint8, (out, G) float32, (out, G) float32
    out, d = q.shape
    g, bits = module.group_size, module.bits
    if module.fmt != "int":
        raise ExportError(f"{name}: {module.fmt} is a value table, not an integer grid; compressed-tensors' "
                          f"{CT_FORMAT} stores integer codes (export as safetensors or GGUF instead)")
    if d % g:
        raise ExportError(f"{name}: {d} inputs is not a multiple of the group size {g}; compressed-tensors' "
                          "group strategy needs whole groups (quantize with a group size dividing every input size)")
    zp = zeros - 2 ** (bits - 1)
    if not torch.equal(zp, zp.round()):
        raise ExportError(f"{name}: its zero points are not integers (an asymmetric min-max grid puts zero between "
                          "two codes, as llama.cpp's Q4_1 does); compressed-tensors stores integer zero points: "
                          "quantize with symmetric=True, or export as GGUF Q4_1 or safetensors")
    stream = pack_codes(q, bits)  # (out, ceil(d·b/8)) bytes: code i at stream bit i·b
    pad = (-stream.shape[1]) % 4
    words = torch.cat([stream, stream.new_zeros(out, pad)], 1).contiguous().view(torch.int32)  # little-endian
    words = words[:, : -(-d * bits // 32)].contiguous()
    symmetric = bool((zp == 0).all())
    return words, scales.float().contiguous(), None if symmetric else zp.to(torch.int8).contiguous()


def ct_quantization_config(groups: dict[tuple, list[str]]) -> dict:
    """config.json's `quantization_config` for compressed-tensors: one config group per (bits, group
    size, symmetric, per-channel) with its modules as exact-name targets; everything else is float."""
    import compressed_tensors

    config_groups = {}
    for i, ((bits, g, symmetric, channel), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": [f"re:^{re.escape(n)}$" for n in names], "format": CT_FORMAT,
            "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
                        "strategy": "channel" if channel else "group", "group_size": None if channel else g,
                        "observer": "minmax", "actorder": None},
            "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
            "version": compressed_tensors.__version__}


def export_compressed_tensors(model: nn.Module, folder: str | Path, tokenizer=None, check: bool = True,
                              check_ids: Tensor | None = None, overwrite: bool = False) -> ExportReport:
    """Save a model quantized by RTN/GPTQ/AWQ (integer grids, 1-8 bits) as a compressed-tensors checkpoint
    (the format llm-compressor writes and vLLM serves), atomically, and check it by reloading with
    `transformers` (which needs the `compressed-tensors` package). Float layers stay float.

    The stored codes and float32 scales dequantize to exactly our weights (w = s·(v − zp), with s
    float16-exact and v an integer, is one exact float32 product), so the reload must reproduce
    the logits bit for bit (tolerance 0).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if check_ids is not None:
        check_token_ids(check_ids, model, what="check_ids")
    quant = {n: m for n, m in _quantized_modules(model).items() if hasattr(m, "unpacked")}
    if not quant:
        raise ExportError("the model has no quantized linears: quantize it first (RTN, GPTQ or AWQ with "
                          "symmetric=True), or export it as safetensors")
    tensors, groups = {}, {}
    for name, m in quant.items():  # encode everything before touching the disk
        packed, scales, zp = ct_codes(m, name)
        tensors |= {f"{name}.weight_packed": packed, f"{name}.weight_scale": scales,
                    f"{name}.weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64)}
        if zp is not None:
            tensors[f"{name}.weight_zero_point"] = zp
        if getattr(m, "bias", None) is not None:
            tensors[f"{name}.bias"] = m.bias.detach().float().contiguous()
        groups.setdefault((m.bits, m.group_size, zp is None, m.group_size == m.in_features), []).append(name)
    state = dense_state_dict(model)
    for name in quant:
        state.pop(f"{name}.weight")
        state.pop(f"{name}.bias", None)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        state = {k: v for k, v in state.items() if v.data_ptr() != embed.weight.data_ptr() or "embed" in k}
    tensors |= {k: v.contiguous() for k, v in state.items()}
    config = model.config.to_dict() | {"quantization_config": ct_quantization_config(groups)}
    config.pop("slicegpt", None)

    with staged_folder(folder, overwrite, what="export folder", format="compressed-tensors") as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    report = ExportReport("compressed-tensors", str(folder), folder_size_bytes(folder), exact=True)
    if check:
        _fill_check(report, model, load_compressed_tensors(folder), check_ids, TOLERANCE["compressed-tensors"])
    return report


def load_compressed_tensors(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A compressed-tensors checkpoint loaded by transformers, the `compressed-tensors` package
    dequantizing the packed weights as they load (`CompressedTensorsConfig(dequantize=True)`), in eval mode."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from .models import _quiet_loading

    bars = io.StringIO()  # compressed-tensors' own per-step bars (on stderr): a reload needs none
    with _quiet_loading(), contextlib.redirect_stderr(bars), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")  # dequantize is ours to choose
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    return model.eval()


# ----------------------------------------------------------------------------- GGUF blocks


def permute_rope_rows(n_rows: int, n_head: int) -> Tensor:
    """Row order llama.cpp stores q_proj/k_proj in: within each head, the rotary pairs
    (i, i + d/2) of Hugging Face's rotate-half layout become adjacent rows (2i, 2i + 1)."""
    half = n_rows // n_head // 2
    idx = torch.arange(n_rows).reshape(n_head, 2, half)  # (head, pair member, i)
    return idx.transpose(1, 2).reshape(-1)  # stored row 2i+j of a head is HF row j·half + i


def _f16(x: Tensor) -> np.ndarray:
    return x.float().cpu().numpy().astype(np.float16)


def _pack_nibbles(q: Tensor) -> np.ndarray:
    """Codes (out, in) in 0..15 → llama.cpp's Q4 nibbles (out, n_blocks, 16): byte j of a block
    holds code j in its low nibble and code j + 16 in its high nibble."""
    out, d = q.shape
    qb = q.to(torch.uint8).reshape(out, d // QK, QK).cpu().numpy()
    return qb[..., : QK // 2] | (qb[..., QK // 2 :] << np.uint8(4))


def q4_blocks(q: Tensor, d: Tensor, m: Tensor | None) -> np.ndarray:
    """Raw Q4_0 (m None) or Q4_1 bytes (out, n_blocks · (18 or 20)) from codes q (out, in) in
    0..15 and per-block constants d, m (out, n_blocks): w = d·(q − 8) or w = d·q + m."""
    out, nb = d.shape
    parts = [_f16(d).view(np.uint8).reshape(out, nb, 2)]
    if m is not None:
        parts.append(_f16(m).view(np.uint8).reshape(out, nb, 2))
    parts.append(_pack_nibbles(q))
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def q4_from_codes(module: nn.Module, kind: str) -> np.ndarray | None:
    """Q4 blocks straight from a QuantLinear's codes, or None if its grid does not fit `kind`.

    A group of g inputs shares (s, z): W = s·(q − z). With g a multiple of 32, each block of 32
    lies in one group, so Q4_1 stores d = s, m = −s·z and the same codes (any bits ≤ 4), and
    Q4_0 stores d = s and codes q − z + 8 when z is an integer (symmetric grids).
    """
    if not hasattr(module, "unpacked"):
        return None
    q, s, z = module.unpacked()  # (out, in) uint8, (out, G), (out, G)
    g = module.group_size
    if g % QK or module.in_features % QK or module.bits > 4:
        return None
    s_b = s.repeat_interleave(g // QK, dim=1)[:, : module.in_features // QK]  # (out, n_blocks)
    z_b = z.repeat_interleave(g // QK, dim=1)[:, : module.in_features // QK]
    if kind == "Q4_1":
        return q4_blocks(q, s_b, -s_b * z_b)
    if not torch.equal(z_b, z_b.round()):
        return None
    q0 = q.float() - z_b.repeat_interleave(QK, dim=1) + 8  # (out, in)
    if q0.min() < 0 or q0.max() > 15:
        return None
    return q4_blocks(q0.to(torch.uint8), s_b, None)


def _gguf_type(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def encode_tensor(W: Tensor, kind: str, module: nn.Module | None = None, name: str = "") -> tuple[np.ndarray, str, bool]:
    """Encode a weight (out, in) as GGUF `kind`; returns (array, stored kind, lossless).

    Q4_0/Q4_1 are refused (ExportError) unless W sits on the grid: every block reproduces W
    up to the float16 rounding of its constants. Q8_0 of a row whose length is not a multiple
    of 32 falls back to F16, as llama.cpp does.
    """
    from gguf import quants

    W = W.detach().float().cpu()
    if kind == "F32" or W.dim() == 1:
        return W.numpy(), "F32", True
    if kind == "F16":
        arr = W.numpy().astype(np.float16)
        return arr, "F16", bool(np.array_equal(arr.astype(np.float32), W.numpy()))
    if kind == "Q8_0" and W.shape[-1] % QK:
        return encode_tensor(W, "F16", module, name)
    if kind in ("Q4_0", "Q4_1") and W.shape[-1] % QK:
        raise ExportError(f"{name}: {W.shape[-1]} inputs is not a multiple of {QK}, which {kind} blocks need; "
                          "export as F16 or F32")
    raw = q4_from_codes(module, kind) if module is not None and kind.startswith("Q4") else None
    if raw is None:
        raw = quants.quantize(W.numpy(), _gguf_type(kind))  # llama.cpp's reference rounding
    back = torch.from_numpy(quants.dequantize(raw, _gguf_type(kind)).reshape(W.shape).copy())
    lossless = torch.equal(back, W)
    if kind.startswith("Q4") and not lossless:
        err = (back - W).abs().reshape(W.shape[0], -1, QK)  # (out, n_blocks, 32)
        blocks = W.reshape(W.shape[0], -1, QK)
        step = (blocks.amax(-1) - blocks.amin(-1)) / 15  # (out, n_blocks): d of a 16-level grid
        bound = 2.0**-10 * (blocks.abs().amax(-1) + 15 * step) + 1e-12  # float16 rounding of d and m
        worst = (err.amax(-1) / bound).max().item()
        if worst > 1:
            raise ExportError(
                f"{name}: weights are not on the {kind} grid (max error {err.max().item():.3g}, {worst:.0f}× what "
                f"float16 block constants explain). {kind} stores blocks of {QK} inputs "
                f"({'symmetric, w = d·(q−8)' if kind == 'Q4_0' else 'asymmetric, w = d·q + m'}): quantize first with "
                f"RTN/GPTQ/AWQ at ≤ 4 bits and a group size that is a multiple of {QK}"
                f"{' and symmetric=True' if kind == 'Q4_0' else ''}, or export as Q8_0 / F16."
            )
    return raw, kind, lossless


# ----------------------------------------------------------------------------- GGUF metadata


def check_llama_exportable(model: nn.Module) -> None:
    """Raise ExportError unless the model is a plain Llama decoder GGUF's `llama` arch describes."""
    from .arch import require

    require(model, "gguf", "GGUF export")
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ExportError(f"GGUF export supports the Llama architecture; this model is '{cfg.model_type}'. "
                          "Save it with export_safetensors and convert with llama.cpp's convert_hf_to_gguf.py.")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise ExportError(f"GGUF 'llama' has no {flag}; this config sets it")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"GGUF 'llama' uses SiLU; this config has hidden_act={cfg.hidden_act!r}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ExportError(f"rope scaling {rope.get('rope_type')!r} is not written by this exporter; only default RoPE")
    from .arch import blocks, layout, linear_layers

    want = None
    roles = layout(model).roles()
    for i, block in enumerate(blocks(model)):
        shapes = {k: (m.out_features, m.in_features) for k, m in linear_layers(block).items()}
        extra = sorted(set(shapes) - set(roles))
        if type(block).__name__ != "LlamaDecoderLayer" or extra:
            raise ExportError(f"block {i} is a {type(block).__name__} with linears {extra} that a Llama block does not "
                              "have (e.g. SliceGPT's shortcuts): save it with that method's own save function")
        if want is None:
            want = shapes
        elif shapes != want:
            raise ExportError(f"block {i} has linear shapes {shapes}, block 0 has {want}: GGUF 'llama' needs "
                              "every block the same shape (per-layer structured pruning cannot be exported)")


def _pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, from its pre-tokenizer."""
    pre = json.dumps(tok_json.get("pre_tokenizer") or {})
    if '"Digits"' in pre and '"individual_digits": true' in pre:
        return "smollm"
    if '"Split"' in pre:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if json.dumps(regex)[1:-1] in pre:
                return name
    return "gpt-2"  # llama.cpp's name for GPT-2's own split (it refuses "gpt2")


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """GGUF `tokenizer.*` keys for a byte-level BPE tokenizer (GPT-2 style: SmolLM2, Llama-3, Qwen2).

    Sentencepiece-style tokenizers (TinyLlama, Llama-2) are refused: write the GGUF without a
    tokenizer and let llama.cpp's converter add it.
    """
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    model = tj.get("model", {})
    byte_level = "ByteLevel" in json.dumps(tj.get("pre_tokenizer")) or "ByteLevel" in json.dumps(tj.get("decoder"))
    if model.get("type") != "BPE" or not byte_level:
        raise ExportError("only byte-level BPE tokenizers are written to GGUF here; pass tokenizer=None")
    vocab = tokenizer.get_vocab()
    tokens = [None] * max(vocab_size, max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    types = [1] * len(tokens)  # NORMAL
    for added in tj.get("added_tokens", []):
        types[added["id"]] = 3 if added.get("special") else 4  # CONTROL, USER_DEFINED
    for i, t in enumerate(tokens):
        if t.startswith("[PAD") and i not in vocab.values():
            types[i] = 5  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(tj),
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": bool(getattr(tokenizer, "add_bos_token", False)),
            "tokenizer.ggml.add_space_prefix": False}
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        if getattr(tokenizer, attr, None) is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(getattr(tokenizer, attr))
    if getattr(tokenizer, "chat_template", None):
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _add_meta(writer, key: str, value) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], int):
        writer.add_array(key, value)  # int32 array (token types)
    else:
        writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)


def llama_metadata(config, name: str, fmt: str) -> dict:
    """`general.*` and `llama.*` keys for a Llama config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    name = name.replace("mistral", "mstrl")  # transformers reads 'mistral' in a llama file's name as Mistral
    return {
        "general.name": name, "general.type": "model", "general.file_type": LLAMA_FILE_TYPE[fmt],
        "general.quantization_version": 2,
        "llama.vocab_size": config.vocab_size, "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size, "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size, "llama.rope.dimension_count": head_dim,
        "llama.attention.key_length": head_dim, "llama.attention.value_length": head_dim,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.freq_base": float(theta), "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
    }


# ----------------------------------------------------------------------------- GGUF export


def encode_k(W: Tensor, kind: str, imatrix: Tensor | None = None, name: str = "") -> tuple[np.ndarray, str, bool, Tensor]:
    """A weight (out, in) as a k-quant (Q4_K, Q6_K; `shrinklib.kquants`): (array, stored kind, lossless,
    the float32 weight the array decodes to). Rows that are not a multiple of 256 weights fall back
    to Q8_0, as llama.cpp falls back for them."""
    from .kquants import QK_K, quantize_k

    W = W.detach().float().cpu()
    if W.shape[1] % QK_K:
        raw, stored, lossless = encode_tensor(W, "Q8_0", None, name)
        from gguf import quants

        return raw, stored, lossless, torch.from_numpy(quants.dequantize(raw, _gguf_type(stored)).reshape(W.shape).copy())
    raw, back = quantize_k(W, kind, imatrix)
    return raw, kind, torch.equal(back, W), back


def gguf_tensors(model: nn.Module, fmt: str, embed_type: str | None = None, imatrix: dict[str, Tensor] | None = None,
                 decoded: dict[str, Tensor] | None = None):
    """Yield (gguf name, array, stored kind, lossless) for every tensor of a Llama model in `fmt`.

    Norms stay F32; block linears take `fmt`; the token embedding and an untied output take
    `embed_type` (default: F32/F16 as the format, Q8_0 for the quantized formats).

    Args:
        imatrix: module name -> (in,) importance of each input column, for the k-quants.
        decoded: filled with module name -> the float32 weight a k-quant tensor decodes to.
    """
    from gguf import MODEL_ARCH, get_tensor_name_map

    cfg = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    embed_type = embed_type or (fmt if fmt in ("F32", "F16") else "Q8_0")
    quant = _quantized_modules(model)
    modules = {n: m for n, m in model.named_modules()}
    keys = [k for k in dense_state_dict(model) if k.endswith(".weight")]
    for key in keys:
        mod_name = key[: -len(".weight")]
        gname = names.get_name(mod_name)
        if gname is None:
            raise ExportError(f"no GGUF name for tensor {key}")
        module = modules[mod_name]
        W = linear_weight(module) if mod_name in quant or isinstance(module, nn.Linear) else module.weight.detach().float()
        if gname == "output" and getattr(cfg, "tie_word_embeddings", False):
            continue  # tied lm_head: llama.cpp reuses token_embd when output.weight is absent
        kind = "F32" if W.dim() == 1 else embed_type if gname in ("token_embd", "output") else fmt
        if gname.endswith(("attn_q", "attn_k")):
            n_head = cfg.num_attention_heads if gname.endswith("attn_q") else cfg.num_key_value_heads
            perm = permute_rope_rows(W.shape[0], n_head)
            W = W[perm]
            module = _RowPermuted(module, perm) if mod_name in quant else None
        elif mod_name not in quant:
            module = None
        if kind in K_FORMATS:
            arr, stored, lossless, back = encode_k(W, kind, (imatrix or {}).get(mod_name), key)
            if decoded is not None:
                unperm = torch.argsort(perm) if gname.endswith(("attn_q", "attn_k")) else slice(None)
                decoded[mod_name] = back[unperm]
        else:
            arr, stored, lossless = encode_tensor(W, kind, module, key)
            if decoded is not None and not lossless and fmt in K_FORMATS:  # e.g. a Q8_0 embedding beside them
                from gguf import quants

                back = torch.from_numpy(np.asarray(quants.dequantize(arr, _gguf_type(stored)), dtype=np.float32)
                                        .reshape(W.shape).copy()) if arr.dtype == np.uint8 else torch.from_numpy(arr.astype(np.float32))
                decoded[mod_name] = back[torch.argsort(perm)] if gname.endswith(("attn_q", "attn_k")) else back
        yield f"{gname}.weight", arr, stored, lossless


class _RowPermuted:
    """A QuantLinear seen with its output rows permuted (q/k for llama.cpp's RoPE layout)."""

    def __init__(self, module: nn.Module, perm: Tensor):
        self.m, self.perm = module, perm
        self.group_size, self.in_features, self.bits = module.group_size, module.in_features, module.bits

    def unpacked(self):
        q, s, z = self.m.unpacked()
        return q[self.perm], s[self.perm], z[self.perm]


def is_suite_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file this module wrote (it carries the `MARKER_KEY` metadata)."""
    from gguf import GGUFReader

    try:
        return MARKER_KEY in GGUFReader(str(path)).fields
    except Exception:  # not a GGUF file, or a truncated one: not ours
        return False


def check_gguf_options(fmt: str, embed_type: str | None = None) -> None:
    """A GGUF format this module writes, and an embedding storage of F32, F16 or Q8_0 (or None: by format)."""
    if fmt not in GGUF_FORMATS:
        raise ExportError(f"unknown GGUF format {fmt!r}; use one of {GGUF_FORMATS}")
    if embed_type is not None and embed_type not in GGUF_FORMATS[:3]:
        raise ExportError(f"embed_type must be one of {GGUF_FORMATS[:3]} or null (by format), got {embed_type!r}")


def export_gguf(model: nn.Module, path: str | Path, tokenizer=None, fmt: str = "F16", embed_type: str | None = None,
                check: bool = True, check_ids: Tensor | None = None, name: str | None = None,
                overwrite: bool = False, imatrix: dict[str, Tensor] | None = None) -> ExportReport:
    """Write a Llama model to one GGUF file (atomically) and check it by reloading with transformers.

    Args:
        fmt: "F32", "F16", "Q8_0", "Q4_0", "Q4_1" for the block linears (see the module docstring),
            or the k-quants "Q4_K", "Q6_K" (encoded here; rows not a multiple of 256 fall back to
            Q8_0). A k-quant export is checked against the model with the weights it stores: the
            reload must reproduce those logits exactly; the difference to the model itself is
            reported in `float_rel_logit_diff`.
        imatrix: module name -> (in,) input importance (`shrinklib.kquants.importance_matrix`), for the k-quants.
        tokenizer: a byte-level BPE tokenizer to embed (None: no tokenizer in the file).
        embed_type: storage of the token embedding and untied output (default by format).
        check: reload the file and compare logits with the model (`TOLERANCE`; 0 when exact).
        overwrite: replace an existing file that is not a GGUF export of the suite (without it
            such a file is refused and left untouched).
    """
    from gguf import GGUFWriter

    check_gguf_options(fmt, embed_type)
    path = Path(path)
    check_llama_exportable(model)
    check_file_target(path, overwrite, ours=path.is_file() and is_suite_gguf(path), what="GGUF file")
    if check_ids is not None:
        check_token_ids(check_ids, model, what="check_ids")
    meta = llama_metadata(model.config, name or path.stem, fmt) | {MARKER_KEY: 1}
    if tokenizer is not None:
        meta |= tokenizer_metadata(tokenizer, model.config.vocab_size)
    decoded: dict[str, Tensor] = {}
    tensors = list(gguf_tensors(model, fmt, embed_type, imatrix, decoded))  # encode everything before touching the disk
    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), "llama")
        for key, value in meta.items():
            _add_meta(writer, key, value)
        for gname, arr, stored, _ in tensors:
            writer.add_tensor(gname, arr, raw_dtype=_gguf_type(stored) if arr.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    types: dict[str, int] = {}
    for _, _, stored, _ in tensors:
        types[stored] = types.get(stored, 0) + 1
    exact = all(lossless for *_, lossless in tensors)
    report = ExportReport(fmt, str(path), path.stat().st_size, exact, tensor_types=types)
    if check:
        loaded = load_gguf(path)
        if fmt in K_FORMATS:  # held to the weights it stores, exactly
            ids = default_check_ids(model) if check_ids is None else check_ids
            report.float_rel_logit_diff = compare_logits(model, loaded, ids)["rel_logit_diff"]
            _fill_check(report, with_weights(model, decoded), loaded, check_ids, 0.0)
        else:
            _fill_check(report, model, loaded, check_ids, 0.0 if exact else TOLERANCE[fmt])
        if tokenizer is not None:
            report.tokenizer_ok = tokenizers_agree(tokenizer, load_gguf_tokenizer(path))
            report.ok = report.ok and report.tokenizer_ok
    return report


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A GGUF file loaded (dequantized) by transformers, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    import transformers.modeling_gguf_pytorch_utils as legacy

    path = Path(path)
    was, bar = logging.is_progress_bar_enabled(), getattr(legacy, "tqdm", None)
    logging.disable_progress_bar()
    legacy.tqdm = lambda it, **kw: it  # the GGUF reader's per-tensor bar: a reload needs none
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    finally:
        legacy.tqdm = bar
        if was:
            logging.enable_progress_bar()
    return model.eval()


def load_gguf_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


TOKENIZER_PROBES = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Größe: 12345 tokens, naïve café — 東京 🚀",
    "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n",
    "   leading spaces and\ttabs\n\n",
]


def tokenizers_agree(a, b, texts: list[str] = TOKENIZER_PROBES) -> bool:
    """Both tokenizers give the same ids for every probe text."""
    return all(a(t)["input_ids"] == b(t)["input_ids"] for t in texts)


@torch.no_grad()
def compare_logits(ref: nn.Module, other: nn.Module, ids: Tensor) -> dict:
    """max|Δlogit|, its ratio to max|logit|, and top-1 agreement of two models on (n, L) ids."""
    a = ref(ids.to(next(ref.parameters()).device), use_cache=False).logits.float().cpu()
    b = other(ids.to(next(other.parameters()).device), use_cache=False).logits.float().cpu()
    diff = (a - b).abs().max().item()
    return {"max_abs_logit_diff": diff, "rel_logit_diff": diff / max(a.abs().max().item(), 1e-12),
            "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def with_weights(model: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A copy of the model whose linears named in `weights` are float nn.Linear with those weights."""
    import copy

    from .arch import set_module

    ref = copy.deepcopy(model)
    for name, W in weights.items():
        old = ref.get_submodule(name)
        if isinstance(old, nn.Embedding):
            old.weight.data.copy_(W)
            continue
        lin = nn.Linear(W.shape[1], W.shape[0], bias=getattr(old, "bias", None) is not None)
        lin.weight.data.copy_(W)
        if lin.bias is not None:
            lin.bias.data.copy_(old.bias.detach().float())
        set_module(ref, name, lin)
    return ref.eval()


def default_check_ids(model: nn.Module, n: int = 2, length: int = 32, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, length), generator=g)


def _fill_check(report: ExportReport, model: nn.Module, loaded: nn.Module, ids: Tensor | None, tol: float) -> None:
    ids = default_check_ids(model) if ids is None else ids
    for k, v in compare_logits(model, loaded, ids).items():
        setattr(report, k, v)
    report.tolerance = tol
    report.ok = report.rel_logit_diff <= tol


def export(model: nn.Module, out: str | Path, fmt: str, tokenizer=None, **kw) -> ExportReport:
    """One entry point: fmt "safetensors", "safetensors-packed", "compressed-tensors", or a GGUF format (file `out`).
    An existing target is replaced only when it is a previous export of the suite, or with
    `overwrite=True`."""
    if fmt == "safetensors":
        return export_safetensors(model, out, tokenizer, packed=False, **kw)
    if fmt == "safetensors-packed":
        return export_safetensors(model, out, tokenizer, packed=True, **kw)
    if fmt == "compressed-tensors":
        return export_compressed_tensors(model, out, tokenizer, **kw)
    return export_gguf(model, out, tokenizer, fmt, **kw)
