"""The shared input checks: typed config fields, token ids, devices, vocabularies, plain names,
already-quantized models and YAML keys given twice."""

import pytest
import torch
from common import make_picollama, random_ids

from shrinklib.checks import (DeviceError, TokenIdsError, TokenizerMismatchError, VocabularyMismatchError,
                              check_device, check_not_quantized, check_plain_name, check_shared_vocabulary,
                              check_token_ids, load_yaml, type_name, type_ok)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("make, message", [
    (lambda: __import__("shrinklib.quant", fromlist=["RTNConfig"]).RTNConfig(symmetric="false"),
     r"RTNConfig: symmetric must be true or false, got 'false' \(str\)"),
    (lambda: __import__("shrinklib.prune", fromlist=["PruneConfig"]).PruneConfig(sparsity="0.5"),
     r"PruneConfig: sparsity must be a number, got '0.5' \(str\)"),
    (lambda: __import__("shrinklib.quant", fromlist=["GPTQConfig"]).GPTQConfig(bits=4.0),
     r"GPTQConfig: bits must be an integer, got 4.0"),
    (lambda: __import__("shrinklib.quant", fromlist=["AWQConfig"]).AWQConfig(clip=1),
     r"AWQConfig: clip must be true or false, got 1"),
    (lambda: __import__("shrinklib.quant", fromlist=["SmoothQuantConfig"]).SmoothQuantConfig(alpha=float("nan")),
     r"SmoothQuantConfig: alpha is NaN"),
    (lambda: __import__("shrinklib.train", fromlist=["TrainConfig"]).TrainConfig(progress="no"),
     r"TrainConfig: progress must be true or false"),
    (lambda: __import__("shrinklib.distill", fromlist=["KDConfig"]).KDConfig(temperature="2"),
     r"KDConfig: temperature must be a number"),
    (lambda: __import__("shrinklib.moe", fromlist=["MoEConfig"]).MoEConfig(top_k=True),
     r"MoEConfig: top_k must be an integer, got True"),
    (lambda: __import__("shrinklib.prune.slicegpt", fromlist=["SliceGPTConfig"]).SliceGPTConfig(d_kept="64"),
     r"SliceGPTConfig: d_kept must be an integer or null"),
    (lambda: __import__("shrinklib.prune.llm_pruner", fromlist=["LLMPrunerConfig"]).LLMPrunerConfig(ratio=None),
     r"LLMPrunerConfig: ratio must be a number, got None"),
])
def test_config_fields_check_their_types(make, message):
    """A string where a bool or number belongs is refused, never read as true or passed on."""
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_type_ok_and_names():
    import numpy as np

    assert type_ok(3, int) and type_ok(np.int64(3), int) and not type_ok(True, int) and not type_ok(3.0, int)
    assert type_ok(np.bool_(True), bool) and not type_ok(1, bool) and not type_ok("false", bool)
    assert type_ok(3, float) and type_ok(np.float32(0.5), float) and not type_ok(False, float)
    assert type_ok(None, int | None) and not type_ok("x", int | None) and type_ok("tensor", int | str | None)
    assert type_name(int | None) == "an integer or null" and type_name(bool) == "true or false"


@pytest.mark.parametrize("ids, kw, message", [
    (torch.zeros(2, 4), {}, "must hold integer token ids, got dtype torch.float32"),
    (torch.zeros(8, dtype=torch.long), {}, r"must be 2-D \(n, L\).*got shape \(8,\)"),
    (torch.zeros(2, 0, dtype=torch.long), {}, r"needs at least 1 token\(s\) per sequence, got shape \(2, 0\)"),
    (torch.tensor([[1, 128]]), {}, r"ids in \[1, 128\] but the model's vocabulary is \[0, 128\)"),
    (torch.tensor([[-1, 3]]), {}, r"ids in \[-1, 3\]"),
    (torch.ones(1, 300, dtype=torch.long), {}, "300 tokens per sequence, more than the model's context of 256"),
    ([[1, 2]], {}, "must be a torch tensor of token ids, got list"),
    (torch.ones(1, dtype=torch.long), {"ndim": 1, "min_len": 2}, r"at least 2 token\(s\)"),
])
def test_token_ids_are_checked_against_the_model(ids, kw, message):
    with pytest.raises(TokenIdsError, match=message):
        check_token_ids(ids, make_picollama(vocab=128), **kw)
    check_token_ids(random_ids(2, 8, 128), make_picollama(vocab=128))  # good ids pass


def test_every_entry_point_checks_token_ids():
    """calib.sequential, evaluation, speculative decoding and proxy tuning refuse out-of-vocabulary ids."""
    from shrinklib.calib import sequential
    from shrinklib.evaluate import perplexity
    from shrinklib.proxy import ProxyTuningLogitsProcessor
    from shrinklib.speculative import speculative_generate

    model, bad = make_picollama(vocab=64), torch.tensor([[5, 64, 7]])
    with pytest.raises(TokenIdsError, match="calibration input_ids holds ids in"):
        sequential(model, bad, lambda s: None, progress=False)
    with pytest.raises(TokenIdsError, match="evaluation ids holds ids in"):
        perplexity(model, bad[0])
    with pytest.raises(TokenIdsError, match="input_ids holds ids in"):
        speculative_generate(model, model, bad, 4)
    with pytest.raises(TokenIdsError, match="proxy tuning's input_ids holds ids in"):
        ProxyTuningLogitsProcessor(model, model)(bad, torch.zeros(1, 64))


