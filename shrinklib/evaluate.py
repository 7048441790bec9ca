"""Evaluation on one harness: perplexity, KL divergence to the base model, size as stored, latency and
peak memory.

Every notebook measures with these functions, so the numbers across notebooks compare.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import check_field, check_token_ids, context_length

# The suite's one evaluation protocol: every notebook scores the first EVAL_TOKENS tokens of the
# corpus's evaluation split in non-overlapping windows of EVAL_SEQ_LEN, so the float32 baseline is
# one number across notebooks and their results compare directly.
EVAL_TOKENS = 2048
EVAL_SEQ_LEN = 512


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    n_tokens: int  # tokens predicted (each window predicts all but its first token)


def windows(ids: Tensor, seq_len: int) -> list[Tensor]:
    """Non-overlapping windows of a 1-D id tensor; the last one may be shorter (but ≥ 2)."""
    return [ids[s : s + seq_len] for s in range(0, ids.numel(), seq_len) if ids[s : s + seq_len].numel() >= 2]


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: Tensor,
    seq_len: int = EVAL_SEQ_LEN,
    max_tokens: int | None = EVAL_TOKENS,
    batch_size: int = 4,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of `model` on a 1-D id tensor, over non-overlapping windows of `seq_len`.

    Each window is scored independently (no context carried over), the usual protocol of
    the GPTQ/Wanda papers; a window of l tokens predicts l - 1 of them.

    Args:
        ids: (N,) token ids, e.g. `corpus.tokens(tok, "eval")`.
        max_tokens: use only the first `max_tokens` ids (None: all).
    """
    ids = _evaluation_ids(model, ids, seq_len, max_tokens)  # checked, first max_tokens
    total_nll, total_n = 0.0, 0
    for x, logp in _window_logprobs(model, ids, seq_len, batch_size, progress, "perplexity"):
        total_nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        total_n += x[:, 1:].numel()
    mean = total_nll / total_n
    return Perplexity(math.exp(mean), mean, total_n)


def _window_logprobs(model: nn.Module, ids: Tensor, seq_len: int, batch_size: int, progress: bool, desc: str):
    """Yield (x (b, l), log-probabilities (b, l - 1, vocab) of the tokens after each position) for the
    windows of `ids`, a few windows of one length at a time, always in the same order."""
    device = next(model.parameters()).device
    wins = windows(ids, seq_len)
    groups = [wins[i : i + batch_size] for i in range(0, len(wins), batch_size)]
    for group in tqdm(groups, desc=desc, disable=not progress):
        for same_len in _by_length(group):
            x = torch.stack(same_len).to(device)  # (b, l)
            logits = model(x, use_cache=False).logits[:, :-1].float()  # (b, l - 1, vocab)
            yield x, F.log_softmax(logits, dim=-1)


# ----------------------------------------------------------------------------- KL divergence to the base

TOP_K = 1024  # base tokens kept per position by `base_logprobs` (the rest are one bucket)


@dataclass(frozen=True)
class BaseLogProbs:
    """The base model's next-token distributions on the evaluation windows, kept compactly: for
    every predicted position, its `k` largest log-probabilities (descending), their token ids, and
    the log of the probability of all other tokens together. Positions are in `perplexity`'s order."""

    ids: Tensor  # (N,) the evaluation ids scored (after max_tokens)
    seq_len: int
    top_logp: Tensor = field(repr=False)  # (positions, k) float32
    top_ids: Tensor = field(repr=False)  # (positions, k) int32
    rest_logp: Tensor = field(repr=False)  # (positions,) log P(every token outside the top k); -inf when none
    vocab: int  # the base's logits width
    perplexity: Perplexity  # the base's own, from the same pass


