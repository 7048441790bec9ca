"""Rotations of the residual stream before quantization: QuaRot (2024) and SpinQuant (2024).

Hadamard matrices of the sizes models need, built from Paley's constructions and Sylvester's
doubling, so no table is typed in:
- Paley I: q prime, q ≡ 3 (mod 4) gives order q + 1 (12 from 11, 20 from 19, 24 from 23...);
- Paley II: q prime, q ≡ 1 (mod 4) gives order 2(q + 1) (36 from 17, 28 from 13...);
- Sylvester: H_2n = [[H_n, H_n], [H_n, -H_n]] = H_2 ⊗ H_n.
So n = 2^k · m with m in {1, 2} or m a Paley order: 64 = 2^6, 576 = 16 · 36, 1536 = 128 · 12.

QuaRot: https://arxiv.org/abs/2404.00456 · SpinQuant: https://arxiv.org/abs/2405.16406
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from .. import arch
from ..checks import check_not_quantized
from ..prune.slicegpt import fold_norms_
from .config import RotationConfig

__all__ = ["hadamard", "random_hadamard", "sylvester", "paley", "hadamard_factors", "is_hadamard",
           "hadamard_transform", "rotate_residual_", "rotate_heads_", "online_hadamard_", "rotate_"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> Tensor:
    """Q[i, j] = χ(j − i), χ the quadratic character mod a prime q (χ(0) = 0). Shape (q, q)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley(q: int) -> Tensor:
    """Paley's Hadamard matrix from a prime q: order q + 1 if q ≡ 3 (mod 4), 2(q + 1) if q ≡ 1."""
    if not _is_prime(q) or q % 4 not in (1, 3):
        raise ValueError(f"Paley's construction here takes an odd prime q, got {q}")
    Q = _jacobsthal(q)  # (q, q): skew-symmetric if q ≡ 3 (mod 4), symmetric if q ≡ 1
    ones = torch.ones(q, 1, dtype=torch.float64)
    if q % 4 == 3:  # Paley I: H = I + S, S = [[0, 1ᵀ], [−1, Q]]
        S = torch.cat([torch.cat([torch.zeros(1, 1, dtype=Q.dtype), ones.T], 1), torch.cat([-ones, Q], 1)], 0)
        return torch.eye(q + 1, dtype=Q.dtype) + S
    # Paley II: C = [[0, 1ᵀ], [1, Q]] (symmetric conference matrix); 0 -> [[1, −1], [−1, −1]], ±1 -> ±H_2
    C = torch.cat([torch.cat([torch.zeros(1, 1, dtype=Q.dtype), ones.T], 1), torch.cat([ones, Q], 1)], 0)
    H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=Q.dtype)
    D = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=Q.dtype)
    return torch.kron(C, H2) + torch.kron(torch.eye(q + 1, dtype=Q.dtype), D)


def sylvester(H: Tensor) -> Tensor:
    """One Sylvester step: [[H, H], [H, −H]] (order doubles)."""
    return torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)


def _paley_order(m: int) -> int | None:
    """The prime q whose Paley construction has order m, or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return m - 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return m // 2 - 1
    return None


def hadamard_factors(n: int) -> tuple[int, int]:
    """(m, k) with n = m · 2^k and m ∈ {1, 2} or a Paley order; the largest m that works."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"a Hadamard matrix needs a positive integer order, got {n!r}")
    k = (n & -n).bit_length() - 1  # the power of two in n
    for j in range(0, k + 1):  # the smallest Sylvester depth first: keep the largest base
        m = n >> (k - j)
        if m in (1, 2) or _paley_order(m) is not None:
            return m, k - j
    raise ValueError(f"no Hadamard matrix of order {n} from Paley's constructions (q prime) and "
                     f"Sylvester's doubling: {n} = {n >> k} · 2^{k}, and no m · 2^j with m a Paley "
                     f"order (q + 1 for a prime q ≡ 3 mod 4, 2(q + 1) for a prime q ≡ 1 mod 4) or 1, 2")


