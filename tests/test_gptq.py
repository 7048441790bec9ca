"""GPTQ: identity Hessian = RTN; lower reconstruction error than RTN on every layer; any decoder."""

import pytest
import torch
from torch import nn

from shrinklib.arch import UnsupportedArchitectureError, linears
from shrinklib.calib import collect_input_stats, sequential
from shrinklib.quant import GPTQConfig, QuantLinear, gptq_quantize, gptq_quantize_mx, quantize_, quantize_rtn
from shrinklib.quant.formats import dequantize_codes, int_params, resolve_group_size

from common import make_picollama, make_picoopt, random_ids


@pytest.mark.parametrize("group_size", [None, 16, 24])
@pytest.mark.parametrize("symmetric", [False, True])
def test_identity_hessian_equals_rtn(group_size, symmetric):
    W = torch.randn(10, 56)  # 56 = 3×16 + 8, 2×24 + 8: short last groups
    q, s, z = gptq_quantize(W, torch.eye(56), bits=3, group_size=group_size, symmetric=symmetric, block_size=16)
    assert torch.equal(dequantize_codes(q, s, z, group_size or 56), quantize_rtn(W, 3, group_size, symmetric))


def _correlated_inputs(n=512, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 0.1 * torch.randn(d, generator=g)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 16, 20])
def test_gptq_beats_rtn_on_layer_output_error(act_order, group_size):
    X = _correlated_inputs()
    W = torch.randn(24, 48)
    H = 2 * X.T @ X / X.shape[0]
    q, s, z = gptq_quantize(W, H, 3, group_size, act_order=act_order, block_size=8)
    assert q.max() <= 7 and s.shape == (24, -(-48 // (group_size or 48)))
    err_gptq = ((dequantize_codes(q, s, z, group_size or 48) - W) @ X.T).pow(2).sum()
    err_rtn = ((quantize_rtn(W, 3, group_size) - W) @ X.T).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn


def plain_gptq(W, H, s, z, bits, damp=0.01):
    """GPTQ written as plainly as the paper states it, for comparison: per channel (the grid s, z (out,)
    given, fitted before any update), columns in order, no lazy batches, no Cholesky. After quantizing
    column j, the remaining columns get δ = -(w_j - q_j) / [H⁻¹]_jj · [H⁻¹]_j,: (Eq. 3), and column j
    is removed from the inverse by one step of Gaussian elimination; float64 throughout. Returns codes."""
    W, H, s, z = W.double().clone(), H.double().clone(), s.double(), z.double()
    d = W.shape[1]
    H += damp * H.diag().mean() * torch.eye(d, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(d):
        Q[:, j] = torch.clamp(torch.round(W[:, j] / s + z), 0, 2**bits - 1)
        err = (W[:, j] - s * (Q[:, j] - z)) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q.to(torch.uint8)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block_size", [5, 128])
def test_equals_a_plain_gptq(symmetric, block_size):
    """Ours (lazy batches, Cholesky, float32) against the plain float64 algorithm on a small layer,
    per channel, on the same grid: the same codes except where float rounding tips one across a
    rounding boundary (the runs then differ a little from that column on), and the same output
    error to 1%."""
    X = _correlated_inputs(n=256, d=40)
    W = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
    H = 2 * X.T @ X / X.shape[0]
    q, s, z = gptq_quantize(W, H, 4, None, symmetric, block_size=block_size)
    q_plain = plain_gptq(W, H, s[:, 0], z[:, 0], 4)
    err = lambda q: torch.trace((dequantize_codes(q, s, z, 40) - W) @ H @ (dequantize_codes(q, s, z, 40) - W).T).item()
    assert (q != q_plain).float().mean() < 0.02
    assert err(q) == pytest.approx(err(q_plain), rel=0.01)
    assert err(q) < 0.8 * torch.trace((quantize_rtn(W, 4, None, symmetric) - W) @ H @ (quantize_rtn(W, 4, None, symmetric) - W).T)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_group_grids_are_fitted_before_the_updates(act_order, symmetric):
    """Static groups in both orders: each group's grid is the RTN grid of the original weights.
    Fitting it on weights already moved by the updates (as the original code does without
    act-order) made 4-bit g64 asymmetric GPTQ of SmolLM2 worse than RTN on held-out text."""
    X = _correlated_inputs(d=48)
    W = torch.randn(10, 48)
    q, s, z = gptq_quantize(W, 2 * X.T @ X / 512, 4, 16, symmetric, block_size=32, act_order=act_order)
    s_rtn, z_rtn = int_params(W, 4, 16, symmetric)
    assert torch.equal(s, s_rtn) and torch.equal(z, z_rtn)


def test_block_size_does_not_change_the_result():
    X = _correlated_inputs(d=40)
    W, H = torch.randn(8, 40), 2 * X.T @ X / 512
    a = gptq_quantize(W, H, 4, 16, block_size=7)
    b = gptq_quantize(W, H, 4, 16, block_size=40)
    torch.testing.assert_close(a[1], b[1])  # group grids fitted on the same (original) weights
    assert (a[0].int() - b[0].int()).abs().max() <= 1  # codes equal up to float rounding of the updates
    assert (a[0] != b[0]).float().mean() < 0.01


def test_rows_are_independent_so_stacking_layers_changes_nothing():
    """gptq_ quantizes linears sharing an input (q/k/v, gate/up) as one stacked matrix."""
    X = _correlated_inputs(d=40)
    H = 2 * X.T @ X / 512
    A, B = torch.randn(8, 40), torch.randn(5, 40)
    qa, sa, za = gptq_quantize(A, H, 3, 16)
    qb, sb, zb = gptq_quantize(B, H, 3, 16)
    q, s, z = gptq_quantize(torch.cat([A, B]), H, 3, 16)
    wa, wb = dequantize_codes(qa, sa, za, 16), dequantize_codes(qb, sb, zb, 16)
    torch.testing.assert_close(dequantize_codes(q, s, z, 16), torch.cat([wa, wb]), rtol=0, atol=1e-5)


def test_model_gptq_equals_layer_by_layer_gptq():
    """The model-level pass (with its stacking of shared-input linears) against a plain per-linear loop."""
    model, ids = make_picollama(), random_ids(8, 32)
    ref = make_picollama()
    cfg = GPTQConfig(bits=3, group_size=16)

    def step(s):
        stats = collect_input_stats(s.block, s.forward, hessian=True)
        for path, lin in linears(s.block).items():
            g = resolve_group_size(cfg.group_size, lin.in_features)
            lin.weight.data.copy_(dequantize_codes(*gptq_quantize(lin.weight, stats[path].hessian, cfg.bits, g), g))

    sequential(ref, ids, step, progress=False)
    quantize_(model, cfg, ids, progress=False)
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_dead_inputs_get_zero_weight():
    X = _correlated_inputs(d=16)
    X[:, 3] = 0
    q, s, z = gptq_quantize(torch.randn(4, 16), 2 * X.T @ X, 4, None)
    # the weight of an input that never fires is set to 0, then rounded to the grid point nearest 0
    assert (dequantize_codes(q, s, z, 16)[:, 3].abs() <= s[:, 0] / 2 + 1e-6).all()


@pytest.mark.parametrize("make", [make_picollama, make_picoopt])
def test_every_layer_beats_rtn_on_its_calibration_inputs(make):
    """Model-level check on the inputs GPTQ saw: each layer's output error below RTN's."""
    model, ids = make(), random_ids(8, 32)
    cfg = GPTQConfig(bits=3, group_size=16)
    errors = {}

    def step(s):
        stats = collect_input_stats(s.block, s.forward, hessian=True)
        for path, lin in linears(s.block).items():
            H = stats[path].hessian
            W = lin.weight.detach()
            g = resolve_group_size(cfg.group_size, W.shape[1])
            Wg = dequantize_codes(*gptq_quantize(W, H, cfg.bits, g), g)
            Wr = quantize_rtn(W, cfg.bits, g)
            err = lambda Wq: torch.trace((Wq - W) @ H @ (Wq - W).T).item()  # = 2/N ‖(Wq - W)X‖²
            errors[f"{s.index}.{path}"] = (err(Wg), err(Wr))
            lin.weight.data.copy_(Wg)

    sequential(model, ids, step, progress=False)
    assert len(errors) == 2 * len(linears(model.model.layers[0] if hasattr(model, "model") and hasattr(model.model, "layers") else model.model.decoder.layers[0]))
    worse = {k: v for k, v in errors.items() if not v[0] < v[1]}
    assert not worse, worse


@pytest.mark.parametrize("make", [make_picollama, make_picoopt])
def test_quantize_model_in_place(make):
    model, ids = make(), random_ids(4, 16)
    ref = model(ids).logits
    seconds = quantize_(model, GPTQConfig(bits=4, group_size=24), ids, progress=False)
    assert seconds > 0
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) in (12, 14) and not any(isinstance(m, nn.Linear) for b in model.modules() for m in [b]
                                             if m is not model.lm_head and isinstance(m, nn.Linear))
    assert all(m.scales.shape[1] == -(-m.in_features // 24) for m in qls)
    out = model(ids).logits
    assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_unsupported_architecture_gets_the_adapter_error():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitectureError, match="not supported"):
        quantize_(Toy(), GPTQConfig(), random_ids(1, 4, vocab=4), progress=False)


def test_gptq_needs_calibration():
    with pytest.raises(ValueError, match="calib_ids"):
        quantize_(make_picollama(), GPTQConfig())
    with pytest.raises(ValueError, match="damp"):
        GPTQConfig(damp=-0.1)


def _tiny(kind):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    cfg = cfg_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_other_decoders(kind):
    model, ids = _tiny(kind), random_ids(4, 16)
    ref = model(ids).logits
    quantize_(model, GPTQConfig(bits=4, group_size=20), ids, progress=False)  # 32 = 20 + 12, 64 = 3×20 + 4
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert (model(ids).logits - ref).abs().mean() < 0.1 * ref.abs().mean()


def column_loop_gptq(W, H, bits, g, symmetric, damp, block_size, act_order):
    """GPTQ as the column loop on (out, in) slices, the formulation `gptq_quantize` had before it
    worked on rows of the transposed weight: kept here to show the rewrite computes the same bits."""
    W, H = W.clone().float(), H.clone().float()
    out, d = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(d)
    scales, zeros = int_params(W, bits, g, symmetric)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(d)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(out, d)
    for i1 in range(0, d, block_size):
        i2 = min(i1 + block_size, d)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            s, z = scales[:, col // g], zeros[:, col // g]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s + z), 0, 2**bits - 1)
            Q[:, i1 + i] = q
            err = (w - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    q = torch.empty_like(Q)
    q[:, perm] = Q
    return q.to(torch.uint8), scales, zeros


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("g,block_size", [(16, 8), (24, 128), (64, 5)])
def test_equals_the_column_loop_bit_for_bit(act_order, symmetric, g, block_size):
    """The transposed, in-place formulation makes the same float operations in the same order."""
    X = _correlated_inputs(n=256, d=72)
    H = 2 * X.T @ X / X.shape[0]
    H[5, :], H[:, 5] = 0, 0  # one dead input
    W = torch.randn(37, 72, generator=torch.Generator().manual_seed(1))
    fast = gptq_quantize(W, H, 3, g, symmetric, 0.01, block_size, act_order)
    slow = column_loop_gptq(W, H, 3, min(g, 72), symmetric, 0.01, block_size, act_order)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_shared_inputs_are_gathered_once():
    """q/k/v and gate/up read one tensor each: one Hessian per input, equal to each linear's own."""
    from shrinklib.arch import blocks
    from shrinklib.calib import capture_block_inputs, run_block
    from shrinklib.quant.apply import shared_input_stats

    model, ids = make_picollama(), random_ids(4, 16)
    hidden, kwargs = capture_block_inputs(model, ids)
    block = blocks(model)[0]
    forward = lambda: run_block(block, hidden, kwargs, 2)  # noqa: E731
    shared = shared_input_stats(block, forward)
    groups = [paths for _, paths in shared.values()]
    assert sorted(map(sorted, groups)) == sorted(map(sorted, [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                                 ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]))
    each = collect_input_stats(block, forward, hessian=True)
    for st, paths in shared.values():
        for path in paths:
            assert torch.equal(st.hessian, each[path].hessian)


# --- GPTQ on the microscaling formats' grids (MXFP4, MXFP8, NVFP4) ---

def _mx_plain_gptq(W, H, S, codes, damp=0.01):
    """The plain float64 loop of `plain_gptq` with the microscaling rounding: column j to the nearest
    element of `codes` times its scale S[:, j] (ties rounded by value, not to the even code); values."""
    W, H = W.double().clone(), H.double().clone()
    d = W.shape[1]
    H += damp * H.diag().mean() * torch.eye(d, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    vals = codes[~codes.isnan()].double()
    Q = torch.zeros_like(W)
    for j in range(d):
        s = S[:, j].double()
        Q[:, j] = vals[(W[:, j, None] / s[:, None] - vals).abs().argmin(1)] * s  # nearest element (saturating)
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


MX_CASES = [("mxfp4", None), ("mxfp8", None), ("nvfp4", None), ("mxfp4", 16)]


@pytest.mark.parametrize("fmt,block", MX_CASES)
def test_mx_identity_hessian_equals_round_to_nearest(fmt, block):
    """With H = I no column moves another: GPTQ's codes and scales are quantize_mx's, bit for bit,
    including a short last block (56 = 32 + 24 = 3×16 + 8) and stacked linears (NVFP4: each keeps its
    own per-tensor scale), and blocks of zeros."""
    from shrinklib.quant.mx import quantize_mx

    A, B = torch.randn(10, 56) * 0.05, torch.randn(6, 56) * 3.0
    A[:, 16:32] = 0.0  # whole blocks of zeros: NVFP4's scale rounds to 0 there
    qts = gptq_quantize_mx(torch.cat([A, B]), torch.eye(56), fmt, block, block_size=16, rows=[10, 6])
    for qt, w in zip(qts, (A, B)):
        ref = quantize_mx(w, fmt, block)
        assert torch.equal(qt.q, ref.q) and torch.equal(qt.scales, ref.scales)
        assert qt.global_scale == ref.global_scale and qt.fmt == fmt


@pytest.mark.parametrize("fmt,block", MX_CASES)
def test_mx_gptq_equals_a_plain_loop_and_beats_rtn(fmt, block):
    """Against the plain float64 loop on the same (fixed) grid: the same dequantized weights except
    where float rounding tips a value across a rounding boundary; the output error ‖(Ŵ - W)X‖ of
    both well below round-to-nearest's."""
    from shrinklib.quant.formats import expand_groups
    from shrinklib.quant.mx import ELEMENTS, dequantize_mx, quantize_mx

    X = _correlated_inputs(n=256, d=40)
    W = torch.randn(12, 40, generator=torch.Generator().manual_seed(3)) * 0.1
    H = 2 * X.T @ X / X.shape[0]
    (qt,) = gptq_quantize_mx(W, H, fmt, block, block_size=7)
    rtn = quantize_mx(W, fmt, block)
    S = expand_groups(rtn.scales * rtn.global_scale, rtn.group_size, 40)  # (out, in)
    plain = _mx_plain_gptq(W, H, S, ELEMENTS[fmt][0]).float()
    ours = dequantize_mx(qt)
    assert (~torch.isclose(ours, plain, rtol=1e-5, atol=0)).float().mean() < 0.05  # float32 vs float64 products
    err = lambda Wq: torch.trace((Wq - W) @ H @ (Wq - W).T).item()  # noqa: E731
    assert err(ours) == pytest.approx(err(plain), rel=0.05)
    assert err(ours) < 0.8 * err(dequantize_mx(rtn))


def test_mx_gptq_through_quantize_and_its_config():
    """MXConfig(method="gptq") runs GPTQ on the format's grid on every block linear: it needs
    calibration ids, and it is never worse than round to nearest on the calibration tokens here."""
    from shrinklib.quant import MXConfig

    with pytest.raises(ValueError, match="method"):
        MXConfig("nvfp4", method="adaround")
    ids = random_ids(8, 32)
    base = make_picollama()
    with pytest.raises(ValueError, match="calib_ids"):
        quantize_(make_picollama(), MXConfig("nvfp4", method="gptq"), progress=False)
    losses = {}
    for method in ("rtn", "gptq"):
        model = make_picollama()
        quantize_(model, MXConfig("nvfp4", method=method), ids if method == "gptq" else None, progress=False)
        assert all(isinstance(m, QuantLinear) and m.fmt == "nvfp4" for m in linears(model.model.layers[0]).values())
        losses[method] = (model(ids).logits - base(ids).logits).pow(2).mean().item()
    assert losses["gptq"] < losses["rtn"]


def test_mx_gptq_with_dead_inputs_stays_finite():
    """Inputs that never fire are zeroed; for NVFP4 a block of them has a zero scale, where the loop
    must neither divide by zero nor spread NaN to the other columns."""
    X = _correlated_inputs(n=256, d=48)
    X[:, 16:32] = 0.0  # a whole NVFP4 block of dead inputs
    W = torch.randn(8, 48) * 0.1
    (qt,) = gptq_quantize_mx(W, 2 * X.T @ X / 256, "nvfp4")
    from shrinklib.quant.mx import dequantize_mx

    Wq = dequantize_mx(qt)
    assert torch.isfinite(Wq).all() and (Wq[:, 16:32] == 0).all() and (qt.q[:, 16:32] == 0).all()
