"""Small LLMs: the TinyLlama architecture from its config, compute estimates (6·N·D, Kaplan et
al. 2020), the compute-optimal token count (≈ 20·N, Hoffmann et al. 2022), pretraining past it,
and throughput with model FLOP utilisation (MFU) against this machine's peak.

TinyLlama (Zhang et al. 2024, https://arxiv.org/abs/2401.02385) is a Llama-2-shaped 1.1B
model: grouped-query attention (32 query heads share 4 key/value heads), rotary position
embeddings, a SwiGLU MLP and RMSNorm, pretrained on about 1T tokens for about 3 epochs (3T
tokens seen; 16 A100-40G for 90 days by the project's README): about 2,700 tokens per
parameter, over 100 times the compute-optimal 20 (Hoffmann et al. 2022,
https://arxiv.org/abs/2203.15556), because a small model trained longer keeps improving and is
cheap to run.
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
                               "TinyLlama, arXiv 2401.02385, abstract (~1T tokens, ~3 epochs) and the project README "
                               "(3T tokens, 16 A100-40G, 90 days)")


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
    """C ≈ 6·N·D: forward 2·N and backward 4·N FLOPs per token (Kaplan et al. 2020,
    https://arxiv.org/abs/2001.08361, Sec. 2.1; Hoffmann et al. 2022 use the same estimate)."""
    return 6.0 * n_params * n_tokens


# Hoffmann et al. 2022 (Chinchilla), Table 3: a compute-optimal 1B-parameter model trains on 20.2B tokens;
# Chinchilla itself, 70B parameters on 1.4T tokens (Table 1): about 20 tokens per parameter.
CHINCHILLA_TOKENS_PER_PARAM = 20


def chinchilla_tokens(n_params: float) -> float:
    """Compute-optimal training tokens D ≈ 20·N (Hoffmann et al. 2022, Table 3): where a fixed compute
    budget is best spent, not where a model of N parameters stops improving."""
    return CHINCHILLA_TOKENS_PER_PARAM * n_params


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


def pretrain(model, ids: torch.Tensor, batch_size: int, seq_len: int, config=None, eval_fn=None) -> PretrainReport:
    """Pretrain `model` from scratch on random windows of a 1-D id tensor with the suite's
    training loop (next-token cross-entropy); times the loop for tokens/s and MFU.

    Args:
        ids: (N,) token ids, e.g. `corpus.tokens(tok, "train")`.
        config: a `shrinklib.train.TrainConfig` (steps, lr, warm-up, seed).
        eval_fn: passed to `train` (called every `config.eval_every` steps and at the end).
    """
    from .data import sample_windows
    from .train import TrainConfig, train

    config = config or TrainConfig()

    def next_batch(micro_step: int) -> dict:
        x = sample_windows(ids, batch_size, seq_len, seed=config.seed * 1_000_003 + micro_step)  # (b, L)
        return {"input_ids": x, "labels": x}

    t = time.perf_counter()
    history = train(model, next_batch, config=config, eval_fn=eval_fn)
    seconds = time.perf_counter() - t
    return PretrainReport(history, config.steps * config.grad_accum * batch_size * seq_len, seconds)


def char_vocabulary(text: str) -> str:
    """The distinct characters of a text, sorted: character vocabulary[i] has id i, and id
    len(vocabulary) stands for any character the text did not contain."""
    return "".join(sorted(set(text)))


def encode_chars(text: str, vocabulary: str) -> torch.Tensor:
    """Character ids of a text, (len(text),); unseen characters get id len(vocabulary)."""
    index = {c: i for i, c in enumerate(vocabulary)}
    return torch.tensor([index.get(c, len(vocabulary)) for c in text], dtype=torch.long)


@dataclass(frozen=True)
class PretrainRun:
    """One pretraining run from scratch: its token budget and held-out loss along the way."""

    n_tokens: int  # training tokens of the whole run
    curve: list  # (tokens seen, held-out loss in nats/token) at every evaluation
    report: PretrainReport
    model: LlamaForCausalLM  # the trained model

    @property
    def final_loss(self) -> float:
        return self.curve[-1][1]


def pretrain_for_tokens(config: LlamaConfig, train_ids: torch.Tensor, eval_ids: torch.Tensor, n_tokens: float,
                        batch_size: int, seq_len: int, lr: float, seed: int = 0, evals: int = 1,
                        device: str | torch.device = "cpu") -> PretrainRun:
    """Pretrain a fresh model of `config` on about `n_tokens` tokens (whole steps of batch_size ×
    seq_len) with a cosine schedule fitted to that budget, measuring the held-out loss `evals` times
    (evenly spaced, the last at the end).

    A run's own schedule matters: midway through a longer run the loss is higher than a run of that
    length reaches (Hoffmann et al. 2022, Sec. 3.1 and Fig. A1), so each budget is its own run.

    Args:
        train_ids, eval_ids: 1-D token ids (training text, held-out text).
    """
    from .evaluate import perplexity
    from .train import TrainConfig

    if n_tokens < batch_size * seq_len or evals < 1:
        raise ValueError(f"need n_tokens ≥ one batch ({batch_size * seq_len}) and evals ≥ 1, got {n_tokens}, {evals}")
    steps = round(n_tokens / (batch_size * seq_len))
    model = build_model(config, device, seed=seed)

    def eval_fn(m):
        return {"eval_loss": perplexity(m, eval_ids, seq_len=seq_len, max_tokens=None, progress=False).nll}

    every = max(1, steps // evals) if evals > 1 else 0
    report = pretrain(model, train_ids.to(device), batch_size, seq_len, TrainConfig(
        steps=steps, lr=lr, warmup_steps=max(1, steps // 20), seed=seed, progress=False, eval_every=every), eval_fn)
    curve = [(h["step"] * batch_size * seq_len, h["eval_loss"]) for h in report.history if "eval_loss" in h]
    return PretrainRun(steps * batch_size * seq_len, curve, report, model.eval())


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
