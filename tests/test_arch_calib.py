import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from common import make_picollama, make_picoopt, random_ids
from shrinklib.arch import UnsupportedArchitectureError, blocks, layout, linears, named_linears, set_module
from shrinklib.calib import capture_block_inputs, collect_input_stats, run_block, sequential


@pytest.mark.parametrize("make", [make_picollama, make_picoopt])
def test_blocks_run_one_by_one_reproduce_the_model(make):
    model, ids = make(), random_ids()
    hidden, kwargs = capture_block_inputs(model, ids)
    for block in blocks(model):
        hidden = run_block(block, hidden, kwargs, batch_size=3)
    ref = model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(layout(model).final_norm(model)(hidden), ref, rtol=0, atol=0)


def test_llama_linears_and_roles():
    model = make_picollama()
    names = list(linears(blocks(model)[0]))
    assert names == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert set(layout(model).roles()) == set(names)
    assert len(named_linears(model)) == 14


def test_unsupported_architecture_is_named():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        layout(gpt2)
    with pytest.raises(UnsupportedArchitectureError):
        sequential(gpt2, torch.zeros(1, 4, dtype=torch.long), lambda s: None)


def test_input_stats_match_a_direct_computation():
    model, ids = make_picollama(), random_ids(n=3, length=10)
    hidden, kwargs = capture_block_inputs(model, ids)
    block = blocks(model)[0]
    x = block.input_layernorm(hidden).reshape(-1, 32)  # what q/k/v see: (tokens, in)
    stats = collect_input_stats(block, lambda: run_block(block, hidden, kwargs, batch_size=2))
    s = stats["self_attn.q_proj"]
    assert s.n == 30
    torch.testing.assert_close(s.hessian, 2 * x.T @ x / 30, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.sq_sum, (x * x).sum(0))
    torch.testing.assert_close(s.abs_max, x.abs().amax(0))
    torch.testing.assert_close(stats["self_attn.k_proj"].hessian, s.hessian)


def test_sequential_feeds_each_block_the_changed_outputs():
    model, ids = make_picollama(), random_ids()
    seen = []

    def step(s):
        seen.append((s.index, s.hidden.clone()))
        if s.index == 0:  # make block 0 the identity: its residual branches output zero
            for path in ("self_attn.o_proj", "mlp.down_proj"):
                linears(s.block)[path].weight.data.zero_()

    sequential(model, ids, step, progress=False)
    assert [i for i, _ in seen] == [0, 1]
    torch.testing.assert_close(seen[1][1], seen[0][1], rtol=0, atol=0)


def test_set_module_replaces_a_linear():
    block = blocks(make_picollama())[0]
    new = torch.nn.Linear(32, 32, bias=False)
    set_module(block, "self_attn.q_proj", new)
    assert block.self_attn.q_proj is new
