"""KV-cache quantization: int8/int4/int2 keys and values, per token or per channel, with a recent
window kept in float (KIVI, Liu et al. 2024, https://arxiv.org/abs/2402.02750).

Keys and values of one layer are tensors (batch, kv_heads, tokens, head_dim). A quantized cache
stores them on the suite's one integer grid (`shrinklib.quant.formats`: float16 scale s and s·z
per group, codes packed to `bits` per value), grouped one of two ways:

- per token: each token's head_dim vector is cut into groups of `group` channels;
- per channel: each channel is cut into groups of `group` consecutive tokens (KIVI's keys, whose
  outlier channels then get their own scale instead of stretching every token's grid).

Tokens are quantized a block of `group` tokens at a time, once a block is at least `residual`
tokens old: the most recent `residual` to `residual + group - 1` tokens stay in float. A query at
position i therefore reads the keys and values of positions j < n_quantized(i) from the grid and
the rest in float, where n_quantized(i) = group · floor(max(i - residual, 0) / group) (`n_quantized`).

Two ways to run it, tested to agree:
- `KVQuantCache`, a `transformers` cache: `model.generate(..., past_key_values=KVQuantCache(config, spec))`.
  A prompt is attended in float (as a server's prefill) and stored quantized; each generated token
  then reads the quantized past.
- `kv_quantized_attention(model, spec)`, a context in which a plain forward pass gives every
  position exactly what the cache gives a token generated there (the quantized past beyond its
  float window): perplexity and KL divergence of a quantized cache over long windows in one pass.

Keys may be rotated first (`rotate_keys`): k → k·H before quantizing, read back as dequant(·)·Hᵀ, with
H the seeded randomized Hadamard transform of `shrinklib.quant.rotation` (orthogonal, (head_dim, head_dim)),
which spreads outlier channels over all channels (QuaRot).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from .arch import head_dim, kv_heads
from .checks import check_fields
from .kernels.pack import pack_planes, unpack_planes
from .quant.formats import dequantize_codes, int_params, quantize_codes
from .quant.rotation import random_hadamard

AXES = ("token", "channel")
FLOAT_BITS = 16  # `bits` of a cache that keeps everything in float (the model's dtype)


@dataclass(frozen=True)
class KVQuantConfig:
    """How a KV cache is quantized."""

    bits: int = 2  # 1-8: integer grid; 16: no quantization (the model's float dtype)
    key_axis: str = "channel"  # "channel" (KIVI's keys) or "token"
    value_axis: str = "token"  # "token" (KIVI's values) or "channel"
    group: int = 32  # tokens per group (per channel) or channels per group (per token); also the flush block
    residual: int = 32  # the most recent tokens always kept in float (0: quantize as soon as a block is full)
    rotate_keys: bool = False  # rotate keys by an orthogonal matrix before quantizing them
    rotation_seed: int = 0  # seed of that rotation

    def __post_init__(self):
        check_fields(self)
        if not (1 <= self.bits <= 8 or self.bits == FLOAT_BITS):
            raise ValueError(f"KVQuantConfig: bits must be 1-8 (an integer grid) or {FLOAT_BITS} (float), got {self.bits}")
        for name in ("key_axis", "value_axis"):
            if getattr(self, name) not in AXES:
                raise ValueError(f"KVQuantConfig: {name} must be one of {AXES}, got {getattr(self, name)!r}")
        if self.group < 1 or self.residual < 0:
            raise ValueError(f"KVQuantConfig: group must be ≥ 1 and residual ≥ 0, got {self.group} and {self.residual}")

    @property
    def quantized(self) -> bool:
        return self.bits != FLOAT_BITS


# ----------------------------------------------------------------------------- quantizers (pure functions)


def _rows(x: Tensor, axis: str) -> Tensor:
    """(b, h, t, d) → the 2-D matrix whose rows are quantized in groups: (b·h·t, d) per token, (b·h·d, t) per channel."""
    return x.reshape(-1, x.shape[-1]) if axis == "token" else x.transpose(-1, -2).reshape(-1, x.shape[-2])


def _unrows(W: Tensor, shape: torch.Size, axis: str) -> Tensor:
    """Inverse of `_rows`."""
    if axis == "token":
        return W.reshape(shape)
    b, h, t, d = shape
    return W.reshape(b, h, d, t).transpose(-1, -2)


def quantize_kv(x: Tensor, bits: int, axis: str, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-point (min-max) codes of keys or values x (b, h, t, d), grouped per token or per channel.

    Returns (q uint8 rows, s, z float32 (rows, n_groups)) of the matrix `_rows(x, axis)`: `group`
    channels of a token (per token) or `group` tokens of a channel (per channel); a group larger
    than the axis is the whole axis, a short last group is simply shorter. s and s·z are float16 values.
    """
    if axis not in AXES:
        raise ValueError(f"quantize_kv: axis must be one of {AXES}, got {axis!r}")
    W = _rows(x.float(), axis)  # (rows, n)
    g = min(group, W.shape[1])
    s, z = int_params(W, bits, g, symmetric=False)  # (rows, ceil(n / g))
    return quantize_codes(W, s, z, bits, g), s, z


