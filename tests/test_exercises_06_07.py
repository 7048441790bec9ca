"""The exercises of notebooks 06 and 07: solutions pass, wrong answers explain themselves."""

import math

import pytest

from shrinklib.exercises import ex06, ex07


def test_ex06_solutions(capsys):
    ex06.check_forward_kl(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    ex06.check_temperature(0.75)
    ex06.check_topk_memory(768)
    assert capsys.readouterr().out.count("Correct") == 3


def test_ex07_solutions(capsys):
    ex07.check_width_layer_params(1_797_840)
    ex07.check_layers_to_drop(15)
    ex07.check_prune_first(2)
    assert capsys.readouterr().out.count("Correct") == 3


@pytest.mark.parametrize("check,wrong,hint", [
    (ex06.check_forward_kl, 0.25 * math.log(0.5) + 0.75 * math.log(1.5), "reverse"),
    (ex06.check_temperature, 0.9, "T = 1"),
    (ex06.check_topk_memory, 1536, "bytes"),
    (ex07.check_width_layer_params, 1_797_120, "RMSNorm"),
    (ex07.check_layers_to_drop, 16, "full block"),
    (ex07.check_prune_first, 1, "magnitudes"),
])
def test_wrong_answers_raise_with_a_hint(check, wrong, hint):
    with pytest.raises(AssertionError, match=hint):
        check(wrong)


@pytest.mark.parametrize("check", [ex06.check_forward_kl, ex06.check_temperature, ex06.check_topk_memory,
                                   ex07.check_width_layer_params, ex07.check_layers_to_drop, ex07.check_prune_first])
def test_none_is_not_attempted(check, capsys):
    check(None)
    assert "not attempted" in capsys.readouterr().out


def keep_neurons(a, k):  # the library's own ranking: mean |a| per neuron, top k, in index order
    return a.abs().mean(0).topk(k).indices.sort().values


def test_ex07_code_solution_passes(capsys):
    ex07.check_keep_neurons(keep_neurons)
    assert "correct on all 3 cases" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [
    lambda a, k: a.mean(0).topk(k).indices.sort().values,  # signed mean
    lambda a, k: a.abs().mean(0).topk(k).indices,  # not sorted
    lambda a, k: a.abs().mean(0).topk(k, largest=False).indices.sort().values,  # the pruned ones
])
def test_ex07_code_wrong_solutions_fail(wrong):
    with pytest.raises(AssertionError, match="keep_neurons"):
        ex07.check_keep_neurons(wrong)


def test_ex07_code_stub_is_not_attempted(capsys):
    def stub(a, k):
        raise NotImplementedError

    ex07.check_keep_neurons(stub)
    assert "not attempted" in capsys.readouterr().out


def kd_loss(student_logits, teacher_logits, T):  # the library's own loss
    from shrinklib.distill import forward_kl

    return forward_kl(student_logits, teacher_logits, T)


def test_ex06_code_solution_passes(capsys):
    ex06.check_kd_loss(kd_loss)
    assert "correct on all 3 cases" in capsys.readouterr().out


@pytest.mark.parametrize("wrong", [
    lambda s, t, T: kd_loss(t, s, T),  # reverse KL
    lambda s, t, T: kd_loss(s, t, T) / T**2,  # without the T² factor
    lambda s, t, T: kd_loss(s, t, 1.0),  # temperature ignored
])
def test_ex06_code_wrong_solutions_fail(wrong):
    with pytest.raises(AssertionError, match="kd_loss"):
        ex06.check_kd_loss(wrong)


def test_ex06_code_stub_is_not_attempted(capsys):
    def stub(s, t, T):
        raise NotImplementedError

    ex06.check_kd_loss(stub)
    assert "not attempted" in capsys.readouterr().out
