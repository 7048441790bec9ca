"""Parameter and memory accounting of real model configs, built on the `meta` device
(shapes only, no weights, no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .arch import head_dim, kv_heads, param_kind


@dataclass(frozen=True)
class Published:
    """A model's published configuration values and parameter totals."""

    name: str
    model_type: str
    config: dict
    total: float  # published total parameters
    active: float | None  # published parameters used per token (MoE), else None
    source: str


PUBLISHED = {
    "TinyLlama-1.1B": Published(
        "TinyLlama-1.1B", "llama",
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
        1.1e9, None, "Zhang et al. 2024, TinyLlama, abstract (1.1B); config of TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    ),
    "Llama-3.1-8B": Published(
        "Llama-3.1-8B", "llama",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
        8.03e9, None, "Llama 3 Herd of Models, Dubey et al. 2024; model card of meta-llama/Llama-3.1-8B (8.03B)",
    ),
    "Llama-3.1-Minitron-4B-Width": Published(
        "Llama-3.1-Minitron-4B-Width", "llama",
        dict(hidden_size=3072, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
        4.5e9, None, "Sreenivas et al. 2024, LLM Pruning and Distillation in Practice: the Minitron Approach, Table 1 (4.5B)",
    ),
    "Mixtral-8x7B": Published(
        "Mixtral-8x7B", "mixtral",
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2,
             tie_word_embeddings=False),
        46.7e9, 12.9e9, "Mistral AI, Mixtral of experts release post, Dec 2023 (46.7B total, 12.9B active per token); Jiang et al. 2024 round to 47B / 13B",
    ),
}


def build_on_meta(config: PretrainedConfig) -> torch.nn.Module:
    """A causal LM of this config with all tensors on the meta device (no memory used)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def config_of(p: Published) -> PretrainedConfig:
    """A transformers config from published values."""
    return AutoConfig.for_model(p.model_type, **p.config)


def kind_of(name: str) -> str:
    """Which part of the network a parameter belongs to, from its name (`shrinklib.arch.param_kind`)."""
    return param_kind(name)


def param_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameters by kind (embedding, attention, mlp, experts, norm, lm_head); tied weights once."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        out[kind_of(name)] = out.get(kind_of(name), 0) + p.numel()
    return out


def active_params(breakdown: dict[str, int], config: PretrainedConfig) -> int:
    """Parameters used per token: all but the unrouted experts (top-k of E)."""
    experts = breakdown.get("experts", 0)
    E = getattr(config, "num_local_experts", 1)
    k = getattr(config, "num_experts_per_tok", E)
    return sum(breakdown.values()) - experts + experts * k // E


def kv_cache_bytes(config: PretrainedConfig, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes of the KV cache: 2 (K and V) × layers × KV heads × head dim × tokens × batch × bytes."""
    return 2 * config.num_hidden_layers * kv_heads(config) * head_dim(config) * tokens * batch * bytes_per_value