def test_devices_this_machine_lacks_are_refused_with_the_reason():
    assert check_device("cpu") == torch.device("cpu")
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match="without CUDA|no CUDA GPU is visible|CUDA GPU\\(s\\)"):
        check_device(missing)
    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        check_device("gpu")


def test_cuda_without_a_gpu_is_refused_before_loading(monkeypatch):
    import shrinklib.models as models

    monkeypatch.setattr(models, "resolve_model_path", lambda *a: pytest.fail("model looked up for a missing device"))
    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(DeviceError, match=f"device '{missing}'"):
        models.load_model("smollm2-135m", device=missing)


def test_vocabulary_rule_of_assisted_generation():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def tok(words):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)},
                                                                             unk_token=words[0])), unk_token=words[0])

    check_shared_vocabulary({"a": 100, "b": 100})  # one size: one tokenizer assumed
    with pytest.raises(VocabularyMismatchError, match="vocabulary sizes differ \\(the a 100, the b 64 tokens\\)"):
        check_shared_vocabulary({"a": 100, "b": 64})
    same = [tok(["<unk>", "x", "y"]), tok(["<unk>", "x", "y"])]
    check_shared_vocabulary({"a": 100, "b": 64}, same)  # padded vocabularies of one tokenizer
    with pytest.raises(VocabularyMismatchError):
        check_shared_vocabulary({"a": 100, "b": 64}, same, allow_padding=False)
    with pytest.raises(TokenizerMismatchError, match="must share one tokenizer"):
        check_shared_vocabulary({"a": 100, "b": 100}, [tok(["<unk>", "x", "y"]), tok(["<unk>", "y", "x"])])
    with pytest.raises(VocabularyMismatchError, match="ids up to 2"):
        check_shared_vocabulary({"a": 100, "b": 2}, same)


@pytest.mark.parametrize("name", ["/abs/path", "../x", "", "a/b", ".", "..", ".hidden", "~x", " model"])
def test_plain_names(name):
    with pytest.raises(ValueError, match="name"):
        check_plain_name(name)
    assert check_plain_name("model-4bit.v2") == "model-4bit.v2"


def test_already_quantized_models_are_named():
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama(hidden=64, intermediate=128)
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=False)
    with pytest.raises(ValueError, match=r"quantize_ with GPTQConfig: this model is already quantized \(QuantLinear\)"):
        from shrinklib.quant import GPTQConfig

        quantize_(model, GPTQConfig(), random_ids(2, 8))
    with pytest.raises(ValueError, match="already quantized"):
        check_not_quantized(model)


def test_yaml_keys_given_twice_are_refused():
    assert load_yaml("a: 1\nb: {c: 2}\n") == {"a": 1, "b": {"c": 2}}
    with pytest.raises(ValueError, match=r"key 'bits' is given twice in one mapping \(lines 2 and 3\)"):
        load_yaml("steps:\n  - rtn: {bits: 4,\n          bits: 3}\n")


def test_every_entry_point_refuses_sequences_longer_than_the_context():
    """The same entry points refuse sequences beyond max_position_embeddings (256 here) with the lengths."""
    from shrinklib.calib import sequential
    from shrinklib.evaluate import perplexity
    from shrinklib.proxy import ProxyTuningLogitsProcessor
    from shrinklib.speculative import speculative_generate

    model, long = make_picollama(vocab=64), random_ids(1, 300, 64)
    with pytest.raises(TokenIdsError, match="calibration input_ids has 300 tokens per sequence, more than the model's context of 256"):
        sequential(model, long, lambda s: None, progress=False)
    with pytest.raises(ValueError, match="seq_len=300 exceeds the model's context of 256 tokens"):
        perplexity(model, long[0], seq_len=300)
    with pytest.raises(TokenIdsError, match="input_ids has 300 tokens per sequence, more than the model's context of 256"):
        speculative_generate(model, model, long, 4)
    with pytest.raises(TokenIdsError, match="proxy tuning's input_ids has 300 tokens per sequence"):
        ProxyTuningLogitsProcessor(model, model)(long, torch.zeros(1, 64))


@pytest.mark.parametrize("ids, message", [
    (torch.zeros(1, 4), "must hold integer token ids"),
    (torch.zeros(4, dtype=torch.long), r"must be 2-D \(n, L\)"),
    (torch.zeros(1, 0, dtype=torch.long), r"needs at least 1 token\(s\)"),
])
def test_entry_points_refuse_ids_of_the_wrong_type_shape_or_length(ids, message):
    from shrinklib.calib import sequential
    from shrinklib.proxy import ProxyTuningLogitsProcessor
    from shrinklib.speculative import speculative_generate

    model = make_picollama(vocab=64)
    with pytest.raises(TokenIdsError, match=message):
        sequential(model, ids, lambda s: None, progress=False)
    with pytest.raises(TokenIdsError, match=message):
        speculative_generate(model, model, ids, 4)
    with pytest.raises(TokenIdsError, match=message):
        ProxyTuningLogitsProcessor(model, model)(ids, torch.zeros(1, 64))
