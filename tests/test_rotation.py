"""Rotations (QuaRot, SpinQuant): the Hadamard construction (H Hᵀ = n I for every order it
builds, Sylvester's against scipy's), the randomized Hadamard's orthogonality, and a rotated
float model computing the original's function."""

import pytest
import scipy.linalg
import torch

from shrinklib.quant.rotation import hadamard, hadamard_factors, is_hadamard, paley, random_hadamard, sylvester


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 44, 60, 64, 72, 108, 576, 768, 1536, 2048])
def test_hadamard_is_hadamard(n):
    H = hadamard(n, torch.float64)
    assert H.shape == (n, n) and bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))  # integers: exact


def test_every_order_it_builds_up_to_512():
    built = []
    for n in range(1, 513):
        try:
            H = hadamard(n, torch.float64)
        except ValueError:
            continue
        assert is_hadamard(H), n
        built.append(n)
    assert all(n in (1, 2) or n % 4 == 0 for n in built)  # a Hadamard order is 1, 2 or a multiple of 4
    # orders below 100 that need more than Paley with q prime and Sylvester: 52 (q = 25, a prime power), 92 (Williamson)
    assert [n for n in range(4, 100, 4) if n not in built] == [52, 92]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_powers_of_two_equal_scipy_sylvester(n):
    assert torch.equal(hadamard(n, torch.float64), torch.from_numpy(scipy.linalg.hadamard(n)).double())


def test_factors_of_the_model_sizes():
    assert hadamard_factors(576) == (36, 4)   # SmolLM2 hidden: Paley II from q = 17, then 16·
    assert hadamard_factors(1536) == (12, 7)  # SmolLM2 intermediate: Paley I from q = 11, then 128·
    assert hadamard_factors(64) == (1, 6)     # head dimension: Sylvester alone


def test_paley_by_hand():
    # q = 3 (≡ 3 mod 4): order 4; q = 5 (≡ 1 mod 4): order 12
    assert is_hadamard(paley(3)) and paley(3).shape == (4, 4)
    assert is_hadamard(paley(5)) and paley(5).shape == (12, 12)
    assert is_hadamard(sylvester(paley(3)))
    with pytest.raises(ValueError, match="odd prime"):
        paley(9)


@pytest.mark.parametrize("n", [3, 6, 52, 0, -4])
def test_orders_it_cannot_build_raise(n):
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard(n)


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_random_hadamard_is_orthogonal_and_seeded(n):
    Q = random_hadamard(n, seed=3, dtype=torch.float64)
    torch.testing.assert_close(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(Q, random_hadamard(n, seed=3, dtype=torch.float64))
    assert not torch.equal(Q, random_hadamard(n, seed=4, dtype=torch.float64))
    # columns are ±H's columns / √n
    H = hadamard(n, torch.float64)
    torch.testing.assert_close((Q * n ** 0.5).abs(), H.abs())
