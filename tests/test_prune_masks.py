"""Masks of magnitude, Wanda and N:M pruning: a hand-computed 5×5 fixture, exact sparsity and
N:M in every group, and `prune_` on Llama and OPT."""

import copy

import pytest
import torch
from common import make_picollama, make_picoopt, random_ids
from transformers import AutoModelForCausalLM

from shrinklib.arch import named_linears
from shrinklib.prune import (PruneConfig, is_nm, magnitude_mask, model_sparsity, nm_mask, prune_, wanda_mask)

# |W| is a permutation of 1..25, so there are no ties.
W5 = torch.tensor([[7.0, -1, 12, 20, -3],
                   [-9, 14, 2, -25, 6],
                   [4, -18, 11, 8, -22],
                   [16, 5, -13, 10, 24],
                   [-19, 15, 21, -17, 23]])
X_NORM5 = torch.tensor([1.0, 1.0, 0.5, 0.1, 1.0])


def test_magnitude_per_layer_fixture():
    # 40% of 25 = 10 removed: every |w| ≤ 10 goes
    expected = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 1, 0], [0, 1, 1, 0, 1], [1, 0, 1, 0, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(magnitude_mask(W5, 0.4, per="layer").int(), expected)


def test_magnitude_per_row_fixture():
    # int(5 · 0.4) = 2 smallest |w| removed in every row
    expected = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 0, 1, 0], [0, 1, 1, 0, 1], [1, 0, 1, 0, 1], [1, 0, 1, 0, 1]])
    assert torch.equal(magnitude_mask(W5, 0.4, per="row").int(), expected)


def test_wanda_fixture():
    # scores |w|·‖x‖, row 0: 7, 1, 6, 2, 3 → columns 1 and 3 go; row 4: 19, 15, 10.5, 1.7, 23 → 3 and 2 go
    expected = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 0, 0, 1], [0, 1, 1, 0, 1], [1, 0, 1, 0, 1], [1, 1, 0, 0, 1]])
    assert torch.equal(wanda_mask(W5, X_NORM5, 0.4).int(), expected)


def test_nm_fixture():
    score = torch.tensor([[1.0, 4, 3, 2, 8, 7, 5, 6]])
    assert nm_mask(score, 2, 4).int().tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]
    assert nm_mask(score, 4, 8).int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(7, 13), (64, 96)])
def test_exact_sparsity(sparsity, shape):
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(*shape, generator=g), torch.rand(shape[1], generator=g)
    rows, cols = shape
    assert (~magnitude_mask(W, sparsity, "layer")).sum() == int(rows * cols * sparsity)
    assert ((~magnitude_mask(W, sparsity, "row")).sum(1) == int(cols * sparsity)).all()
    assert ((~wanda_mask(W, x, sparsity)).sum(1) == int(cols * sparsity)).all()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_exact_in_every_group(n, m):
    score = torch.randn(33, 8 * m, generator=torch.Generator().manual_seed(1)).abs()
    mask = nm_mask(score, n, m)
    assert (mask.reshape(33, -1, m).sum(-1) == n).all()
    assert is_nm(score * mask, n, m)
    kept_min = torch.where(mask, score, torch.inf).reshape(33, -1, m).amin(-1)
    pruned_max = torch.where(mask, -torch.inf, score).reshape(33, -1, m).amax(-1)
    assert (kept_min > pruned_max).all()  # the kept ones are the largest of their group


def test_config_validation():
    with pytest.raises(ValueError, match="unknown pruning method"):
        PruneConfig("random")
    with pytest.raises(ValueError, match="sparsity"):
        PruneConfig("wanda", sparsity=1.0)
    with pytest.raises(ValueError, match="N:M"):
        PruneConfig("wanda", n=4, m=2)
    with pytest.raises(ValueError, match="multiple"):
        PruneConfig("sparsegpt", n=2, m=4, blocksize=6)
    with pytest.raises(ValueError, match="calibration"):
        prune_(make_picollama(), PruneConfig("wanda"))


@pytest.mark.parametrize("make", [make_picollama, make_picoopt])
@pytest.mark.parametrize("config", [PruneConfig("magnitude"), PruneConfig("magnitude", per="row"), PruneConfig("wanda"),
                                    PruneConfig("sparsegpt"), PruneConfig("wanda", n=2, m=4),
                                    PruneConfig("sparsegpt", n=2, m=4), PruneConfig("magnitude", n=4, m=8)])
def test_prune_model_exact(make, config):
    model = make()
    prune_(model, config, random_ids(4, 16, 128, 0), progress=False)
    assert model_sparsity(model) == pytest.approx(0.5, abs=1e-12)
    for lin in named_linears(model).values():
        W = lin.weight
        if config.n:
            assert is_nm(W, config.n, config.m)
        elif config.per == "row" or config.method == "wanda":
            assert ((W == 0).sum(1) == W.shape[1] // 2).all()
        else:
            assert (W == 0).sum() == W.numel() // 2


def test_wanda_uses_calibration_norms():
    """Wanda on the model equals wanda_mask with ‖X_j‖ recomputed by hand from block 0's q_proj inputs."""
    model, ids = make_picollama(), random_ids(4, 16, 128, 1)
    seen = []
    q = model.model.layers[0].self_attn.q_proj
    h = q.register_forward_hook(lambda mod, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    model(ids)
    h.remove()
    x_norm = torch.cat(seen).norm(dim=0)  # (in,)
    expected = q.weight * wanda_mask(q.weight, x_norm, 0.5)
    prune_(model, PruneConfig("wanda"), ids, progress=False)
    torch.testing.assert_close(q.weight, expected)


def test_pruned_model_saves_and_reloads(tmp_path):
    model, ids = make_picollama(), random_ids(2, 16, 128, 2)
    prune_(model, PruneConfig("sparsegpt", n=2, m=4), ids, progress=False)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert model_sparsity(again) == pytest.approx(0.5)


def test_magnitude_needs_no_data_and_is_deterministic():
    a, b = make_picollama(), make_picollama()
    prune_(a, PruneConfig("magnitude", sparsity=0.3))
    prune_(b, copy.deepcopy(PruneConfig("magnitude", sparsity=0.3)))
    for (n, la), lb in zip(named_linears(a).items(), named_linears(b).values()):
        assert torch.equal(la.weight, lb.weight), n


@pytest.mark.parametrize("ties", [False, True])
def test_keep_largest_equals_a_stable_argsort(ties):
    """The linear-time mask against the obvious one: stable argsort, drop the first n (ties by index)."""
    from shrinklib.prune.masks import _keep_largest

    g = torch.Generator().manual_seed(1)
    for shape in [(7,), (5, 13), (64, 33)]:
        s = torch.randn(*shape, generator=g)
        if ties:
            s = s.round()  # many equal scores
        for n in range(shape[-1]):
            ref = torch.ones_like(s, dtype=torch.bool)
            ref.scatter_(-1, torch.argsort(s, dim=-1, stable=True)[..., :n], False)
            assert torch.equal(_keep_largest(s, n), ref), (shape, n)
