"""Small generated tasks with exact answers, for fine-tuning, merging, reward models and
proxy tuning. Every example is a (question, answer) pair; accuracy is exact match of the
greedy continuation."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Example:
    question: str
    answer: str


def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Example(f"What is {a} + {b}? Answer with the number only.", str(a + b))


def _word(rng: random.Random, lo: int = 4, hi: int = 7) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _reversal(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(f"Reverse the letters of '{w}'. Answer with the reversed word only.", w[::-1])


def _copying(rng: random.Random) -> Example:
    w = " ".join(_word(rng, 3, 5) for _ in range(3))
    return Example(f"Repeat exactly: {w}", w)


def _sorting(rng: random.Random) -> Example:
    xs = [rng.randint(0, 99) for _ in range(5)]
    return Example(f"Sort these numbers in ascending order: {' '.join(map(str, xs))}", " ".join(map(str, sorted(xs))))


def _larger(rng: random.Random) -> Example:
    a, b = rng.sample(range(10, 100), 2)
    return Example(f"Which is larger, {a} or {b}? Answer with the number only.", str(max(a, b)))


def _successor(rng: random.Random) -> Example:
    n = rng.randint(10, 998)
    return Example(f"What number comes after {n}? Answer with the number only.", str(n + 1))


def _first_letter(rng: random.Random) -> Example:
    w = _word(rng)
    return Example(f"What is the first letter of '{w}'?", w[0])


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "addition": _addition,
    "reversal": _reversal,
    "copying": _copying,
    "sorting": _sorting,
    # short answers: a few steps on the top blocks learn them (notebook 08 merges one fine-tune per task)
    "larger": _larger,
    "successor": _successor,
    "first_letter": _first_letter,
}


def make_examples(task: str, n: int, seed: int = 0) -> list[Example]:
    """`n` examples of a task, reproducible for a seed. Distinct seeds give distinct draws,
    so use e.g. seed 0 for training and seed 1 for evaluation."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known: {sorted(TASKS)}")
    rng = random.Random(f"{task}-{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def format_prompt(tokenizer, question: str) -> str:
    """The question in the model's chat format (plain "Q: ... A:" if it has no template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return f"Q: {question}\nA: "


def normalize(text: str) -> str:
    """The answer part of a generation: first line, stripped, without a final period."""
    return text.strip().split("\n")[0].strip().rstrip(".").strip()


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[Example], max_new_tokens: int = 12, batch_size: int = 16,
                     logits_processors: Callable[[], list] | None = None) -> list[str]:
    """Greedy continuations of each example's prompt (chat format, left-padded batches).

    Args:
        logits_processors: called once per batch, returns the `transformers` logits processors that
            change the model's next-token scores (e.g. proxy tuning's); None: plain greedy decoding.
    """
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs = []
    try:
        for i in range(0, len(examples), batch_size):
            prompts = [format_prompt(tokenizer, e.question) for e in examples[i : i + batch_size]]
            x = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            procs = LogitsProcessorList(logits_processors() if logits_processors is not None else [])
            y = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=procs,
                               pad_token_id=tokenizer.pad_token_id)
            outs += tokenizer.batch_decode(y[:, x.input_ids.shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def exact_match(predictions: list[str], examples: list[Example]) -> float:
    """Fraction of predictions whose normalized text equals the answer."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    return sum(normalize(p) == e.answer for p, e in zip(predictions, examples)) / max(1, len(examples))


def task_accuracy(model, tokenizer, examples: list[Example], **kw) -> float:
    """Exact-match accuracy of greedy decoding on the examples."""
    return exact_match(generate_answers(model, tokenizer, examples, **kw), examples)


def supervised_batch(tokenizer, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Tokenized prompt+answer pairs for fine-tuning; labels are -100 on the prompt and the
    padding, so the loss is on the answer (and its end-of-turn token) only."""
    eos = tokenizer.eos_token or ""
    rows = []
    for e in examples:
        p = tokenizer(format_prompt(tokenizer, e.question), add_special_tokens=False).input_ids
        a = tokenizer(e.answer + eos, add_special_tokens=False).input_ids
        rows.append((p + a, [-100] * len(p) + a))
    L = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (L - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (L - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (L - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def task_batches(tokenizer, task: str, n: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Fixed supervised batches of a task (the training set is `n` examples drawn with `seed`)."""
    ex = make_examples(task, n, seed)
    return [supervised_batch(tokenizer, ex[i : i + batch_size]) for i in range(0, n, batch_size)]


def answer_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict an answer token, and those tokens: the output head
    (49K × 576 for SmolLM2) runs on a few positions per example instead of all of them. The batch
    is a `supervised_batch`, or its `calib.cache_prefix` (then only the blocks above run)."""
    from .calib import final_hidden

    h = final_hidden(model, batch)  # (n, L, d)
    labels = batch["labels"][:, 1:]  # (n, L-1): position t predicts token t+1
    where = labels != -100
    return model.get_output_embeddings()(h[:, :-1][where]), labels[where]  # (m, V), (m,)


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy on the answer tokens only (the same value as `train.causal_lm_loss`, cheaper)."""
    logits, target = answer_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), target)


def _answer_stats(model, b: dict) -> tuple[torch.Tensor, float, int]:
    """One supervised batch (already on the model's device): the answer tokens each example gets
    wrong under teacher forcing (n,), the summed answer cross-entropy and the number of answer tokens."""
    logits, target = answer_logits(model, b)  # (m, V), (m,) over the batch's answer tokens
    row = (b["labels"][:, 1:] != -100).nonzero()[:, 0]  # (m,) the example of each answer token
    wrong = torch.zeros(b["labels"].shape[0], device=logits.device).index_add_(0, row, (logits.argmax(-1) != target).float())
    nll = torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
    return wrong, nll, target.numel()


@torch.no_grad()
def answer_metrics(model, batches: list[dict]) -> dict[str, float]:
    """Exact match (every answer token is the greedy argmax under teacher forcing, equal to greedy
    decoding's exact match for the answer and its end-of-turn token) and mean answer cross-entropy
    over supervised batches."""
    from .calib import to_device

    device = next(model.parameters()).device
    hits = total = 0
    nll = n_tok = 0.0
    for b in batches:
        b = to_device(b, device)  # also the cached block arguments (position embeddings) of a `cache_prefix` batch
        wrong, b_nll, b_tok = _answer_stats(model, b)
        hits += (wrong == 0).sum().item()
        total += wrong.numel()
        nll += b_nll
        n_tok += b_tok
    return {"accuracy": hits / max(1, total), "loss": nll / max(1.0, n_tok)}


@torch.no_grad()
def answer_correct(model, batches: list[dict]) -> torch.Tensor:
    """Per example, whether its whole answer is right under teacher forcing (the exact match of
    `answer_metrics`, one bool per example in batch order, on the CPU): the paired outcomes that
    compare two models on the same examples."""
    from .calib import to_device

    device = next(model.parameters()).device
    return torch.cat([(_answer_stats(model, to_device(b, device))[0] == 0).cpu() for b in batches])


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Two models scored on the same examples (one score each, e.g. `answer_correct`): the mean of
    a − b and its standard error std(a − b) / √n (sample standard deviation). Pairing removes the
    examples' own difficulty from the noise, so the error is that of the difference, not of two means."""
    if a.shape != b.shape or a.ndim != 1 or a.numel() < 2:
        raise ValueError(f"need two score vectors of one length >= 2 over the same examples, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    d = a.double() - b.double()  # (n,)
    return d.mean().item(), (d.std() / d.numel() ** 0.5).item()
