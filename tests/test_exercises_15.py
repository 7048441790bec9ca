import torch

from shrinklib.exercises.ex15 import (check_bytes_per_token, check_key_bits, check_per_channel_quantize,
                                      check_quantized_tokens)
from shrinklib.kvcache import fake_quantize_kv


def per_channel_quantize(K, bits, group):  # the solution of exercise 4: the library's per-channel grid
    return fake_quantize_kv(K[None, None], bits, "channel", group)[0, 0]


def test_solutions_pass(capsys):
    check_bytes_per_token(2 * 30 * 3 * 64 * 2)
    check_key_bits(3.0)
    check_quantized_tokens(160)
    check_per_channel_quantize(per_channel_quantize)
    assert capsys.readouterr().out.count("correct") == 4


def test_a_per_token_solution_fails_exercise_4():
    def per_token(K, bits, group):  # groups along the wrong axis
        return fake_quantize_kv(K[None, None], bits, "token", group)[0, 0]

    try:
        check_per_channel_quantize(per_token)
    except AssertionError as err:
        assert "hint" in str(err)
    else:
        raise AssertionError("a per-token grid passed the per-channel exercise")


def test_the_arithmetic_answers_are_the_librarys(tiny_config=None):
    from transformers import LlamaConfig

    from shrinklib.kvcache import KVQuantConfig, kv_quant_cache_bytes, n_quantized
    from shrinklib.params import kv_cache_bytes

    smollm2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert kv_cache_bytes(smollm2, tokens=1) == 2 * 30 * 3 * 64 * 2
    assert n_quantized(300, 128, 32) == 160
    # 2-bit keys and values, both per channel in groups of 32 tokens: 3 bits a value once no token is float
    spec = KVQuantConfig(bits=2, key_axis="channel", value_axis="channel", group=32, residual=0)
    assert kv_quant_cache_bytes(smollm2, 320, spec) * 8 == 3 * 2 * 30 * 3 * 64 * 320
