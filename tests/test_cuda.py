"""The GPU paths give the CPU's results: evaluation, layer-by-layer calibration (GPTQ, Wanda)
with the blocks computed on the GPU, training, MoE upcycling, merging, speculative decoding and
reward models on CUDA tensors. Skipped where no CUDA device is present; run them on a GPU
machine before relying on a notebook's `device="cuda"`."""

import copy

import pytest
import torch
from common import make_picollama, random_ids

from shrinklib.evaluate import perplexity
from shrinklib.merge import METHODS, merge_state_dicts
from shrinklib.moe import MoEConfig, upcycle_
from shrinklib.prune import PruneConfig, prune_
from shrinklib.quant.apply import gptq_
from shrinklib.quant.config import GPTQConfig
from shrinklib.speculative import greedy_generate, speculative_generate
from shrinklib.train import TrainConfig, causal_lm_loss, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """Full float32 on the GPU (no TF32), so GPU and CPU differ only in summation order."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_perplexity_on_gpu_equals_cpu():
    model, ids = make_picollama(0), random_ids(1, 400)[0]
    cpu = perplexity(model, ids, seq_len=64)
    gpu = perplexity(copy.deepcopy(model).to(CUDA), ids, seq_len=64)
    assert gpu.n_tokens == cpu.n_tokens
    assert gpu.ppl == pytest.approx(cpu.ppl, rel=1e-4)  # float32 sums in another order


def test_calibration_on_gpu_matches_cpu():
    """The model stays on the CPU; each block is moved to the GPU to collect statistics and run
    the algorithm. GPU and CPU round differently in the last bit. For GPTQ that changes each
    group's fitted scale by ~1e-7 relative, hence every dequantized weight by as little, and may
    move a weight across a rounding boundary: one grid step, ~1/15 of its group's range at 4 bits.
    So the weights must agree within 1e-4 of the layer's largest weight (the same code) on all
    but 1% of entries, and the models' outputs must agree. Wanda may reorder near-ties only."""
    calib = random_ids(8, 32, seed=1)
    ref, gpu = make_picollama(0), make_picollama(0)
    gptq_(ref, calib, GPTQConfig(bits=4, group_size=32), None, progress=False)
    gptq_(gpu, calib, GPTQConfig(bits=4, group_size=32), None, device=CUDA, progress=False)
    assert next(gpu.parameters()).device.type == "cpu"
    for (name, a), b in zip(ref.named_parameters(), gpu.parameters()):
        assert ((a - b).abs() > 1e-4 * a.abs().max()).float().mean() < 0.01, name
    ids = random_ids(2, 16, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids).logits, ref(ids).logits, rtol=1e-3, atol=1e-3)

    ref, gpu = make_picollama(0), make_picollama(0)
    prune_(ref, PruneConfig("wanda", 0.5), calib, progress=False)
    prune_(gpu, PruneConfig("wanda", 0.5), calib, device=CUDA, progress=False)
    for a, b in zip(ref.parameters(), gpu.parameters()):
        assert ((a == 0) != (b == 0)).float().mean() < 0.01


def test_training_runs_where_the_model_is():
    """A CUDA model trains on the GPU; a CPU model stays on the CPU even though a GPU exists."""
    ids = random_ids(4, 16, seed=3)
    batch = {"input_ids": ids, "labels": ids}
    for device in ("cuda", "cpu"):
        model = make_picollama(0).to(device)
        history = train(model, lambda i: batch, causal_lm_loss, TrainConfig(steps=8, lr=1e-2, progress=False))
        assert next(model.parameters()).device.type == device
        assert history[-1]["loss"] < history[0]["loss"]


def test_upcycled_moe_on_gpu_equals_dense():
    dense = make_picollama(0).to(CUDA)
    moe = copy.deepcopy(dense)
    upcycle_(moe, MoEConfig(4, 2))
    assert all(p.device.type == "cuda" for p in moe.parameters())
    ids = random_ids(3, 16).to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
def test_merges_on_gpu_equal_cpu(method):
    """Every method on CUDA tensors gives the CPU's merge (DARE's random masks included)."""
    base, a, b = (make_picollama(s).state_dict() for s in (0, 1, 2))
    sds = [b] if method == "slerp" else [a, b]  # slerp goes from its base (here a) to one other model
    start = (a if method == "slerp" else base) if METHODS[method].needs_base else None
    params = {"seed": 0, "t": 0.3}
    cpu = merge_state_dicts(method, sds, densities=[0.5] * len(sds), base=start, params=params)

    def to_gpu(sd):
        return None if sd is None else {k: v.to(CUDA) for k, v in sd.items()}

    gpu = merge_state_dicts(method, [to_gpu(sd) for sd in sds], densities=[0.5] * len(sds), base=to_gpu(start), params=params)
    for name, t in cpu.items():
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].cpu(), t, rtol=1e-5, atol=1e-6)


def test_speculative_decoding_on_gpu_is_the_targets_greedy_output():
    target, draft = make_picollama(0).to(CUDA), make_picollama(1, layers=1).to(CUDA)
    prompt = random_ids(1, 8).to(CUDA)
    out = speculative_generate(target, draft, prompt, max_new_tokens=20, gamma=3)
    assert torch.equal(out.sequences, greedy_generate(target, prompt, 20))


def test_reward_model_trains_on_gpu():
    from shrinklib.reward import RewardModel, bradley_terry_loss

    rm = RewardModel(make_picollama(0), head_seed=0).to(CUDA)
    batch = {"input_ids": random_ids(8, 12).to(CUDA), "attention_mask": torch.ones(8, 12, dtype=torch.long, device=CUDA)}
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        r = rm(batch)
        loss = bradley_terry_loss(r[:4], r[4:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_cached_lower_blocks_on_gpu():
    """Notebook 08's shortcuts on the GPU: a fine-tune on cached lower-block states has the full
    model's loss and trains; a reward model on cached last-MLP inputs equals the full one."""
    from shrinklib.calib import cache_prefix
    from shrinklib.tasks import answer_loss
    from shrinklib.train import finetune_task
    from shrinklib.reward import LastMLPRewardModel, RewardModel, last_mlp_features

    model = make_picollama(0, layers=3).to(CUDA)
    ids = random_ids(4, 12).to(CUDA)
    mask = torch.ones_like(ids)
    mask[1:, 9:] = 0  # right padding
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}
    batch["labels"][:, :6] = -100  # the "answer" is the rest
    cached = cache_prefix(model, batch, start=2)
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, cached), answer_loss(model, batch), rtol=1e-5, atol=1e-5)
    for p in model.parameters():
        p.requires_grad_(False)
    top = list(model.model.layers[2].parameters())
    for p in top:
        p.requires_grad_(True)
    history = finetune_task(model, [cached], steps=10, lr=1e-2)
    assert history[-1]["loss"] < history[0]["loss"] and all(p.device.type == "cuda" for p in top)

    full, fast = RewardModel(model, head_seed=3).to(CUDA), LastMLPRewardModel(model, head_seed=3).to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(fast(last_mlp_features(model, batch)), full(batch), rtol=1e-5, atol=1e-5)


def test_cpu_kernels_refuse_gpu_tensors():
    from shrinklib.kernels import modules as Mo

    layer = Mo.LUTLinear.from_linear(torch.nn.Linear(64, 32), 4, 32)
    with pytest.raises(ValueError, match="CPU"):
        layer(torch.randn(1, 64, device=CUDA))
