import re

import pytest

from shrinklib.models import load_model
from shrinklib.tasks import TASKS, Example, exact_match, format_prompt, make_examples, normalize, supervised_batch


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