@functools.lru_cache(maxsize=32)
def _hadamard64(n: int) -> Tensor:
    m, k = hadamard_factors(n)
    H = torch.ones(1, 1, dtype=torch.float64) if m == 1 else (
        torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) if m == 2 else paley(_paley_order(m)))
    for _ in range(k):
        H = sylvester(H)  # (m·2^i, m·2^i) -> twice that
    return H


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A Hadamard matrix of order n: entries ±1, H Hᵀ = n I. Shape (n, n)."""
    return _hadamard64(n).to(dtype).clone()


def random_hadamard(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The randomized Hadamard transform H · diag(s) / √n with seeded signs s ∈ {±1}: orthogonal."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return (_hadamard64(n) * s[None, :] / math.sqrt(n)).to(dtype)


def is_hadamard(H: Tensor) -> bool:
    """True iff H is square with entries ±1 and H Hᵀ = n I (exact in float64)."""
    n = H.shape[0]
    H = H.to(torch.float64)
    return (H.shape == (n, n) and bool((H.abs() == 1).all())
            and bool(torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))))


def hadamard_transform(x: Tensor) -> Tensor:
    """x · H/√n over the last dimension, H = hadamard(n) = H_(2^k) ⊗ H_m used as two small matmuls:
    with X = x viewed (..., 2^k, m), x·(A ⊗ B) = Aᵀ X B. n(2^k + m) operations a row instead of n²."""
    n = x.shape[-1]
    m, k = hadamard_factors(n)
    A = _hadamard64(1 << k).to(device=x.device, dtype=x.dtype)  # (2^k, 2^k), Sylvester: symmetric
    B = _hadamard64(m).to(device=x.device, dtype=x.dtype)  # (m, m)
    X = x.reshape(*x.shape[:-1], 1 << k, m)
    return (A.T @ X @ B).reshape(x.shape) / math.sqrt(n)


# ----------------------------------------------------------------------------- rotating a model


@torch.no_grad()
def _rows_(lin: nn.Module, R: Tensor, rows: slice = slice(None)) -> None:
    """Output rows `rows` of a linear (and its bias) rotated: W[rows] ← Rᵀ W[rows], b[rows] ← b[rows] R."""
    W = lin.weight.data
    W[rows] = R.T.to(W.dtype) @ W[rows]
    if getattr(lin, "bias", None) is not None:
        lin.bias.data[rows] = lin.bias.data[rows] @ R.to(W.dtype)


@torch.no_grad()
def rotate_residual_(model: nn.Module, Q: Tensor) -> None:
    """Rotate the residual stream by an orthogonal Q (d, d): x ↦ xQ everywhere (QuaRot).

    The norms must be scale-free first (`fold_norms_`), so RMSNorm(xQ) = RMSNorm(x)Q. Writers of
    the stream (embeddings, o and down) get Qᵀ on their outputs, readers (q, k, v, gate, up, head)
    Q on their inputs: W_in ← W_in Q, W_out ← Qᵀ W_out, E ← E Q."""
    lay = arch.layout(model)
    for e in (lay.embed(model), lay.positions(model)):
        if e is not None:
            e.weight.data = e.weight.data @ Q.to(e.weight.dtype)  # (V, d)
    for b in lay.blocks(model):
        for lin in (x for r in lay.readers(b).values() for x in r):
            lin.weight.data = lin.weight.data @ Q.to(lin.weight.dtype)  # (out, d)
        for lin in lay.writers(b):
            _rows_(lin, Q)  # (d, in)
    head = model.get_output_embeddings()
    head.weight.data = head.weight.data @ Q.to(head.weight.dtype)  # (V, d)


@torch.no_grad()
def rotate_heads_(model: nn.Module, Hh: Tensor) -> None:
    """Each attention head's values rotated by an orthogonal Hh (hd, hd), undone in o_proj's columns:
    attention mixes tokens, not a head's channels, so softmax(·)(V Hh) = (softmax(·) V) Hh (QuaRot's
    offline Hadamard of W_v and W_out)."""
    lay, cfg = arch.layout(model), model.config
    hd = arch.head_dim(cfg)
    for b in lay.blocks(model):
        v, rows = arch.proj_slice(lay, b, cfg, "v")  # (kv·hd, d) rows of v (a part of a fused qkv)
        for h in range(rows.start, rows.stop, hd):
            _rows_(v, Hh, slice(h, h + hd))
        o = arch.get_path(b, lay.arch.o.path)
        W = o.weight.data  # (d, heads·hd)
        o.weight.data = (W.reshape(W.shape[0], -1, hd) @ Hh.to(W.dtype)).reshape(W.shape)


class OnlineHadamard:
    """x ↦ x·H/√n on the input of the layer at `path` of a block, whatever layer sits there when the
    block runs (a float, quantized or W8A8 linear): a block pre-hook attaches it, first in line, to
    that layer and the block's forward hook detaches it."""

    def __init__(self, block: nn.Module, path: str):
        self.block, self.path, self.handle = block, path, None
        block.register_forward_pre_hook(self.attach)
        block.register_forward_hook(self.detach)

    def attach(self, block, args):
        layer = arch.get_path(block, self.path)
        self.handle = layer.register_forward_pre_hook(lambda m, a: (hadamard_transform(a[0]), *a[1:]), prepend=True)

    def detach(self, block, args, out):
        if self.handle is not None:
            self.handle.remove()
        self.handle = None

    def remove(self) -> None:
        """Take the transform off the block (found by owner, so a deep copy of the model removes its own)."""
        for hooks in (self.block._forward_pre_hooks, self.block._forward_hooks):
            for key in [k for k, f in hooks.items() if getattr(f, "__self__", None) is self]:
                del hooks[key]


