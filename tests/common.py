"""Tiny generated models for fast tests (hidden 32, 2 layers), in the spirit of mergekit's
`make_picollama`."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM


def make_picollama(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   intermediate: int = 64, vocab: int = 128, tie: bool = False) -> LlamaForCausalLM:
    """A randomly initialised Llama with grouped-query attention, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def make_picoopt(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64, vocab: int = 128) -> OPTForCausalLM:
    """A randomly initialised OPT decoder, in eval mode."""
    torch.manual_seed(seed)
    config = OPTConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, ffn_dim=ffn, num_attention_heads=heads,
        max_position_embeddings=256, word_embed_proj_dim=hidden, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return OPTForCausalLM(config).eval()


def random_ids(n: int = 4, length: int = 16, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    """(n, length) random token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g)
