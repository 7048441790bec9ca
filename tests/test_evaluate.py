import math

import pytest
import torch
import torch.nn.functional as F

from common import make_picollama
from shrinklib.evaluate import count_params, model_size_bytes, peak_memory, perplexity, time_fn, windows


def test_uniform_model_has_perplexity_equal_to_vocab():
    model = make_picollama(vocab=128)
    torch.nn.init.zeros_(model.lm_head.weight)  # logits all 0: uniform over 128 tokens
    p = perplexity(model, torch.randint(0, 128, (300,)), seq_len=64, max_tokens=None)
    assert p.ppl == pytest.approx(128, rel=1e-5)


def test_perplexity_equals_a_direct_computation_and_counts_tokens_exactly():
    model = make_picollama(seed=1)
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(0))
    p = perplexity(model, ids, seq_len=64, max_tokens=None, batch_size=2)
    nll, n = 0.0, 0
    for w in windows(ids, 64):  # 64, 64, 22 tokens
        logits = model(w[None]).logits[0]
        nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        n += w.numel() - 1
    assert p.n_tokens == n == 150 - 3
    assert p.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_max_tokens_truncates():
    model = make_picollama()
    assert perplexity(model, torch.randint(0, 128, (500,)), seq_len=50, max_tokens=100).n_tokens == 98


def test_size_counts_tied_weights_once_and_persistent_buffers():
    untied, tied = make_picollama(tie=False), make_picollama(tie=True)
    emb = 128 * 32
    assert count_params(untied) - count_params(tied) == emb
    assert model_size_bytes(untied) - model_size_bytes(tied) == emb * 4
    tied.register_buffer("packed", torch.zeros(100, dtype=torch.uint8))
    tied.register_buffer("scratch", torch.zeros(1000), persistent=False)
    assert model_size_bytes(make_picollama(tie=True)) + 100 == model_size_bytes(tied)


def test_half_precision_halves_the_size():
    m = make_picollama()
    assert model_size_bytes(m.half()) * 2 == model_size_bytes(make_picollama())


def test_peak_memory_sees_a_large_allocation():
    n = 50_000_000  # 200 MB of float32
    peak = peak_memory(lambda: torch.ones(n).sum())
    assert 0.9 * n * 4 < peak < 3 * n * 4


def test_time_fn_reports_median_above_min():
    t = time_fn(lambda: sum(range(1000)), repeats=5)
    assert 0 < t.min_s <= t.median_s and t.repeats == 5


def test_sparse_size_counts_a_bitmask_and_the_surviving_values():
    """Hand count on the tiny Llama: 18,432 block weights (q, o 32×32; k, v 16×32; gate, up 64×32;
    down 32×64; two blocks). At 50% they take 18,432 bits of mask plus 9,216 values."""
    from shrinklib.evaluate import sparse_size_bytes
    from shrinklib.prune import PruneConfig, model_sparsity, prune_
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama()
    assert sparse_size_bytes(model) == model_size_bytes(model)  # dense weights: the bitmask would only add bytes
    prune_(model, PruneConfig("magnitude", 0.5))
    assert model_sparsity(model) == 0.5
    assert model_size_bytes(model) - sparse_size_bytes(model) == 18_432 * 4 - (18_432 // 8 + 9_216 * 4)
    quantize_(model, RTNConfig(bits=4, group_size=16, symmetric=True), progress=False)  # zero stays on the grid
    zeros = round(model_sparsity(model) * 18_432)
    assert zeros >= 9_216
    assert model_size_bytes(model) - sparse_size_bytes(model) == 18_432 // 2 - (18_432 // 8 + (18_432 - zeros) // 2)
