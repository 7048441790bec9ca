import pytest
import torch
from common import make_picollama, random_ids
from scipy.stats import chisquare
from transformers import DynamicCache

from shrinklib.speculative import (
    PromptLookupDraft, accept_draft, accept_greedy, assisted_generate, chi_square_pvalue, continuation_counts,
    continuation_law, crop_cache, expected_speedup, expected_tokens_per_call, greedy_generate, lookup_continuation,
    probs_from_logits, quantized_draft, speculative_generate, speedup_table,
)


pytestmark = pytest.mark.usefixtures("one_thread")


ALPHA = 1e-3  # significance level of the distribution tests (fixed seeds: the outcome is deterministic)
V = 48


@pytest.fixture(scope="module")
def pair():
    return make_picollama(0, vocab=V), make_picollama(1, vocab=V, layers=1)


def test_greedy_is_exactly_the_targets_greedy(pair):
    target, draft = pair
    for seed in range(6):
        x = random_ids(1, 4 + seed, V, seed)
        ref = target.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                              min_new_tokens=12, pad_token_id=0)
        assert torch.equal(greedy_generate(target, x, 12), ref)
        for gamma in (1, 2, 3, 5):
            out = speculative_generate(target, draft, x, 12, gamma)
            assert torch.equal(out.sequences, ref), (seed, gamma)
            assert sum(out.accepted) + out.target_calls >= 12 and max(out.accepted) <= gamma


def test_self_draft_accepts_everything(pair):
    target, _ = pair
    out = speculative_generate(target, target, random_ids(1, 6, V, 9), 15, gamma=4)
    assert out.acceptance_rate == 1.0 and out.accepted == [4, 4, 4] and out.tokens_per_target_call == 5.0


def test_eos_stops(pair):
    target, draft = pair
    x = random_ids(1, 6, V, 3)
    ref = greedy_generate(target, x, 10)
    eos = int(ref[0, x.shape[1] + 2])  # the third generated token
    out = speculative_generate(target, draft, x, 10, 3, eos_token_id=eos)
    first = (ref[0, x.shape[1]:] == eos).nonzero()[0].item()
    assert torch.equal(out.sequences, ref[:, : x.shape[1] + first + 1])


def test_assisted_generation_agrees(pair):
    target, draft = pair
    x = random_ids(1, 7, V, 4)
    assert torch.equal(assisted_generate(target, draft, x, 10, gamma=3, pad_token_id=0), greedy_generate(target, x, 10))


def test_greedy_rule_on_one_hot():
    p = probs_from_logits(torch.tensor([[0.0, 5, 1], [3, 0, 0], [0, 0, 9]]), 0)
    q = probs_from_logits(torch.tensor([[0.0, 5, 1], [0, 0, 9]]), 0)
    assert accept_draft(p, q, torch.tensor([1, 2])) == (1, 0)  # second draft rejected, target says 0
    assert accept_draft(p[[0, 0, 2]], q[[0, 0]], torch.tensor([1, 1])) == (2, 2)  # all kept, bonus token 2


def test_rejection_rule_keeps_target_distribution():
    """The first emitted token of the rule is distributed as p_1 (chi-square, level ALPHA)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.05, 0.05], [0.2] * 5])
    q = torch.tensor([[0.1, 0.1, 0.3, 0.3, 0.2]])
    n, counts = 20000, torch.zeros(5)
    for _ in range(n):
        d = torch.multinomial(q[0], 1, generator=g)
        k, nxt = accept_draft(p, q, d, g)
        counts[int(d) if k == 1 else nxt] += 1
    assert chisquare(counts.numpy(), (n * p[0]).numpy()).pvalue > ALPHA
    assert chisquare(counts.numpy(), (n * q[0]).numpy()).pvalue < ALPHA  # the test has power: not the draft's


def _sharpen(model, scale):
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def test_sampling_keeps_target_distribution_end_to_end():
    """Joint law of the first two sampled tokens on a toy vocabulary of 6 equals the target's."""
    v = 6
    target, draft = _sharpen(make_picollama(0, vocab=v), 15.0), _sharpen(make_picollama(5, vocab=v, layers=1), 15.0)
    x = random_ids(1, 5, v, 0) % 3 + 3
    with torch.no_grad():
        p1 = torch.softmax(target(x).logits[0, -1], -1)  # (v,)
        nxt = torch.cat([x.repeat(v, 1), torch.arange(v).view(v, 1)], 1)
        p2 = torch.softmax(target(nxt).logits[:, -1], -1)  # (v, v): p(t2 | t1)
    joint = (p1[:, None] * p2).flatten()  # (v*v,)
    g = torch.Generator().manual_seed(0)
    n, counts = 1500, torch.zeros(v * v)
    for _ in range(n):
        out = speculative_generate(target, draft, x, 2, gamma=2, temperature=1.0, generator=g)
        t1, t2 = out.sequences[0, -2:].tolist()
        counts[t1 * v + t2] += 1
    keep = joint * n >= 5  # chi-square needs expected counts ≥ 5; pool the rest
    obs = torch.cat([counts[keep], counts[~keep].sum().view(1)]).numpy()
    exp = torch.cat([(joint * n)[keep], (joint * n)[~keep].sum().view(1)]).numpy()
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > ALPHA


