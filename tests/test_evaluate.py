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


# ----------------------------------------------------------------------------- KL divergence to the base

from shrinklib.evaluate import base_logprobs, kl_divergence, kl_topk  # noqa: E402


def _sharp(seed: int, vocab: int = 128):
    """A tiny Llama whose next-token distributions are peaked (a scaled output layer), like a trained model's."""
    m = make_picollama(seed=seed, vocab=vocab)
    with torch.no_grad():
        m.lm_head.weight.mul_(60)
    return m


def _perturbed(model, scale: float = 1.0, seed: int = 7):
    """A copy of `model` with noise on every decoder weight (a stand-in for a compressed model)."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layers" in name and p.ndim == 2:
                p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return m


def test_kl_topk_with_the_whole_vocabulary_equals_the_direct_kl():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(3 * torch.randn(50, 40, generator=g), -1)
    logq = torch.log_softmax(3 * torch.randn(50, 40, generator=g), -1)
    direct = (logp.exp() * (logp - logq)).sum(-1)
    top, ids = logp.topk(40, -1)
    torch.testing.assert_close(kl_topk(top, ids, torch.full((50,), float("-inf")), logq), direct, rtol=1e-5, atol=1e-6)


def test_kl_topk_is_the_kl_of_the_coarsened_distributions_and_a_lower_bound():
    # hand-computed: P = (0.5, 0.3, 0.2), Q = (0.2, 0.3, 0.5), k = 1: buckets P (0.5, 0.5), Q (0.2, 0.8)
    logp, logq = torch.tensor([[0.5, 0.3, 0.2]]).log(), torch.tensor([[0.2, 0.3, 0.5]]).log()
    top, ids = logp.topk(1, -1)
    expected = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert kl_topk(top, ids, torch.tensor([0.5]).log(), logq).item() == pytest.approx(expected, rel=1e-5)
    g = torch.Generator().manual_seed(1)
    logp = torch.log_softmax(4 * torch.randn(200, 64, generator=g), -1)
    logq = torch.log_softmax(logp + torch.randn(200, 64, generator=g), -1)
    direct = (logp.exp() * (logp - logq)).sum(-1)

    def coarse(k):
        top, ids = logp.topk(k, -1)
        return kl_topk(top, ids, logp.scatter(-1, ids, float("-inf")).logsumexp(-1), logq)

    for k in (1, 4, 16, 63):
        assert (coarse(k) >= -1e-6).all() and (coarse(k) <= direct + 1e-5).all()
    assert (coarse(16) - direct).abs().max() < (coarse(1) - direct).abs().max()


def _direct(base, model, ids, seq_len):
    """Mean and 99th percentile of KL(base ‖ model) per position, top-1 agreement and perplexity, from
    both models' full logits on every window."""
    kl, same, nll = [], [], []
    for w in windows(ids, seq_len):
        lp = torch.log_softmax(base(w[None]).logits[0, :-1].double(), -1)
        lq = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
        kl.append((lp.exp() * (lp - lq)).sum(-1))
        same.append(lp.argmax(-1) == lq.argmax(-1))
        nll.append(-lq.gather(-1, w[1:, None]).squeeze(-1))
    kl, same, nll = torch.cat(kl), torch.cat(same), torch.cat(nll)
    return kl.mean().item(), torch.quantile(kl, 0.99).item(), same.double().mean().item(), math.exp(nll.mean().item())


@torch.no_grad()
def test_kl_divergence_equals_a_direct_computation_on_both_models_full_logits():
    base = _sharp(seed=3)
    model = _perturbed(base)
    ids = torch.randint(3, 128, (700,), generator=torch.Generator().manual_seed(2))  # windows 256, 256, 188
    cache = base_logprobs(base, ids, seq_len=256, max_tokens=None, top_k=128, batch_size=2)
    d = kl_divergence(model, cache, batch_size=2)
    kl_mean, kl_p99, top1, ppl = _direct(base, model, ids, 256)
    assert d.n_tokens == cache.perplexity.n_tokens == 700 - 3 == d.kl.numel()
    assert d.kl_mean > 0.05 and top1 < 0.95  # the perturbation is visible
    assert d.kl_mean == pytest.approx(kl_mean, rel=1e-4)
    assert d.kl_p99 == pytest.approx(kl_p99, rel=1e-4)
    assert d.top1 == pytest.approx(top1, abs=1e-9)
    assert d.ppl == pytest.approx(ppl, rel=1e-5)
    assert d.ppl == pytest.approx(perplexity(model, ids, seq_len=256, max_tokens=None).ppl, rel=1e-6)
    assert cache.perplexity.ppl == pytest.approx(perplexity(base, ids, seq_len=256, max_tokens=None).ppl, rel=1e-6)
    # keeping only the base's top 8 tokens per position gives a lower bound close to it
    d8 = kl_divergence(model, base_logprobs(base, ids, seq_len=256, max_tokens=None, top_k=8))
    assert kl_mean * 0.8 < d8.kl_mean <= kl_mean * (1 + 1e-5) and d8.top1 == d.top1


@torch.no_grad()
def test_the_base_against_itself_has_zero_kl_and_full_agreement():
    base = _sharp(seed=4)
    ids = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(5))
    d = kl_divergence(base, base_logprobs(base, ids, seq_len=128, max_tokens=200, top_k=16))
    assert d.n_tokens == 200 - 2 and d.top1 == 1.0
    assert abs(d.kl_mean) < 1e-6 and abs(d.kl_p99) < 1e-6


def test_kl_divergence_refuses_another_vocabulary_and_a_bad_top_k():
    base = _sharp(seed=3)
    ids = torch.randint(3, 100, (100,), generator=torch.Generator().manual_seed(2))
    cache = base_logprobs(base, ids, seq_len=50, max_tokens=None, top_k=4)
    with pytest.raises(ValueError, match="vocabulary"):
        kl_divergence(_sharp(seed=3, vocab=112), cache)
    with pytest.raises(ValueError, match="top_k"):
        base_logprobs(base, ids, top_k=0)


def test_peak_memory_counts_a_repeated_allocation_every_time():
    # the allocator keeps a freed block for reuse; without handing it back first, the second
    # measurement of the same 20 MB allocation would see no growth of the resident set
    n = 5_000_000
    peaks = [peak_memory(lambda: torch.ones(n).sum()) for _ in range(3)]
    assert all(0.9 * n * 4 < p < 3 * n * 4 for p in peaks), peaks