@torch.no_grad()
def online_hadamard_(model: nn.Module) -> None:
    """Fold M = H/√n (n = the MLP width) into every down projection's columns, W_down ← W_down M,
    and apply x ↦ xM to its input at run time (an `OnlineHadamard`), so (xM)(W_down M)ᵀ = x W_downᵀ
    (QuaRot: no norm precedes the down projection to absorb a rotation offline)."""
    lay = arch.layout(model)
    for b in lay.blocks(model):
        if hasattr(b, "online_hadamard"):
            raise ValueError("this model already has an online Hadamard before its down projections")
        down = arch.get_path(b, lay.arch.down.path)
        W = down.weight.data  # (d, n)
        down.weight.data = hadamard_transform(W)  # W H/√n, row by row
        b.online_hadamard = OnlineHadamard(b, lay.arch.down.path)


@torch.no_grad()
def rotate_(model: nn.Module, config: RotationConfig) -> dict:
    """QuaRot's rotation of a float model, in place; the model computes the same function.

    Norms folded into the linears that read them (the head is untied from a tied embedding), the
    residual stream rotated by a seeded randomized Hadamard, each head's values by a Hadamard of
    the head dimension, and an online Hadamard before each down projection. Returns the sizes used.
    """
    what = "rotating the residual stream (QuaRot, SpinQuant)"
    lay = arch.require(model, "rotate", what)
    check_not_quantized(model, "rotate_ (rotations are folded into float weights, before quantizing)")
    cfg = model.config
    tied = model.get_output_embeddings().weight is lay.embed(model).weight
    d, hd, n = cfg.hidden_size, arch.head_dim(cfg), lay.mlp_width(cfg)
    for size in {d, n} | ({hd} if config.heads else set()):
        hadamard_factors(size)  # a clear error before anything changes
    if any(hasattr(b, "online_hadamard") for b in lay.blocks(model)):
        raise ValueError("rotate_: this model is already rotated (it has online Hadamard transforms)")
    fold_norms_(model, "rotate", what)
    rotate_residual_(model, random_hadamard(d, config.seed, torch.float64))
    if config.heads:
        rotate_heads_(model, hadamard(hd, torch.float64) / math.sqrt(hd))
    if config.online:
        online_hadamard_(model)
    return {"hidden": d, "head_dim": hd, "mlp": n, "untied": tied}
