import re

import pytest
import torch
from common import make_picollama, random_ids

from shrinklib.models import load_model
from shrinklib.tasks import TASKS, Example, exact_match, format_prompt, make_examples, normalize, paired_difference, supervised_batch


@pytest.fixture(scope="module")
def tok():
    return load_model()[1]


def test_examples_are_reproducible_and_seed_dependent():
    assert make_examples("addition", 5, seed=0) == make_examples("addition", 5, seed=0)
    assert make_examples("addition", 5, seed=0) != make_examples("addition", 5, seed=1)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_are_right(task):
    for e in make_examples(task, 50, seed=2):
        if task == "addition":
            a, b = map(int, re.findall(r"\d+", e.question)[:2])
            assert 10 <= a <= 99 and 10 <= b <= 99 and e.answer == str(a + b)
        elif task == "reversal":
            word = re.search(r"'(\w+)'", e.question).group(1)
            assert e.answer == word[::-1]
        elif task == "copying":
            assert e.question.endswith(e.answer)
        elif task == "larger":
            a, b = map(int, re.findall(r"\d+", e.question)[:2])
            assert a != b and e.answer == str(max(a, b))
        elif task == "successor":
            assert e.answer == str(int(re.search(r"\d+", e.question).group()) + 1)
        elif task == "first_letter":
            word = re.search(r"'(\w+)'", e.question).group(1)
            assert e.answer == word[0] and len(e.answer) == 1
        else:
            nums = list(map(int, e.question.split(":")[1].split()))
            assert list(map(int, e.answer.split())) == sorted(nums)


def test_unknown_task():
    with pytest.raises(ValueError, match="Unknown task"):
        make_examples("chess", 1)


def test_exact_match_normalizes_the_first_line():
    ex = [Example("q", "42"), Example("q", "abc"), Example("q", "7")]
    assert normalize("  42.\nmore text") == "42"
    assert exact_match(["42.\nbla", "abc", "8"], ex) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        exact_match(["1"], ex)


def test_prompt_uses_chat_template(tok):
    p = format_prompt(tok, "What is 1 + 1?")
    assert "What is 1 + 1?" in p and p.rstrip().endswith("assistant")

    class Plain:
        chat_template = None

    assert format_prompt(Plain(), "hi") == "Q: hi\nA: "


def test_supervised_batch_learns_the_answer_only(tok):
    ex = make_examples("addition", 3, seed=0)
    b = supervised_batch(tok, ex)
    for i, e in enumerate(ex):
        target = b["labels"][i][b["labels"][i] != -100]
        assert tok.decode(target) == e.answer + tok.eos_token
        n = int(b["attention_mask"][i].sum())
        assert (b["labels"][i][n:] == -100).all()


# ----------------------------------------------------------------------------- fine-tuning on tasks (top blocks on a cached prefix)


def _answer_batch(n=3, length=12, vocab=128):
    """Right-padded rows whose last few real tokens are the answer (labels -100 elsewhere)."""
    ids = random_ids(n, length, vocab)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a shorter row
    mask[2, -5:] = 0
    labels = torch.full_like(ids, -100)
    for i, real in enumerate(mask.sum(1).tolist()):
        labels[i, real - 4 : real] = ids[i, real - 4 : real]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("start", [0, 2, 3])
def test_cached_prefix_gives_the_full_forward_and_its_gradients(start):
    from shrinklib import arch
    from shrinklib.calib import cache_prefix, final_hidden
    from shrinklib.tasks import answer_loss

    model = make_picollama(0, layers=4)
    model.requires_grad_(False)
    arch.blocks(model)[start:].requires_grad_(True)
    batch = _answer_batch()
    cached = cache_prefix(model, batch, start)
    assert cached["hidden"].shape == (3, 12, 32)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(final_hidden(model, cached)[real], final_hidden(model, batch)[real],
                               rtol=1e-5, atol=1e-5)
    # the answer loss is the usual next-token loss on the labels, from the cache too
    torch.testing.assert_close(answer_loss(model, cached), model(**batch).loss, rtol=1e-5, atol=1e-6)
    grads = []
    for b in (batch, cached):
        model.zero_grad()
        answer_loss(model, b).backward()
        grads.append([p.grad.clone() for p in arch.blocks(model)[start:].parameters()])
    for g_full, g_cached in zip(*grads):
        torch.testing.assert_close(g_cached, g_full, rtol=1e-4, atol=1e-6)


def test_answer_metrics_is_exact_match_under_teacher_forcing():
    from shrinklib.tasks import answer_correct, answer_metrics

    model = make_picollama(0)
    batch = _answer_batch()
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].argmax(-1)
    labels = batch["labels"][:, 1:]  # a view: edits change batch["labels"]
    where = labels != -100
    labels[0][where[0]] = pred[0][where[0]]  # row 0: every answer token is the argmax -> a hit
    labels[1][where[1]] = pred[1][where[1]]
    last = where[1].nonzero()[-1, 0]
    labels[1, last] = (labels[1, last] + 1) % 128  # row 1: all but its last answer token -> a miss
    labels[2][where[2]] = (pred[2][where[2]] + 1) % 128  # row 2: none -> a miss
    m = answer_metrics(model, [batch])
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["loss"] == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    # per example, in batch order, over several batches: the same verdicts
    assert answer_correct(model, [batch, batch]).tolist() == [True, False, False] * 2


def test_paired_difference_is_the_mean_and_standard_error_of_the_differences():
    a = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 0, 1, 1], dtype=torch.bool)
    diff, se = paired_difference(a, b)  # differences (0, 1, 0, 1, -1, 0): mean 1/6
    d = [0, 1, 0, 1, -1, 0]
    var = sum((x - 1 / 6) ** 2 for x in d) / 5  # sample variance
    assert diff == pytest.approx(1 / 6) and se == pytest.approx((var / 6) ** 0.5)
    assert paired_difference(a, a) == (0.0, 0.0)  # a model against itself: no difference, no noise
    with pytest.raises(ValueError, match="same examples"):
        paired_difference(a, b[:5])


def test_finetune_task_trains_only_what_requires_grad():
    from shrinklib import arch
    from shrinklib.calib import cache_prefix
    from shrinklib.tasks import answer_loss
    from shrinklib.train import finetune_task

    model = make_picollama(0, layers=3)
    model.requires_grad_(False)
    arch.blocks(model)[2:].requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [cache_prefix(model, _answer_batch(), 2)]
    loss0 = answer_loss(model, batches[0]).item()
    finetune_task(model, batches, steps=20, lr=1e-2, seed=0)
    assert answer_loss(model, batches[0]).item() < loss0
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.2.") for k in changed)


def test_a_depth_pruned_copy_keeps_the_models_own_first_blocks():
    from shrinklib import arch, calib
    from shrinklib.smallllm import depth_pruned

    model = make_picollama(0, layers=3)
    small = depth_pruned(model, [0, 1])
    assert len(arch.blocks(small)) == 2 and small.config.num_hidden_layers == 2 and len(arch.blocks(model)) == 3
    ids = random_ids(2, 8)
    with torch.no_grad():  # the first two blocks are the model's own
        torch.testing.assert_close(calib.block_inputs(small, 1, input_ids=ids)[0], calib.block_inputs(model, 1, input_ids=ids)[0])
