"""The decode path: a static KV cache and a compiled one-token step give the tokens of the plain
`transformers` greedy loop, for float weights and for weights on the LUT kernel (whose operators
run inside the compiled graph)."""

import pytest
import torch

from shrinklib.decode import Decoder, enable_compile_cache
from shrinklib.kernels import modules as Mo

from common import make_picollama, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_greedy(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_static_cache_decode_equals_transformers_greedy():
    model, ids = make_picollama(0, hidden=64, intermediate=96), random_ids(1, 7, seed=3)
    out = Decoder(model, max_len=32, compile=False).generate(ids, 12)
    assert out.tokens == hf_greedy(model, ids, 12) and len(out.step_seconds) == 11
    assert out.tokens_per_second > 0


def test_compiled_decode_gives_the_eager_tokens(tmp_path, monkeypatch):
    """One compile (a 2-layer model on the LUT kernel): the same greedy tokens as the eager static
    step; the compiled graphs land in the compile cache. The logits are not bit-identical: inductor
    fuses the norms, the rotary embedding and the attention, which moves activations by float32
    rounding, and where a T-MAC table entry sits at a rounding boundary of its int8 grid that
    becomes one code (1/254 of a 64-input chunk's range). Compared at 1% of the logits' norm."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, ids = make_picollama(1, hidden=64, intermediate=96), random_ids(1, 5, seed=4)
    Mo.replace_linears_(model, "lut4", lm_head=True)
    eager = Decoder(model, max_len=24, compile=False)
    compiled = Decoder(model, max_len=24, compile=True)
    a, b = eager.generate(ids, 8), compiled.generate(ids, 8)
    assert a.tokens == b.tokens
    assert compiled.warmup_seconds > 0 and eager.warmup_seconds is None
    la, lb = eager.step(a.tokens[-1], ids.shape[1] + 7), compiled.step(a.tokens[-1], ids.shape[1] + 7)
    assert (lb - la).norm() <= 0.01 * la.norm()
    assert any((tmp_path / "inductor").rglob("*")), "nothing in the compile cache"


def test_bad_arguments_are_refused():
    model = make_picollama()
    with pytest.raises(ValueError, match="max_len"):
        Decoder(model, max_len=1, compile=False)
    dec = Decoder(model, max_len=8, compile=False)
    with pytest.raises(ValueError, match="max_len"):
        dec.generate(random_ids(1, 5), 4)
    with pytest.raises(ValueError, match="position"):
        dec.step(3, 8)


def test_compile_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "env"))
    assert enable_compile_cache() == tmp_path / "env"
    assert enable_compile_cache(tmp_path / "c") == tmp_path / "c" and (tmp_path / "c").is_dir()