@dataclass(frozen=True)
class Divergence:
    """How far a compressed model's next-token distributions are from the base's on the same
    positions (the statistics of llama.cpp's `perplexity --kl-divergence`), with its perplexity."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    n_tokens: int  # positions compared (= tokens predicted)
    kl_mean: float  # mean KL(P_base ‖ Q) per position, nats
    kl_p99: float  # its 99th percentile (linear interpolation between order statistics)
    top1: float  # share of positions where both models' most likely next token is the same
    kl: Tensor = field(repr=False)  # (positions,) KL per position


def kl_topk(top_logp: Tensor, top_ids: Tensor, rest_logp: Tensor, logq: Tensor) -> Tensor:
    """KL(P ‖ Q) per position, with both distributions coarsened to P's top-k tokens plus one
    bucket for all other tokens. Coarsening never increases a KL divergence (the data-processing
    inequality), so this is a lower bound, exact when P puts no mass outside its top k.

    Args:
        top_logp: (n, k) log P of P's k most likely tokens; top_ids: (n, k) their ids.
        rest_logp: (n,) log P of all other tokens together (-inf when k is the vocabulary).
        logq: (n, V) log Q over the whole vocabulary.

    Returns:
        (n,) KL in nats.
    """
    top_ids = top_ids.long()
    lq = logq.gather(-1, top_ids)  # (n, k) log Q of P's top tokens
    head = (top_logp.exp() * (top_logp - lq)).sum(-1)  # Σ_top p (log p - log q)
    rest_logq = logq.scatter(-1, top_ids, float("-inf")).logsumexp(-1)  # (n,) log Q of the other tokens
    tail = rest_logp.exp() * (rest_logp - rest_logq)  # the bucket's term r_p log(r_p / r_q)
    return head + torch.where(rest_logp > float("-inf"), tail, torch.zeros_like(tail))


@torch.no_grad()
def base_logprobs(
    model: nn.Module,
    ids: Tensor,
    seq_len: int = EVAL_SEQ_LEN,
    max_tokens: int | None = EVAL_TOKENS,
    top_k: int = TOP_K,
    batch_size: int = 4,
    progress: bool = False,
) -> BaseLogProbs:
    """Run the base model once over the evaluation windows (as `perplexity` does) and keep, per
    position, its `top_k` largest log-probabilities and the mass of the rest: about 8·top_k bytes a
    position instead of 4·vocab, so a long evaluation fits in memory. `kl_divergence` compares a
    model against it.

    Args:
        ids, seq_len, max_tokens: as for `perplexity`.
        top_k: tokens kept per position (capped at the vocabulary); see `kl_topk` for what it costs.
    """
    check_field("base_logprobs", "top_k", top_k, int)
    if top_k < 1:
        raise ValueError(f"base_logprobs: top_k must be ≥ 1, got {top_k}")
    ids = _evaluation_ids(model, ids, seq_len, max_tokens)
    tops, idx, rest, nll, n, vocab = [], [], [], 0.0, 0, None
    for x, logp in _window_logprobs(model, ids, seq_len, batch_size, progress, "base log-probs"):
        vocab = logp.shape[-1]
        nll -= logp.gather(-1, x[:, 1:, None]).sum().item()
        n += x[:, 1:].numel()
        for row in logp:  # one window at a time: (l - 1, vocab)
            t, i = row.topk(min(top_k, vocab), dim=-1)  # (l - 1, k), descending
            tops.append(t.cpu())
            idx.append(i.to(torch.int32).cpu())
            rest.append(row.scatter(-1, i, float("-inf")).logsumexp(-1).cpu())
    return BaseLogProbs(ids.cpu(), seq_len, torch.cat(tops), torch.cat(idx), torch.cat(rest), vocab,
                        Perplexity(math.exp(nll / n), nll / n, n))


@torch.no_grad()
def kl_divergence(model: nn.Module, base: BaseLogProbs, batch_size: int = 4, progress: bool = False) -> Divergence:
    """Perplexity, KL divergence from the base and top-1 agreement of `model`, in one pass over the
    windows `base` was computed on (`base_logprobs`); the base's logits are never recomputed.

    Raises:
        ValueError: the model's vocabulary differs from the base's.
    """
    ids = _evaluation_ids(model, base.ids, base.seq_len, None)  # checked against this model
    device = next(model.parameters()).device
    kls, same, nll, start = [], 0, 0.0, 0
    for x, logq in _window_logprobs(model, ids, base.seq_len, batch_size, progress, "KL divergence"):
        if logq.shape[-1] != base.vocab:
            raise ValueError(f"kl_divergence: the model has {logq.shape[-1]} logits per position, the base {base.vocab}; "
                             "compare models that share one vocabulary")
        nll -= logq.gather(-1, x[:, 1:, None]).sum().item()
        for row in logq:  # one window at a time: (l - 1, vocab)
            stop = start + row.shape[0]
            top_logp, top_ids = base.top_logp[start:stop].to(device), base.top_ids[start:stop].to(device)
            kls.append(kl_topk(top_logp, top_ids, base.rest_logp[start:stop].to(device), row).cpu())
            same += (row.argmax(-1) == top_ids[:, 0].long()).sum().item()
            start = stop
    kl = torch.cat(kls)
    n = kl.numel()
    kl64 = kl.double()
    return Divergence(math.exp(nll / n), nll / n, n, kl64.mean().item(), torch.quantile(kl64, 0.99).item(), same / n, kl)


def _evaluation_ids(model: nn.Module, ids: Tensor, seq_len: int, max_tokens: int | None) -> Tensor:
    """The first `max_tokens` ids, after checking them and the window against the model."""
    check_field("perplexity", "seq_len", seq_len, int)
    check_field("perplexity", "max_tokens", max_tokens, int | None)
    if seq_len < 2 or (max_tokens is not None and max_tokens < 0):
        raise ValueError(f"perplexity: seq_len must be ≥ 2 (a window predicts all but its first token) and max_tokens "
                         f"≥ 0 or None, got {seq_len}, {max_tokens}")
    ids = ids[:max_tokens] if max_tokens else ids
    check_token_ids(ids, model, ndim=1, min_len=2, what="evaluation ids")
    context = context_length(model)
    if context is not None and min(seq_len, ids.numel()) > context:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context of {context} tokens; use seq_len ≤ {context}")
    return ids


def _by_length(group: list[Tensor]) -> list[list[Tensor]]:
    lengths = sorted({w.numel() for w in group})
    return [[w for w in group if w.numel() == n] for n in lengths]


def _unique_tensors(model: nn.Module) -> list[Tensor]:
    """Parameters and buffers, each stored tensor once (tied weights counted once)."""
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def model_size_bytes(model: nn.Module, include_buffers: bool = True) -> int:
    """Bytes of the model's weights as stored: every unique parameter (and, by default,
    persistent buffer such as packed quantized weights and their scales) at its dtype."""
    params = {id(p) for p in model.parameters()}
    persistent = {id(b) for _, b in _persistent_buffers(model)}
    keep = [t for t in _unique_tensors(model) if id(t) in params or (include_buffers and id(t) in persistent)]
    return sum(t.numel() * t.element_size() for t in keep)


def sparse_size_bytes(model: nn.Module) -> int:
    """Bytes as stored when unstructured zeros are stored sparse: each block linear takes the smaller
    of its dense form and a bitmask (one bit per weight) plus its nonzero values at their bit width
    (a quantized layer's `bits`); everything else as `model_size_bytes`."""
    from .arch import blocks, linear_layers
    from .export import linear_weight

    saving = 0
    for block in blocks(model):
        for lin in linear_layers(block).values():
            W = linear_weight(lin)  # (out, in)
            b = getattr(lin, "bits", None) or lin.weight.element_size() * 8
            n, nnz = W.numel(), int((W != 0).sum())
            saving += max(0, n * b // 8 - (nnz * b + n) // 8)
    return model_size_bytes(model) - saving


def _persistent_buffers(model: nn.Module):
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                yield f"{mod_name}.{name}", buf


def folder_size_bytes(folder: str | Path) -> int:
    """Bytes on disk of a saved model folder (all files)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def count_params(model: nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    params = {id(p) for p in model.parameters()}
    return sum(t.numel() for t in _unique_tensors(model) if id(t) in params)


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    repeats: int


def time_fn(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Median and minimum wall-clock time of `fn()` (synchronising CUDA if present)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return Timing(times[len(times) // 2], times[0], repeats)


@torch.no_grad()
def decode_latency(model: nn.Module, tokenizer, prompt: str = "def fibonacci(n):", new_tokens: int = 32, repeats: int = 3) -> float:
    """Seconds per generated token of greedy decoding at batch 1 (prompt processing excluded:
    the time of a 1-token generation is subtracted)."""
    device = next(model.parameters()).device
    x = tokenizer(prompt, return_tensors="pt").to(device)

    def gen(n):
        return lambda: model.generate(**x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    full = time_fn(gen(new_tokens), repeats=repeats).median_s
    first = time_fn(gen(1), repeats=repeats).median_s
    return (full - first) / (new_tokens - 1)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _release_freed_memory() -> None:
    """Return memory the C allocator still holds after frees to the system (glibc's malloc_trim), so
    that a resident-set measurement which follows counts every byte a call allocates; elsewhere a no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int | None:
    """Peak resident set size of this process so far (Linux VmHWM), bytes; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Bytes of memory `fn()` needed above what was in use before it (its peak).

    On CUDA: `torch.cuda.max_memory_allocated`. On CPU: the process's resident set size;
    Linux's high-water mark (VmHWM) is reset first, elsewhere RSS is sampled every ms.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _release_freed_memory()  # else memory freed earlier but kept by the allocator hides new allocations
    base = _rss()
    if _reset_peak_rss() and peak_rss() is not None:
        fn()
        return max(0, peak_rss() - base)
    peak, done = base, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, max(peak, _rss()) - base)


# Timing helpers of the benchmarks (`shrinklib.bench`, notebook 03): the fastest of many repeats,
# layers timed with their weights streamed from memory, the machine's roofline.

def best_time(fn, min_time: float = 0.2, max_repeats: int = 200, warmup: int = 2, min_repeats: int = 5) -> float:
    """Fastest seconds of fn() over repeats filling about `min_time` (at least `min_repeats`, after
    `warmup` calls and one probe): the least-disturbed run, since other processes on a shared
    machine only ever add time."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    n = int(min(max_repeats, max(min_repeats, min_time / max(time.perf_counter() - t0, 1e-6))))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def last_level_cache_bytes(default: int = 32 * 2**20) -> int:
    """Size of the CPU's largest cache, from Linux's sysfs (`default` where it cannot be read)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=default)


def read_bandwidth(nbytes: int | None = None) -> float:
    """Measured memory read bandwidth in bytes/s: a sum over a float32 tensor of `nbytes`
    (default 8x the last-level cache, at least 256 MiB, so the caches cannot hold it)."""
    nbytes = nbytes or max(256 * 2**20, 8 * last_level_cache_bytes())
    a = torch.ones(nbytes // 4)
    return nbytes / best_time(lambda: a.sum(), min_time=0.5, max_repeats=20)


def streamed_time(kernels: list, x, min_time: float = 0.2, max_repeats: int = 50) -> float:
    """Seconds per call when `kernels` (copies of one layer, together larger than the caches) are
    called in turn, as a decoding model calls its layers: each weight comes from memory, while the
    code and the activations stay in the cache. The fastest of at least 3 passes after one warm-up
    pass: a pass already averages over every copy, so fewer passes than `best_time`'s default do."""
    def one_pass():
        for k in kernels:
            k(x)

    return best_time(one_pass, min_time, max_repeats, warmup=1, min_repeats=3) / len(kernels)


def peak_flops(n: int = 1024) -> float:
    """Measured float32 matmul FLOP/s (torch's GEMM)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: a @ b, min_time=0.5)
