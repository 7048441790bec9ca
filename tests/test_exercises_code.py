"""The exercises that ask for code (notebooks 00, 01, 02, 04, 08, 11): a correct solution passes its
checker, a plausible wrong one fails with a hint, and the stub is "not attempted"."""

import math

import pytest
import torch
import torch.nn.functional as F

from shrinklib.exercises import ex00, ex01, ex02, ex04, ex08, ex11
from shrinklib.merge.ties import disjoint_mean, elect_sign
from shrinklib.prune.masks import wanda_score
from shrinklib.proxy import proxy_logits
from shrinklib.quant import dequantize, quantize


# ----------------------------------------------------------------------------- solutions


def perplexity_of(logits, ids):
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    return math.exp(-logp.gather(-1, ids[:, 1:, None]).mean().item())


def zero_point_rtn(W, bits, group_size):  # the library's own grid, read back
    return dequantize(quantize(W, "int", bits, group_size, symmetric=False))


def gptq_columns(W, H, quantize):
    W = W.clone().float()
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        Q[:, i] = quantize(W[:, i])
        err = (W[:, i] - Q[:, i]) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
    return Q


def wanda_layer_mask(W, x_norm, sparsity):
    score = wanda_score(W, x_norm).flatten()
    mask = torch.ones_like(score, dtype=torch.bool)
    mask[torch.argsort(score)[: int(score.numel() * sparsity)]] = False
    return mask.view_as(W)


def elect_and_mean(taus):  # the library's TIES steps
    return disjoint_mean(taus, elect_sign(taus), torch.ones(taus.shape[0]))


def proxy_probs(large, tuned, untuned, alpha):
    return torch.softmax(proxy_logits(large, tuned, untuned, alpha), -1)


SOLUTIONS = [(ex00.check_perplexity_of, perplexity_of), (ex01.check_zero_point_rtn, zero_point_rtn),
             (ex02.check_gptq_columns, gptq_columns), (ex04.check_wanda_layer_mask, wanda_layer_mask),
             (ex08.check_elect_and_mean, elect_and_mean), (ex11.check_proxy_probs, proxy_probs)]


@pytest.mark.parametrize("check, solution", SOLUTIONS, ids=lambda v: getattr(v, "__name__", ""))
def test_solutions_pass(check, solution, capsys):
    check(solution)
    assert "correct on all" in capsys.readouterr().out


# ----------------------------------------------------------------------------- wrong solutions fail


def perplexity_unshifted(logits, ids):  # scores each position's own token
    return math.exp(-F.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).mean().item())


def perplexity_per_row(logits, ids):  # averages the rows' perplexities
    return sum(perplexity_of(logits[i : i + 1], ids[i : i + 1]) for i in range(ids.shape[0])) / ids.shape[0]


def absmax_rtn(W, bits, group_size):  # the symmetric grid instead of zero-point
    return dequantize(quantize(W, "int", bits, group_size, symmetric=True))


def rtn_columns(W, H, quantize):  # no error feedback
    return torch.round(W)


def gptq_without_cholesky_scaling(W, H, quantize):  # the error is not divided by the diagonal
    W = W.clone().float()
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for i in range(W.shape[1]):
        Q[:, i] = quantize(W[:, i])
        W[:, i + 1 :] -= (W[:, i] - Q[:, i])[:, None] * Hinv[i, i + 1 :][None, :]
    return Q


def wanda_row_mask(W, x_norm, sparsity):  # Wanda's own per-row comparison group
    from shrinklib.prune import wanda_mask

    return wanda_mask(W, x_norm, sparsity)


def plain_mean(taus):  # no sign election
    return taus.mean(0)


def mean_over_all_models(taus):  # elects the sign but divides by M
    gamma = torch.sign(taus.sum(0))
    return (taus * (torch.sign(taus) == gamma)).sum(0) / taus.shape[0]


def proxy_unnormalised(large, tuned, untuned, alpha):
    return large + alpha * (tuned - untuned)


def proxy_without_alpha(large, tuned, untuned, alpha):
    return torch.softmax(large + tuned - untuned, -1)


WRONG = [(ex00.check_perplexity_of, perplexity_unshifted), (ex00.check_perplexity_of, perplexity_per_row),
         (ex01.check_zero_point_rtn, absmax_rtn), (ex02.check_gptq_columns, rtn_columns),
         (ex02.check_gptq_columns, gptq_without_cholesky_scaling), (ex04.check_wanda_layer_mask, wanda_row_mask),
         (ex08.check_elect_and_mean, plain_mean), (ex08.check_elect_and_mean, mean_over_all_models),
         (ex11.check_proxy_probs, proxy_unnormalised), (ex11.check_proxy_probs, proxy_without_alpha)]


@pytest.mark.parametrize("check, wrong", WRONG, ids=lambda v: getattr(v, "__name__", ""))
def test_wrong_solutions_fail_with_a_hint(check, wrong):
    with pytest.raises(AssertionError, match="hint"):
        check(wrong)


def test_the_stub_and_none_are_not_attempted_and_a_crash_is_reported(capsys):
    def stub(*args):
        raise NotImplementedError

    for check, _ in SOLUTIONS:
        check(stub)
        check(None)
    assert capsys.readouterr().out.count("not attempted") == 2 * len(SOLUTIONS)
    with pytest.raises(AssertionError, match="raised ZeroDivisionError"):
        ex00.check_perplexity_of(lambda logits, ids: 1 / 0)
    with pytest.raises(AssertionError, match="pass your function"):
        ex00.check_perplexity_of(3.0)
