"""Small LLMs: the TinyLlama architecture from its config, compute estimates (6·N·D), and
pretraining throughput with model FLOP utilisation (MFU) against this machine's peak.

TinyLlama (Zhang et al. 2024, https://arxiv.org/abs/2401.02385) is a Llama-2-shaped 1.1B
model: grouped-query attention (32 query heads share 4 key/value heads), rotary position
embeddings, a SwiGLU MLP and RMSNorm, pretrained on 3T tokens on 16 A100-40G in 90 days.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .arch import keep_blocks_, param_count

# TinyLlama-1.1B's published config (TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T, config.json).
TINYLLAMA_1B = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
    rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
)
TINYLLAMA_1B_PARAMS = 1_100_048_384  # the model card's / our count of the config above

A100_BF16_PEAK = 312e12  # FLOP/s, dense bf16 tensor cores (NVIDIA A100 datasheet)


@dataclass(frozen=True)
class PretrainingRun:
    """A published pretraining run: parameters N, tokens D, devices and days."""

    name: str
    n_params: float
    n_tokens: float
    n_devices: int
    days: float
    device_peak: float  # FLOP/s of one device
    source: str = ""


TINYLLAMA_RUN = PretrainingRun("TinyLlama-1.1B", 1.1e9, 3e12, 16, 90, A100_BF16_PEAK,
                               "TinyLlama, arXiv 2401.02385, Sec. 2 and the project README")


def tinyllama_config(**overrides) -> LlamaConfig:
    """A LlamaConfig with TinyLlama-1.1B's values, any of which `overrides` replaces
    (e.g. `hidden_size=64, num_hidden_layers=2` for a tiny model of the same shape)."""
    unknown = set(overrides) - set(TINYLLAMA_1B) - {"head_dim", "pad_token_id", "bos_token_id", "eos_token_id"}
    if unknown:
        raise ValueError(f"Unknown TinyLlama config keys {sorted(unknown)}; known: {sorted(TINYLLAMA_1B)}")
    values = {**TINYLLAMA_1B, **overrides}
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads (grouped-query attention)")
    if values["hidden_size"] % values["num_attention_heads"] and "head_dim" not in values:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return LlamaConfig(**values)


def build_model(config: LlamaConfig, device: str | torch.device = "meta", seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama for `config`; on the meta device no memory is allocated
    (shapes only: enough to count parameters of a 1B model without downloading it)."""
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM(config)


def count_params_config(config) -> int:
    """Parameters of a config by hand: embeddings, attention (GQA), the MLP (SwiGLU for Llama),
    norms, biases: the suite's one analytic formula, `shrinklib.arch.param_count`."""
    return int(param_count(config))


def training_flops(n_params: float, n_tokens: float) -> float:
    """C ≈ 6·N·D: forward 2·N and backward 4·N FLOPs per token (Kaplan et al. 2020)."""
    return 6.0 * n_params * n_tokens


def flops_per_token(config: LlamaConfig, seq_len: int, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6·N (non-embedding weights and the LM head) plus the
    attention scores 6·2·L·s·d (QKᵀ and AV, forward and backward; PaLM, App. B)."""
    N = n_params if n_params is not None else count_params_config(config) - config.vocab_size * config.hidden_size
    return 6.0 * N + 12.0 * config.num_hidden_layers * seq_len * config.hidden_size


def implied_mfu(run: PretrainingRun) -> float:
    """The MFU a published run implies: 6·N·D over (devices × peak × seconds)."""
    return training_flops(run.n_params, run.n_tokens) / (run.n_devices * run.device_peak * run.days * 86400)


def days_on(run: PretrainingRun, flops_per_s: float) -> float:
    """Days the run's 6·N·D compute would take at a sustained `flops_per_s`."""
    return training_flops(run.n_params, run.n_tokens) / flops_per_s / 86400


@torch.no_grad()
def measure_matmul_peak(n: int = 1024, repeats: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    """This machine's float32 matmul throughput (FLOP/s): best of `repeats` n×n×n products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    flops_per_s: float
    mfu: float  # achieved / peak


def throughput(n_tokens: int, seconds: float, flops_token: float, peak: float) -> Throughput:
    """Tokens/s, achieved FLOP/s and model FLOP utilisation of a training run."""
    tps = n_tokens / seconds
    return Throughput(tps, tps * flops_token, tps * flops_token / peak)


@dataclass(frozen=True)
class PretrainReport:
    history: list  # one dict per step (step, loss, lr) from `shrinklib.train.train`
    n_tokens: int  # tokens processed
    seconds: float  # wall-clock of the whole loop


def pretrain(model, ids: torch.Tensor, batch_size: int, seq_len: int, config=None) -> PretrainReport:
    """Pretrain `model` from scratch on random windows of a 1-D id tensor with the suite's
    training loop (next-token cross-entropy); times the loop for tokens/s and MFU.

    Args:
        ids: (N,) token ids, e.g. `corpus.tokens(tok, "train")`.
        config: a `shrinklib.train.TrainConfig` (steps, lr, warm-up, seed).
    """
    from .data import sample_windows
    from .train import TrainConfig, train

    config = config or TrainConfig()

    def next_batch(micro_step: int) -> dict:
        x = sample_windows(ids, batch_size, seq_len, seed=config.seed * 1_000_003 + micro_step)  # (b, L)
        return {"input_ids": x, "labels": x}

    t = time.perf_counter()
    history = train(model, next_batch, config=config)
    seconds = time.perf_counter() - t
    return PretrainReport(history, config.steps * config.grad_accum * batch_size * seq_len, seconds)


def depth_pruned(model, keep: list[int]):
    """A copy of a decoder that keeps only the blocks `keep` (same embeddings, final norm, head and
    tokenizer): a cheap draft for speculative decoding or the small model of a proxy-tuning pair.

    Args:
        keep: indices of the decoder blocks to keep, in order.
    """
    import copy

    L = model.config.num_hidden_layers
    if not keep or any(not 0 <= i < L for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(f"keep must be distinct block indices in [0, {L}), got {keep}")
    return keep_blocks_(copy.deepcopy(model), list(keep))
