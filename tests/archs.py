"""Tiny random decoders of every supported architecture, built from the real config classes of
the pinned transformers (hidden 32, 2 layers, vocabulary 128), for the architecture tests."""

from __future__ import annotations

import torch
from transformers import (GemmaConfig, Gemma2Config, LlamaConfig, MistralConfig, OPTConfig, Phi3Config, Qwen2Config, Qwen3Config,
                          AutoModelForCausalLM)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, **GQA, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**COMMON, **GQA, sliding_window=None, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**COMMON, **GQA, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, **GQA, tie_word_embeddings=True),
    "gemma": lambda: GemmaConfig(**COMMON, **GQA, tie_word_embeddings=True),
    "gemma2": lambda: Gemma2Config(**COMMON, **GQA, query_pre_attn_scalar=8, sliding_window=8,
                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, tie_word_embeddings=True),
    "phi3": lambda: Phi3Config(**COMMON, **GQA, tie_word_embeddings=False),
    "opt": lambda: OPTConfig(**COMMON, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                             tie_word_embeddings=True),
}
ARCH_NAMES = list(CONFIGS)


def make_tiny(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised causal LM of architecture `arch` (a key of CONFIGS), in eval mode, float32.
    Norm weights and biases are randomised too, so that folding them is tested."""
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for k, v in overrides.items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights (and biases): away from their init so folds are exercised
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_ids(n: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)
