"""k-quants (Q4_K, Q6_K): our encoder's bytes decode, through the `gguf` package's own decoder, to
exactly the weights our encoder says they hold; errors shrink with bits and with an importance
matrix where it matters; the importance matrix is the mean x² of each layer's inputs; a GGUF of
k-quants reloads in transformers to exactly the logits of the weights it stores."""

import numpy as np
import pytest
import torch
from common import make_picollama, random_ids
from gguf import GGMLQuantizationType, quants

from shrinklib.export import export_gguf
from shrinklib.kquants import importance_matrix, quantize_k

pytestmark = pytest.mark.usefixtures("one_thread")


def _gguf_decode(raw: np.ndarray, kind: str, shape) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[kind]).reshape(shape).copy())


@pytest.mark.parametrize("kind, nbytes", [("Q4_K", 144), ("Q6_K", 210)])
@pytest.mark.parametrize("shape", [(3, 256), (5, 768)])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_decode_to_what_the_encoder_says(kind, nbytes, shape, with_imatrix):
    g = torch.Generator().manual_seed(shape[1])
    W = torch.randn(shape, generator=g) * (torch.rand(shape[0], 1, generator=g) * 3 + 0.01)
    W[0, :256] = 0  # an all-zero super-block
    W[-1, 5] = 40.0  # an outlier
    imatrix = torch.rand(shape[1], generator=g) ** 3 if with_imatrix else None
    raw, back = quantize_k(W, kind, imatrix)
    assert raw.dtype == np.uint8 and raw.shape == (shape[0], shape[1] // 256 * nbytes)
    torch.testing.assert_close(_gguf_decode(raw, kind, shape), back, rtol=0, atol=0)
    assert (back[0, :256] == 0).all()


def test_error_falls_with_bits_and_the_imatrix_protects_important_columns():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 512, generator=g)
    imatrix = torch.ones(512)
    imatrix[::7] = 100.0  # a few input columns that the calibration data drive hard
    err = {}
    for kind in ("Q4_K", "Q6_K"):
        for name, im in (("plain", None), ("imatrix", imatrix)):
            back = quantize_k(W, kind, im)[1]
            err[kind, name] = ((back - W).pow(2) * imatrix).sum().item()  # the output error the imatrix predicts
    assert err["Q6_K", "plain"] < err["Q4_K", "plain"] / 8  # two more bits: ≈ 16× less squared error
    for kind in ("Q4_K", "Q6_K"):
        assert err[kind, "imatrix"] < err[kind, "plain"]
    rel = ((quantize_k(W, "Q4_K")[1] - W).norm() / W.norm()).item()
    assert rel < 0.1  # a 16-level grid per 32 weights: ≈ 7% relative error on Gaussian weights


def test_rows_must_hold_whole_super_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.randn(2, 576), "Q4_K")


def test_importance_matrix_is_the_mean_square_of_each_input():
    from shrinklib.calib import capture_block_inputs

    model, ids = make_picollama(), random_ids(3, 12)
    im = importance_matrix(model, ids)
    assert len(im) == 14 and im["model.layers.0.self_attn.q_proj"].shape == (32,)
    hidden, _ = capture_block_inputs(model, ids)
    x = model.model.layers[0].input_layernorm(hidden).reshape(-1, 32)  # what q/k/v read
    torch.testing.assert_close(im["model.layers.0.self_attn.k_proj"], x.pow(2).mean(0))


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K"])
def test_gguf_k_quants_reload_exactly_the_stored_weights(tmp_path, fmt):
    model = make_picollama(hidden=256, intermediate=512, layers=1, vocab=128)
    calib = random_ids(4, 32)
    report = export_gguf(model, tmp_path / "m.gguf", fmt=fmt, imatrix=importance_matrix(model, calib))
    assert report.ok and report.max_abs_logit_diff == 0 and report.tolerance == 0
    assert report.tensor_types == {fmt: 7, "Q8_0": 2, "F32": 3}  # block linears, embedding + head, norms
    assert report.float_rel_logit_diff > 0  # lossy against the float model (reported, not bounded here)


def test_llama_cpp_perplexity_of_a_k_quant_gguf_matches_ours(tmp_path):
    """Where llama-cpp-python is installed (optional): SmolLM2 exported as Q6_K (rows of 576 fall back
    to Q8_0) scores the same perplexity in llama.cpp as in transformers on the same tokens, within
    2%: llama.cpp rounds the activations to 8 bits inside its quantized dot products, which moves a
    perplexity by well under 1% at these bit widths."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import math

    from shrinklib.data import calibration_batch, load_corpus
    from shrinklib.evaluate import perplexity
    from shrinklib.export import load_gguf
    from shrinklib.models import load_model

    model, tok = load_model()
    corpus = load_corpus()
    path = tmp_path / "smollm2-q6_k.gguf"
    export_gguf(model, path, tokenizer=tok, fmt="Q6_K",
                imatrix=importance_matrix(model, calibration_batch(corpus, tok, n=4, seq_len=128)))
    ids = corpus.tokens(tok, "eval", max_tokens=256)
    ours = perplexity(load_gguf(path), ids, seq_len=256, max_tokens=256).ppl
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=1, verbose=False)
    llm.eval(ids.tolist())
    logits = torch.tensor(np.asarray(llm.scores)[: len(ids) - 1], dtype=torch.float64)  # (L-1, V)
    nll = torch.nn.functional.cross_entropy(logits, ids[1:].long(), reduction="mean").item()
    assert abs(math.exp(nll) / ours - 1) < 0.02
