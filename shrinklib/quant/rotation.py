"""Rotations of the residual stream before quantization: QuaRot (2024) and SpinQuant (2024).

Hadamard matrices of the sizes models need, built from Paley's constructions and Sylvester's
doubling, so no table is typed in:
- Paley I: q prime, q ≡ 3 (mod 4) gives order q + 1 (12 from 11, 20 from 19, 28 from 27...);
- Paley II: q prime, q ≡ 1 (mod 4) gives order 2(q + 1) (36 from 17, 28 from 13...);
- Sylvester: H_2n = [[H_n, H_n], [H_n, -H_n]] = H_2 ⊗ H_n.
So n = 2^k · m with m in {1, 2} or m a Paley order: 64 = 2^6, 576 = 16 · 36, 1536 = 128 · 12.

QuaRot: https://arxiv.org/abs/2404.00456 · SpinQuant: https://arxiv.org/abs/2405.16406
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["hadamard", "random_hadamard", "sylvester", "paley", "hadamard_factors",
           "is_hadamard"]


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
