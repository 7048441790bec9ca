"""Batch-1 greedy decoding without per-token overhead: a static KV cache and one compiled step.

A `transformers` model decodes one token per call through dozens of Python modules, and its
dynamic KV cache grows (a new tensor per layer per token). `Decoder` preallocates the cache
(`transformers.StaticCache`, fixed shapes) and compiles the one-token step with `torch.compile`
(on CPU: inductor, which writes and builds C++ with the system compiler), so each token is one call
of generated code; the prompt (any length) runs eagerly into the same cache. After the first step the
compiled graph's guards (a check of every parameter and buffer of the model: 3 ms of each SmolLM2
step under the profiler, one thread) are skipped: every step has the first one's inputs. Quantized layers on
the kernels run inside the compiled step as `torch.ops.shrink.*` operators.

The compile is paid once per model shape and format (the warm-up: `Decoder.warmup_seconds`, tens
of seconds on a 2-core CPU for SmolLM2); inductor's graph cache under `cache_dir()/inductor` keeps
the generated code, so a second process re-traces the model but builds nothing.

The kernels give the same bits compiled and eager on the same input, but the compiled graph rounds
its float operations differently (~1e-6 of the logits). Float and weight-only formats decode the
same greedy tokens either way; formats that round activations to int8 (LUT tables, W8A8) can turn
such a difference into another table code, and on SmolLM2 with every linear on LUT 4-bit the two
decodes part after a few tokens (measured: one flipped code in block 11 grows to 1% of the
hidden state by block 20).

    dec = Decoder(model, max_len=256)
    out = dec.generate(prompt_ids, new_tokens=32)   # out.tokens, out.step_seconds, dec.warmup_seconds
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .checks import check_token_ids
from .io import cache_dir


def enable_compile_cache(folder: str | Path | None = None) -> Path:
    """Keep inductor's compiled graphs under `folder` (default: `$TORCHINDUCTOR_CACHE_DIR` where
    set, else `cache_dir()/inductor`) across processes; returns the folder. The first compile of a
    model writes it, later ones reuse it."""
    path = Path(folder or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir() / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return path


@dataclass
class DecodeOutput:
    tokens: list[int]  # the greedy tokens after the prompt
    step_seconds: list[float] = field(default_factory=list)  # wall time of each one-token step
    prefill_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed from the fastest step (the least disturbed on a shared machine)."""
        return 1.0 / min(self.step_seconds)


class Decoder:
    """Greedy batch-1 decoding of a causal LM with a static KV cache and a compiled one-token step.

    The model is compiled as it is at the first step: after changing it (its weights or modules),
    make a new Decoder.

    Args:
        model: a `transformers` causal LM (float or quantized on any backend).
        max_len: positions the cache holds (prompt + new tokens).
        compile: compile the one-token step (False: the same static-cache step, eager).
    """

    def __init__(self, model: nn.Module, max_len: int = 512, compile: bool = True):
        from transformers import StaticCache

        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        self.model, self.max_len, self.compiled = model.eval(), max_len, compile
        device = next(model.parameters()).device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.device = device
        if compile:
            enable_compile_cache()
            self._step = torch.compile(self._forward, fullgraph=True, dynamic=False)
        else:
            self._step = self._forward
        self.warmup_seconds: float | None = None  # the first compiled step: tracing and compiling

    def _forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        return self.model(ids, past_key_values=self.cache, cache_position=positions, use_cache=True).logits[:, -1]

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tensor:
        """Reset the cache and run the prompt (1, L) eagerly; the last position's logits (1, vocab)."""
        check_token_ids(ids, self.model, ndim=2, what="prompt ids")
        if ids.shape[0] != 1 or ids.shape[1] >= self.max_len:
            raise ValueError(f"the prompt must be (1, L) with L < max_len={self.max_len}, got {tuple(ids.shape)}")
        self.cache.reset()
        return self._forward(ids.to(self.device), torch.arange(ids.shape[1], device=self.device))

    @torch.no_grad()
    def step(self, token: int, position: int) -> Tensor:
        """Logits (1, vocab) after feeding `token` at `position` (the cache holds positions < position)."""
        if not 0 <= position < self.max_len:
            raise ValueError(f"position {position} is outside the cache of {self.max_len}")
        ids = torch.tensor([[token]], device=self.device)
        pos = torch.tensor([position], device=self.device)
        if not self.compiled:
            return self._step(ids, pos)
        if self.warmup_seconds is None:
            t0 = time.perf_counter()
            out = self._step(ids, pos)
            self.warmup_seconds = time.perf_counter() - t0
            return out
        # Every later step has the inputs of the first (one token, one position, the same cache and
        # model), so the compiled graph's guards, which check every parameter and buffer of the
        # model, cannot fail: skip them.
        with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
            return self._step(ids, pos)

    def generate(self, ids: Tensor, new_tokens: int) -> DecodeOutput:
        """Greedy decoding of `new_tokens` tokens after the prompt `ids` (1, L)."""
        if ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt {ids.shape[1]} + {new_tokens} new tokens exceed max_len={self.max_len}")
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        out = DecodeOutput([int(logits.argmax(-1))], prefill_seconds=time.perf_counter() - t0)
        for pos in range(ids.shape[1], ids.shape[1] + new_tokens - 1):
            t = time.perf_counter()
            logits = self.step(out.tokens[-1], pos)
            nxt = int(logits.argmax(-1))
            out.step_seconds.append(time.perf_counter() - t)
            out.tokens.append(nxt)
        return out
