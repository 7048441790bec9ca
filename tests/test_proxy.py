import pytest
import torch
from common import make_picollama, random_ids
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LogitsProcessorList, PreTrainedTokenizerFast

from shrinklib.proxy import (
    ProxyTuningLogitsProcessor, TokenizerMismatchError, _Follower, check_same_tokenizer, gap_closed, proxy_logits,
)


pytestmark = pytest.mark.usefixtures("one_thread")


V = 40


def _tokenizer(words):
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])


def test_proxy_logits_by_hand():
    out = proxy_logits(torch.tensor([1.0, 2, 0]), torch.tensor([0.0, 3, 1]), torch.tensor([0.0, 1, 2]))
    assert out.tolist() == [1.0, 4.0, -1.0]
    half = proxy_logits(torch.tensor([1.0, 2, 0, 7]), torch.tensor([0.0, 3, 1]), torch.tensor([0.0, 1, 2]), alpha=0.5)
    assert half.tolist() == [1.0, 3.0, -0.5, 7.0]  # a padded extra vocabulary entry is left alone


def test_equal_pair_returns_large_output_exactly():
    large, small = make_picollama(0, vocab=V), make_picollama(1, vocab=V, layers=1)
    x = random_ids(3, 6, V, 0)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10, pad_token_id=0)
    ref = large.generate(x, **kw)
    out = large.generate(x, logits_processor=LogitsProcessorList([ProxyTuningLogitsProcessor(small, small)]), **kw)
    assert torch.equal(out, ref)


def test_processor_matches_full_forward():
    """One step of the processor equals the formula on full (uncached) forwards."""
    large, tuned, untuned = (make_picollama(s, vocab=V) for s in (0, 1, 2))
    x = random_ids(2, 7, V, 1)
    proc = ProxyTuningLogitsProcessor(tuned, untuned, alpha=1.0)
    with torch.no_grad():
        scores = large(x).logits[:, -1]
        expect = scores + tuned(x).logits[:, -1] - untuned(x).logits[:, -1]
        torch.testing.assert_close(proc(x, scores), expect)
        y = torch.cat([x, random_ids(2, 1, V, 2)], 1)  # one more step: served from the cache
        scores = large(y).logits[:, -1]
        torch.testing.assert_close(proc(y, scores), scores + tuned(y).logits[:, -1] - untuned(y).logits[:, -1])


def test_follower_handles_left_padding():
    m = make_picollama(3, vocab=V)
    a, b = random_ids(1, 6, V, 3), random_ids(1, 4, V, 4)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])  # pad id 0 on the left
    f = _Follower(m, pad_token_id=0)
    got = f.logits(batch)
    with torch.no_grad():
        torch.testing.assert_close(got[0], m(a).logits[0, -1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], m(b).logits[0, -1], atol=1e-5, rtol=1e-4)


def test_mismatched_tokenizers_raise_clearly():
    t1 = _tokenizer(["<unk>", "a", "b", "c"])
    t2 = _tokenizer(["<unk>", "a", "c", "b"])
    check_same_tokenizer(t1, _tokenizer(["<unk>", "a", "b", "c"]))
    with pytest.raises(TokenizerMismatchError, match="share one tokenizer"):
        check_same_tokenizer(t1, t1, t2)
    m = make_picollama(0, vocab=V)
    with pytest.raises(TokenizerMismatchError):
        ProxyTuningLogitsProcessor(m, m, tokenizers=(t1, t1, t2))


def test_gap_closed():
    assert gap_closed(0.1, 0.5, 0.6) == pytest.approx(0.8)
    assert gap_closed(0.0, 0.0, 0.0) != gap_closed(0.0, 0.0, 0.0)  # undefined: NaN


def test_a_small_pair_of_another_vocabulary_is_refused():
    """Without tokenizers the sizes must agree (no silent offset on the first V logits)."""
    from shrinklib.proxy import VocabularyMismatchError

    large, small = make_picollama(0, vocab=V), make_picollama(1, vocab=V - 8, layers=1)
    x = random_ids(1, 5, V - 8, 0)
    proc = ProxyTuningLogitsProcessor(small, small)
    with torch.no_grad(), pytest.raises(VocabularyMismatchError, match=f"the large {V}, the small tuned {V - 8}"):
        proc(x, large(x).logits[:, -1])
    with pytest.raises(VocabularyMismatchError, match="vocabulary sizes differ"):
        ProxyTuningLogitsProcessor(small, make_picollama(2, vocab=V, layers=1))
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(VocabularyMismatchError):
        large.generate(x, logits_processor=LogitsProcessorList([proc]), **kw)


def test_padded_vocabularies_of_one_tokenizer_are_accepted_with_the_tokenizers():
    words = ["<unk>"] + [f"w{i}" for i in range(V - 9)]  # V - 8 ids: the small pair's padding-free size
    tok = _tokenizer(words)
    large, small = make_picollama(0, vocab=V), make_picollama(1, vocab=V - 8, layers=1)
    x = random_ids(1, 5, V - 8, 0)
    proc = ProxyTuningLogitsProcessor(small, small, tokenizers=(tok, tok, tok))
    with torch.no_grad():
        scores = large(x).logits[:, -1]
        assert torch.equal(proc(x, scores), scores)  # tuned == untuned: the large scores, padded rows untouched
