"""SparseGPT: identity at 0%, exact patterns, lazy batching equal to column-by-column OBS,
and a lower reconstruction error than magnitude and Wanda on calibration data."""

import pytest
import torch
from common import make_picollama, random_ids

from shrinklib.calib import collect_input_stats, sequential
from shrinklib.prune import is_nm, magnitude_mask, reconstruction_error, sparsegpt_prune, wanda_mask


def _layer(seed=0, rows=24, cols=64, tokens=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)  # correlated inputs, as in real layers
    X = torch.randn(tokens, cols, generator=g) @ mix  # (tokens, in)
    W = torch.randn(rows, cols, generator=g)
    return W, X, 2 * X.T @ X / tokens


def test_zero_sparsity_returns_weights_unchanged():
    W, _, H = _layer()
    W_new, mask = sparsegpt_prune(W, H, 0.0)
    assert torch.equal(W_new, W) and mask.all()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_exact_sparsity_per_block(sparsity):
    W, _, H = _layer()
    W_new, mask = sparsegpt_prune(W, H, sparsity, blocksize=32)
    assert (W_new == 0).sum() == int(W.numel() * sparsity)
    assert torch.equal(W_new != 0, mask)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_pattern(n, m):
    W, _, H = _layer(1)
    W_new, mask = sparsegpt_prune(W, H, n=n, m=m, blocksize=16)
    assert is_nm(W_new, n, m) and (mask.reshape(W.shape[0], -1, m).sum(-1) == n).all()


def test_lazy_batches_equal_column_by_column():
    """The blocked (lazy) update is an exact reordering of the one-column-at-a-time OBS update."""
    W, _, H = _layer(2)
    fast, _ = sparsegpt_prune(W, H, n=2, m=4, blocksize=32)
    slow, _ = sparsegpt_prune(W, H, n=2, m=4, blocksize=4)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_reconstruction_error_formula_matches_outputs():
    W, X, H = _layer(3)
    W_new, _ = sparsegpt_prune(W, H, 0.5)
    direct = ((X @ (W - W_new).T) ** 2).sum(1).mean()  # ‖ΔW x‖² per token
    assert reconstruction_error(W, W_new, H) == pytest.approx(direct.item(), rel=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_beats_magnitude_and_wanda_on_calibration_layer(sparsity):
    W, X, H = _layer(4, rows=32, cols=512, tokens=2048)  # several 128-column blocks, as in real layers
    errs = {"sparsegpt": reconstruction_error(W, sparsegpt_prune(W, H, sparsity)[0], H),
            "magnitude": reconstruction_error(W, W * magnitude_mask(W, sparsity, "row"), H),
            "wanda": reconstruction_error(W, W * wanda_mask(W, X.norm(dim=0), sparsity), H)}
    assert errs["sparsegpt"] < 0.85 * min(errs["wanda"], errs["magnitude"]), errs


def test_beats_magnitude_on_every_linear_of_a_model():
    """On the real calibration inputs of every linear of picollama (block inputs from `sequential`)."""
    model, ids = make_picollama(), random_ids(8, 32, 128, 0)
    worse = []

    def step(s):
        for name, st in collect_input_stats(s.block, s.forward).items():
            W = s.block.get_submodule(name).weight
            e_sgpt = reconstruction_error(W, sparsegpt_prune(W, st.hessian, 0.5)[0], st.hessian)
            e_mag = reconstruction_error(W, W * magnitude_mask(W, 0.5, "layer"), st.hessian)
            if not e_sgpt < e_mag:
                worse.append((s.index, name, e_sgpt, e_mag))

    sequential(model, ids, step, progress=False)
    assert not worse


def test_dead_inputs_are_zeroed():
    W, X, _ = _layer(5)
    X[:, 3] = 0
    H = 2 * X.T @ X / X.shape[0]
    W_new, mask = sparsegpt_prune(W, H, 0.0)
    assert (W_new[:, 3] == 0).all() and not mask[:, 3].any()


@pytest.mark.parametrize("cols", [62, 30])
def test_nm_refuses_a_trailing_partial_group_as_magnitude_and_wanda_do(cols):
    """A 2:4 pattern on 62 inputs would prune the last 2 entirely: refused, like nm_mask."""
    from shrinklib.prune import nm_mask

    W, _, H = _layer(cols=cols)
    for prune in (lambda: sparsegpt_prune(W, H, n=2, m=4, blocksize=32), lambda: nm_mask(W.abs(), 2, 4)):
        with pytest.raises(ValueError, match=f"input size {cols} is not a multiple of m=4"):
            prune()
    with pytest.raises(ValueError, match="blocksize 30 must be a multiple of m=4"):
        sparsegpt_prune(*_layer(cols=64)[::2], n=2, m=4, blocksize=30)


def test_prune_checks_every_layer_before_changing_any():
    from shrinklib.prune import PruneConfig, prune_

    model = make_picollama(hidden=30, heads=3, kv_heads=1, intermediate=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="0.self_attn.q_proj: input size 30 is not a multiple of m=4"):
        prune_(model, PruneConfig("sparsegpt", n=2, m=4), random_ids(2, 16), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
