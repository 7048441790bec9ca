"""KV-cache quantization: the quantizers against a slow reference and hand-computed cases, the cache
against DynamicCache and against the one-pass evaluation path, and its byte count against its tensors."""

import pytest
import torch
from common import make_picollama, random_ids
from transformers import DynamicCache

from shrinklib.kvcache import (KVQuantCache, KVQuantConfig, PackedBlock, fake_quantize_kv, kv_quant_cache_bytes,
                               kv_quantized_attention, n_quantized, quantize_keys_values)
from shrinklib.params import kv_cache_bytes


def slow_fake_quantize(x, bits, axis, group):
    """Loop over rows and groups: a zero-point grid with float16 s and s·z, as the suite stores grids."""
    b, h, t, d = x.shape
    out = torch.empty_like(x)
    for i in range(b):
        for j in range(h):
            M = x[i, j] if axis == "token" else x[i, j].T  # rows are grouped along their length
            R = torch.empty_like(M)
            g = min(group, M.shape[1])
            for r in range(M.shape[0]):
                for s0 in range(0, M.shape[1], g):
                    w = M[r, s0:s0 + g]  # float32 throughout
                    lo, hi = w.min(), w.max()
                    s = (hi - lo) / (2**bits - 1) if hi > lo else torch.tensor(1.0)
                    z = -lo / s
                    s = s.clamp_min(2.0**-24).half().float()  # stored: float16 s and s·z
                    z = (s * z).half().float() / s
                    q = torch.clamp(torch.round(w / s + z), 0, 2**bits - 1)
                    R[r, s0:s0 + g] = s * (q - z)
            out[i, j] = R if axis == "token" else R.T
    return out


@pytest.mark.parametrize("shape", [(1, 1, 13, 7), (2, 3, 9, 16), (1, 2, 40, 5)])
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits,group", [(2, 4), (4, 5), (8, 32), (3, 3)])
def test_fake_quantize_equals_the_slow_reference(shape, axis, bits, group):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
    x[..., 0] += 20.0  # an outlier channel, as keys have
    torch.testing.assert_close(fake_quantize_kv(x, bits, axis, group), slow_fake_quantize(x, bits, axis, group),
                               rtol=0, atol=1e-5)


def test_hand_computed_per_channel_beats_per_token_on_an_outlier_channel():
    # 4 tokens × 3 channels; channel 1 is an outlier channel (offset 10), as in KIVI's keys
    K = torch.tensor([[0.0, 10.0, 4.0], [1.0, 11.0, 5.0], [2.0, 12.0, 6.0], [3.0, 13.0, 7.0]])[None, None]
    # per channel, 2 bits, one group of 4 tokens: every channel is 4 equally spaced values -> exact
    assert torch.equal(fake_quantize_kv(K, 2, "channel", 4), K)
    # per token: token 0 spans [0, 10], s = 10/3, so channel 2's 4.0 lands on code 1 (≈ 3.33)
    tok = fake_quantize_kv(K, 2, "token", 3)[0, 0]
    assert abs(tok[0, 2].item() - 10 / 3) < 2e-3 and (tok - K[0, 0]).abs().max() > 0.6


def test_n_quantized_by_hand():
    assert [n_quantized(i, 3, 4) for i in range(12)] == [0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 8]
    assert [n_quantized(i, 0, 1) for i in range(4)] == [0, 1, 2, 3]  # every past token, never the current one
    assert n_quantized(torch.arange(12), 3, 4).tolist() == [n_quantized(i, 3, 4) for i in range(12)]