def fake_quantize_kv(x: Tensor, bits: int, axis: str, group: int) -> Tensor:
    """x (b, h, t, d) read back from its grid (`quantize_kv`), in x's dtype."""
    q, s, z = quantize_kv(x, bits, axis, group)
    W = dequantize_codes(q, s, z, min(group, q.shape[1]))
    return _unrows(W, x.shape, axis).to(x.dtype)


def n_quantized(position: Tensor | int, residual: int, group: int) -> Tensor | int:
    """How many of the earliest tokens a query at `position` reads quantized: whole blocks of `group`
    tokens at least `residual` positions back, group · floor(max(position - residual, 0) / group)."""
    if isinstance(position, Tensor):
        return (position - residual).clamp_min(0) // group * group
    return max(position - residual, 0) // group * group


def quantize_keys_values(k: Tensor, v: Tensor, spec: KVQuantConfig, H: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Keys and values (b, h, t, d) as the quantized cache reads them back (keys rotated by H first, if given)."""
    kr = k if H is None else k @ H.to(k)
    kq = fake_quantize_kv(kr, spec.bits, spec.key_axis, spec.group)
    return (kq if H is None else kq @ H.to(k).T), fake_quantize_kv(v, spec.bits, spec.value_axis, spec.group)


# ----------------------------------------------------------------------------- attention over a quantized past


def kv_quantized_attention_forward(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float,
                                   spec: KVQuantConfig, H: Tensor | None = None) -> Tensor:
    """Causal attention in which query i reads positions j < n_quantized(i) from the quantized keys and
    values and the rest in float: what a token generated at position i sees through `KVQuantCache`.

    Args:
        query: (b, heads, t, d); key, value: (b, kv_heads, t, d), after RoPE (as cached).
        mask: additive (b, 1, t, t) mask or None (plain causal).
    Returns:
        (b, t, heads, d), the layout `transformers` attention functions return.
    """
    b, nh, t, d = query.shape
    if key.shape[-2] != t:
        raise ValueError(f"kv_quantized_attention: expected a forward without a cache (keys {key.shape[-2]} ≠ queries {t})")
    kq, vq = quantize_keys_values(key, value, spec, H)
    kvh = key.shape[1]
    q = query.reshape(b, kvh, nh // kvh * t, d)  # the query heads that share a KV head, side by side
    pos = torch.arange(t, device=query.device)
    from_grid = pos[None, :] < n_quantized(pos, spec.residual, spec.group)[:, None]  # (t_q, t_k): read quantized
    if mask is None:
        mask = torch.zeros(t, t, dtype=query.dtype, device=query.device).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    scores = (q @ key.transpose(-1, -2)).view(b, nh, t, t).masked_fill_(from_grid, 0)  # float keys
    scores += (q @ kq.transpose(-1, -2)).view(b, nh, t, t).masked_fill_(~from_grid, 0)  # quantized keys
    p = F.softmax(scores.mul_(scaling).add_(mask), dim=-1)  # (b, nh, t, t)
    out = p.view(b, kvh, -1, t) @ value + p.masked_fill_(~from_grid, 0).view(b, kvh, -1, t) @ (vq - value)
    return out.view(b, nh, t, d).transpose(1, 2).contiguous()


def _key_rotation(spec: KVQuantConfig, d: int) -> Tensor | None:
    """The keys' rotation: the seeded randomized Hadamard transform of notebook 13 (orthogonal), or None."""
    return random_hadamard(d, spec.rotation_seed) if spec.rotate_keys else None


@contextlib.contextmanager
def kv_quantized_attention(model: nn.Module, spec: KVQuantConfig):
    """Within the context, every attention layer of `model` attends as through a quantized cache
    (`kv_quantized_attention_forward`); forward passes must run without a cache (use_cache=False)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if not spec.quantized:  # a float cache is plain attention
        yield model
        return
    H = _key_rotation(spec, head_dim(model.config))

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        mask = None if attention_mask is None else attention_mask[..., : key.shape[-2]]
        return kv_quantized_attention_forward(query, key, value, mask, scaling, spec, H), None

    name = "shrinklib_kv_quant"
    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, eager_mask)
    configs = [c for c in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values()]
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield model
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl


# ----------------------------------------------------------------------------- the cache


@dataclass
class PackedBlock:
    """One block of keys or values (b, h, t, d) as stored: codes packed to `bits` each, float16 s and s·z."""

    packed: Tensor  # uint8 (1, ceil(n / 32) · 32 · bits / 8), n = b·h·t·d codes of `_rows` order
    scale: Tensor  # float16 (rows, n_groups)
    scale_zero: Tensor  # float16 (rows, n_groups): s·z
    shape: torch.Size
    bits: int
    axis: str
    group: int

    @classmethod
    def pack(cls, x: Tensor, bits: int, axis: str, group: int) -> PackedBlock:
        q, s, z = quantize_kv(x, bits, axis, group)
        flat = q.reshape(1, -1)
        flat = F.pad(flat, (0, -flat.shape[1] % 32))
        return cls(pack_planes(flat, bits), s.half(), (s * z).half(), x.shape, bits, axis, group)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        rows = _rows(torch.empty(self.shape, device="meta"), self.axis).shape  # (rows, n)
        q = unpack_planes(self.packed, self.bits)[0, : rows[0] * rows[1]].reshape(rows)
        s = self.scale.float()
        W = dequantize_codes(q, s, self.scale_zero.float() / s, min(self.group, rows[1]))
        return _unrows(W, self.shape, self.axis).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.scale_zero))


class KVQuantLayer(DynamicLayer):
    """One layer of `KVQuantCache`: quantized blocks of old tokens, the recent ones in float (`keys`, `values`)."""

    def __init__(self, spec: KVQuantConfig, H: Tensor | None = None):
        super().__init__()
        self.spec, self.H = spec, H
        self.k_blocks: list[PackedBlock] = []
        self.v_blocks: list[PackedBlock] = []
        self.cumulative_length = 0

    def _past(self) -> tuple[Tensor, Tensor]:
        """Everything stored, read back: dequantized blocks, then the float tokens. (b, h, t, d) each."""
        dt = self.keys.dtype
        k = [blk.dequantize(dt) for blk in self.k_blocks]
        if self.H is not None:
            k = [x @ self.H.to(x).T for x in k]
        v = [blk.dequantize(dt) for blk in self.v_blocks]
        return torch.cat([*k, self.keys], dim=-2), torch.cat([*v, self.values], dim=-2)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Return the past (as stored) followed by the new float keys and values, then store the new
        tokens and quantize every block that has left the float window."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k, past_v = self._past()
        keys, values = torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        if self.spec.quantized:
            self._flush()
        return keys, values

    def _flush(self) -> None:
        """Move whole blocks of `group` tokens older than the float window into the quantized store."""
        s, g = self.spec, self.spec.group
        stored = sum(blk.shape[-2] for blk in self.k_blocks)
        while stored + g <= n_quantized(self.cumulative_length, s.residual, g):
            k, v = self.keys[..., :g, :], self.values[..., :g, :]
            k = k if self.H is None else k @ self.H.to(k)
            self.k_blocks.append(PackedBlock.pack(k, s.bits, s.key_axis, g))
            self.v_blocks.append(PackedBlock.pack(v, s.bits, s.value_axis, g))
            self.keys, self.values = self.keys[..., g:, :].clone(), self.values[..., g:, :].clone()
            stored += g

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def nbytes(self) -> int:
        """Bytes held: packed codes, float16 scales and s·z, and the float window."""
        blocks = sum(blk.nbytes() for blk in self.k_blocks + self.v_blocks)
        floats = 0 if self.keys is None else sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return blocks + floats

    def reset(self) -> None:
        super().reset()
        self.k_blocks, self.v_blocks, self.cumulative_length = [], [], 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVQuantCache does not support beam search (its blocks are packed across the batch)")


class KVQuantCache(Cache):
    """A `transformers` cache that stores keys and values quantized (`KVQuantConfig`), one
    `KVQuantLayer` per decoder layer: `model.generate(ids, past_key_values=KVQuantCache(model.config, spec))`."""

    def __init__(self, config, spec: KVQuantConfig):
        config = config.get_text_config(decoder=True)
        H = _key_rotation(spec, head_dim(config)) if spec.quantized else None
        super().__init__(layers=[KVQuantLayer(spec, H) for _ in range(config.num_hidden_layers)])
        self.spec = spec

    def nbytes(self) -> int:
        """Bytes the cache holds now (every stored tensor, counted from the tensors themselves)."""
        return sum(layer.nbytes() for layer in self.layers)


def kv_quant_cache_bytes(config, tokens: int, spec: KVQuantConfig, batch: int = 1, float_bytes: int = 2) -> int:
    """Bytes of a `KVQuantCache` holding `tokens` tokens of `batch` sequences, from the config alone.

    The first n_quantized(tokens) tokens are stored in blocks of `group` tokens: per block and per K or
    V, b·h·g·d codes of `bits` packed in whole 32-code words (bits·4 bytes), and a float16 s and s·z
    per group; the other tokens are float (`float_bytes` per value: 2 for float16, 4 for float32).
    """
    config = config.get_text_config(decoder=True)
    L, h, d = config.num_hidden_layers, kv_heads(config), head_dim(config)
    nq = n_quantized(tokens, spec.residual, spec.group) if spec.quantized else 0
    floats = 2 * L * batch * h * d * (tokens - nq) * float_bytes
    if nq == 0:
        return floats
    g = spec.group
    codes = math.ceil(batch * h * g * d / 32) * 4 * spec.bits  # one block of K or V

    def grid_bytes(axis: str) -> int:  # float16 s and s·z of one block
        rows, n = (batch * h * g, d) if axis == "token" else (batch * h * d, g)
        return 2 * 2 * rows * math.ceil(n / min(g, n))

    per_block = 2 * codes + grid_bytes(spec.key_axis) + grid_bytes(spec.value_axis)
    return L * (nq // g) * per_block + floats