def test_crop_cache():
    c = DynamicCache()
    m = make_picollama(0, vocab=V)
    m(random_ids(1, 9, V, 0), past_key_values=c, use_cache=True)
    crop_cache(c, 5)
    assert c.get_seq_length() == 5
    crop_cache(c, 7)  # never grows
    assert c.get_seq_length() == 5


def test_expected_tokens_per_call():
    assert expected_tokens_per_call(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens_per_call(1.0, 4) == 5 and expected_tokens_per_call(0.0, 4) == 1


def test_speedup_table_rows(pair):
    target, draft = pair
    rows = speedup_table(target, {"model": draft, "lookup": PromptLookupDraft()}, [random_ids(1, 5, V, s) for s in range(2)],
                         [1, 3], max_new_tokens=8, repeats=2)
    assert [(r["draft"], r["gamma"]) for r in rows] == [("model", 1), ("model", 3), ("lookup", 1), ("lookup", 3)]
    assert all(r["exact"] for r in rows)
    assert all(1 <= r["tokens_per_target_call"] <= r["gamma"] + 1 and r["drafted_per_call"] <= r["gamma"] for r in rows)
    with pytest.raises(ValueError, match="repeats"):
        speedup_table(target, {}, [random_ids(1, 5, V, 0)], [1])


@pytest.fixture(scope="module")
def wide_target():
    """Hidden 64 and MLP 128: whole groups of 64 for the low-bit kernels."""
    return make_picollama(3, hidden=64, intermediate=128, vocab=V)


def _repetitive(seed, n=24):
    """A prompt that repeats itself, so prompt lookup finds its n-grams."""
    x = random_ids(1, 6, V, seed)
    return x.repeat(1, n // 6)


@pytest.mark.parametrize("kind", ["model", "lookup", "quantized lut4", "quantized int4"])
def test_greedy_equals_the_target_for_every_draft_kind(wide_target, kind):
    """The exact invariant: whatever the draft proposes, greedy speculative decoding returns the
    target's own greedy tokens (prompt lookup proposes nothing when no n-gram recurs)."""
    draft = {"model": lambda: make_picollama(1, vocab=V, layers=1), "lookup": lambda: PromptLookupDraft(3),
             "quantized lut4": lambda: quantized_draft(wide_target, "lut4"),
             "quantized int4": lambda: quantized_draft(wide_target, "int4", lm_head=False)}[kind]()
    for seed in range(4):
        for x in (random_ids(1, 5 + seed, V, seed), _repetitive(seed)):
            ref = greedy_generate(wide_target, x, 14)
            for gamma in (1, 3, 6):
                out = speculative_generate(wide_target, draft, x, 14, gamma)
                assert torch.equal(out.sequences, ref), (seed, gamma)
                assert max(out.drafted) <= gamma and sum(out.accepted) + out.target_calls >= 14


def test_a_quantized_self_draft_agrees_more_than_a_random_draft(wide_target):
    x = random_ids(1, 8, V, 1)
    own = speculative_generate(wide_target, quantized_draft(wide_target, "int8", lm_head=False), x, 20, 4)
    other = speculative_generate(wide_target, make_picollama(1, hidden=64, intermediate=128, vocab=V), x, 20, 4)
    assert own.acceptance_rate > 0.8 and own.acceptance_rate > other.acceptance_rate
    with pytest.raises(ValueError, match="unknown format"):
        quantized_draft(wide_target, "int5")


def test_lookup_continuation_by_hand():
    t = torch.tensor
    assert lookup_continuation(t([1, 2, 3, 4, 1, 2]), 3).tolist() == [3, 4, 1]  # (1, 2) seen at 0
    assert lookup_continuation(t([5, 6, 7, 5, 9, 5]), 2, max_ngram=1).tolist() == [9, 5]  # most recent 5 at 3
    assert lookup_continuation(t([1, 2, 3, 1, 2]), 10).tolist() == [3, 1, 2]  # up to the end of the context
    assert lookup_continuation(t([1, 2, 3]), 4).tolist() == []  # nothing recurs
    assert lookup_continuation(t([7, 1, 2, 9, 2]), 2, max_ngram=2).tolist() == [9, 2]  # the bigram (9, 2) misses; 2 hits
    assert lookup_continuation(t([7, 1, 2, 9, 2]), 2, max_ngram=2, min_ngram=2).tolist() == []
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDraft(2, 3)


def test_accept_greedy_is_accept_draft_at_temperature_zero():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(4, 5, generator=g)
        draft = torch.randint(0, 5, (3,), generator=g)
        p, q = probs_from_logits(logits, 0), torch.nn.functional.one_hot(draft, 5).float()
        assert accept_greedy(logits, draft) == accept_draft(p, q, draft)


def test_expected_speedup():
    assert expected_speedup(1.0, 4, 0.0) == 5.0  # a free draft that is always right
    assert expected_speedup(0.0, 4, 0.25) == pytest.approx(0.5)  # never right: the draft's time is lost
    assert expected_speedup(0.5, 1, 0.5) == pytest.approx(1.5 / 1.5)
    with pytest.raises(ValueError):
        expected_speedup(0.5, 2, -1)


def test_continuation_law_sums_to_one_and_matches_two_step_probabilities():
    v = 5
    m = make_picollama(0, vocab=v)
    x = random_ids(1, 4, v, 0) % 2 + 3
    law = continuation_law(m, x, 2)
    with torch.no_grad():
        p1 = torch.softmax(m(x).logits[0, -1].double(), -1)
        p2 = torch.softmax(m(torch.cat([x, torch.tensor([[4]])], 1)).logits[0, -1].double(), -1)
    assert law.sum().item() == pytest.approx(1.0) and law[4 * v + 1].item() == pytest.approx((p1[4] * p2[1]).item())
    with pytest.raises(ValueError, match="too many"):
        continuation_law(make_picollama(0, vocab=V), random_ids(1, 3, V, 0), 3)


@pytest.mark.parametrize("kind", ["model", "lookup"])
def test_sampling_follows_the_target_law_for_a_model_and_a_deterministic_draft(kind):
    """The emitted pairs of tokens follow the target's exact law (chi-square at level ALPHA), and
    the test has power: the draft model's own law is rejected."""
    v = 6
    target, other = _sharpen(make_picollama(0, vocab=v), 6.0), _sharpen(make_picollama(5, vocab=v, layers=1), 6.0)
    x = torch.tensor([[3, 4, 5, 3, 4]])  # (3, 4) recurs: prompt lookup proposes 5, 3, 4
    draft = other if kind == "model" else PromptLookupDraft(2)
    g = torch.Generator().manual_seed(1)
    counts = continuation_counts(lambda: speculative_generate(target, draft, x, 2, gamma=2, temperature=1.0,
                                                              generator=g).sequences[0, -2:], v, 2, 1500)
    assert chi_square_pvalue(counts, continuation_law(target, x, 2)) > ALPHA
    assert chi_square_pvalue(counts, continuation_law(other, x, 2)) < ALPHA


def test_a_draft_of_another_vocabulary_is_refused_up_front(pair):
    """An IndexError deep in the acceptance rule before; now the two sizes, as transformers checks them."""
    from shrinklib.checks import VocabularyMismatchError

    target, _ = pair
    other = make_picollama(1, vocab=V - 16, layers=1)
    with pytest.raises(VocabularyMismatchError, match=f"the target {V}, the draft {V - 16} tokens"):
        speculative_generate(target, other, random_ids(1, 4, V - 16, 0), 4)
    with pytest.raises(ValueError, match=r"one prompt, shape \(1, n\); got \(2, 4\)"):
        speculative_generate(target, target, random_ids(2, 4, V, 0), 4)


def test_two_different_tokenizers_are_refused_up_front(pair):
    from test_proxy import _tokenizer

    from shrinklib.checks import TokenizerMismatchError

    target, draft = pair
    words = ["<unk>"] + [f"w{i}" for i in range(V - 1)]
    same, other = _tokenizer(words), _tokenizer(words[:1] + words[2:] + words[1:2])
    x = random_ids(1, 4, V, 0)
    with pytest.raises(TokenizerMismatchError):
        speculative_generate(target, draft, x, 4, tokenizers=(same, other))
    assert speculative_generate(target, draft, x, 4, tokenizers=(same, _tokenizer(words))).sequences.shape[1] == 8