@pytest.mark.parametrize("shape", [(1, 2, 4, 8), (2, 3, 5, 7), (1, 1, 33, 64)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_block_reads_back_the_grid(shape, bits):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    for axis in ("token", "channel"):
        blk = PackedBlock.pack(x, bits, axis, 4)
        assert torch.equal(blk.dequantize(torch.float32), fake_quantize_kv(x, bits, axis, 4))
        n = x.numel()
        assert blk.packed.numel() == -(-n // 32) * 32 * bits // 8  # codes packed to `bits` each


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="bits"):
        KVQuantConfig(bits=12)
    with pytest.raises(ValueError, match="key_axis"):
        KVQuantConfig(key_axis="head")
    with pytest.raises(ValueError, match="group"):
        KVQuantConfig(group=0)
    with pytest.raises(TypeError):
        KVQuantConfig(residual="32")


SPECS = [
    KVQuantConfig(bits=2, group=4, residual=3),  # KIVI: keys per channel, values per token, a float window
    KVQuantConfig(bits=4, key_axis="token", group=8, residual=0),
    KVQuantConfig(bits=2, key_axis="token", value_axis="channel", group=5, residual=7),
    KVQuantConfig(bits=2, group=4, residual=5, rotate_keys=True),
    KVQuantConfig(bits=8, group=3, residual=1),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_one_pass_attention_equals_the_cache_token_by_token(spec):
    """The evaluation path (a plain forward in `kv_quantized_attention`) gives every position the
    logits the cache gives a token decoded there; both differ from the float model."""
    model = make_picollama()
    ids = random_ids(2, 37)
    with torch.no_grad():
        with kv_quantized_attention(model, spec):
            full = model(ids, use_cache=False).logits
        cache = KVQuantCache(model.config, spec)
        steps = torch.cat([model(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits
                           for i in range(ids.shape[1])], dim=1)
        ref = model(ids, use_cache=False).logits
    # Equal up to float32 reordering: decoding computes each key from a one-token matmul, whose last bits
    # can move a value across a rounding boundary of the grid (one step of an 8-bit grid moves these logits 3e-5)
    torch.testing.assert_close(full, steps, rtol=0, atol=1e-4)
    assert (full - ref).abs().max() > 1e-4  # the quantization is really applied
    assert model.config._attn_implementation != "shrinklib_kv_quant"  # the context restored the model


def test_float_setting_equals_dynamic_cache_exactly():
    model = make_picollama()
    ids = random_ids(1, 10)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    a = model.generate(ids, past_key_values=DynamicCache(), **kw)
    b = model.generate(ids, past_key_values=KVQuantCache(model.config, KVQuantConfig(bits=16)), **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))
    with torch.no_grad(), kv_quantized_attention(model, KVQuantConfig(bits=16)):
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_8bit_greedy_generation_agrees_with_float():
    """At 8 bits (every past token quantized) greedy decoding picks the float model's tokens, and its
    scores stay within 1e-2 of float's (a 256-level grid on values of order 1)."""
    model = make_picollama()
    spec = KVQuantConfig(bits=8, key_axis="token", group=4, residual=0)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    for seed in range(3):
        ids = random_ids(1, 12, seed=seed)
        a = model.generate(ids, past_key_values=DynamicCache(), **kw)
        b = model.generate(ids, past_key_values=KVQuantCache(model.config, spec), **kw)
        assert torch.equal(a.sequences, b.sequences)
        assert max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) < 1e-2


@pytest.mark.parametrize("spec", SPECS[:3] + [KVQuantConfig(bits=16)], ids=str)
def test_memory_formula_equals_the_stored_tensors(spec):
    model = make_picollama()
    ids = random_ids(3, 29)
    cache = KVQuantCache(model.config, spec)
    with torch.no_grad():
        model(ids[:, :11], past_key_values=cache, use_cache=True)  # a prefill, then token by token
        assert cache.nbytes() == kv_quant_cache_bytes(model.config, 11, spec, batch=3, float_bytes=4)
        for i in range(11, ids.shape[1]):
            model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            assert cache.nbytes() == kv_quant_cache_bytes(model.config, i + 1, spec, batch=3, float_bytes=4)
    assert cache.get_seq_length() == ids.shape[1]
    if not spec.quantized:
        assert cache.nbytes() == kv_cache_bytes(model.config, ids.shape[1], batch=3, bytes_per_value=4)


def test_rotation_spreads_an_outlier_channel():
    """Per-token 2-bit keys with one large channel: the rotation (orthogonal, so attention scores are
    unchanged in float) lowers the keys' error, as QuaRot's argument says."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(1, 2, 64, 64, generator=g), torch.randn(1, 2, 64, 64, generator=g)
    k[..., 5] *= 30.0
    spec = KVQuantConfig(bits=2, key_axis="token", group=64)
    from shrinklib.quant.rotation import random_hadamard
    H = random_hadamard(64, 0)
    plain, _ = quantize_keys_values(k, v, spec)
    rotated, _ = quantize_keys_values(k, v, spec, H)
    assert (rotated - k).norm() < 0.7 * (plain - k).norm()  # 0.58 here
