"""The training loop: checkpoint/resume reaches the uninterrupted result; two processes equal one."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from common import make_picollama, random_ids

import ddp_script
from shrinklib.train import TrainConfig, load_checkpoint, lr_at, shard_batch, train

HERE = Path(__file__).resolve().parent


def _batch(i):
    ids = random_ids(4, 16, vocab=128, seed=i)
    return {"input_ids": ids, "labels": ids}


def _noisy_loss(model, batch):
    """Cross-entropy plus a term that draws from the torch RNG, so resume must restore RNG state."""
    out = model(**batch, use_cache=False)
    noise = torch.randn(())
    return out.loss + 1e-2 * noise * out.logits.mean()


class Crash(RuntimeError):
    pass


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(steps=10, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(0, c) == 0.5 and lr_at(1, c) == 1.0
    assert lr_at(2, c) == pytest.approx(1.0)
    assert lr_at(10, c) == pytest.approx(0.1)


def test_config_validation():
    with pytest.raises(ValueError):
        TrainConfig(steps=0)
    with pytest.raises(ValueError):
        TrainConfig(lr=0)
    with pytest.raises(ValueError):
        TrainConfig(checkpoint_every=-1)


def test_training_lowers_the_loss():
    model = make_picollama(seed=0)
    fixed = _batch(0)
    hist = train(model, lambda i: fixed, config=TrainConfig(steps=8, lr=1e-2, progress=False))
    assert [r["step"] for r in hist] == list(range(1, 9))
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5
    assert not model.training


def test_resume_equals_uninterrupted_run(tmp_path):
    config = dict(steps=6, lr=1e-2, grad_accum=2, progress=False, seed=3)
    ref = make_picollama(seed=0)
    ref_hist = train(ref, _batch, _noisy_loss, TrainConfig(**config))

    ckpt = tmp_path / "run"

    def crashing_batch(i):
        if i == 9:  # micro-step 9 is inside optimizer step 5 (0-based 4): checkpoints at 2 and 4 exist
            raise Crash
        return _batch(i)

    first = make_picollama(seed=0)
    with pytest.raises(Crash):
        train(first, crashing_batch, _noisy_loss, TrainConfig(**config, checkpoint_dir=str(ckpt), checkpoint_every=2))
    assert load_checkpoint(ckpt / "checkpoint.pt", TrainConfig(**config))["step"] == 4
    assert not list(ckpt.glob(".*tmp*"))  # atomic: no temporary file left behind

    resumed = make_picollama(seed=1)  # different weights: everything must come from the checkpoint
    hist = train(resumed, _batch, _noisy_loss, TrainConfig(**config, checkpoint_dir=str(ckpt), checkpoint_every=2))
    assert [r["step"] for r in hist] == list(range(1, 7))
    assert [r["loss"] for r in hist] == [r["loss"] for r in ref_hist]
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    # a finished run is not repeated: the stored history comes back and the weights are loaded
    again = make_picollama(seed=2)
    assert train(again, crashing_batch, _noisy_loss, TrainConfig(**config, checkpoint_dir=str(ckpt))) == hist
    torch.testing.assert_close(again.lm_head.weight, ref.lm_head.weight, rtol=0, atol=0)


def test_resume_with_other_settings_is_refused(tmp_path):
    train(make_picollama(), _batch, config=TrainConfig(steps=2, lr=1e-3, progress=False, checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="other settings"):
        train(make_picollama(), _batch, config=TrainConfig(steps=2, lr=1e-2, progress=False, checkpoint_dir=str(tmp_path)))
    # resume=False starts afresh and overwrites
    hist = train(make_picollama(), _batch, config=TrainConfig(steps=2, lr=1e-2, progress=False, checkpoint_dir=str(tmp_path), resume=False))
    assert len(hist) == 2


def test_shard_batch():
    b = {"input_ids": torch.arange(8).reshape(4, 2), "flag": 3}
    s = shard_batch(b, 1, 2)
    assert s["input_ids"].tolist() == [[4, 5], [6, 7]] and s["flag"] == 3
    with pytest.raises(ValueError, match="divisible"):
        shard_batch(b, 0, 3)


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_two_processes_equal_one_process(tmp_path, grad_accum):
    """torchrun with 2 CPU processes (gloo), each on half of the global batch, against one process on
    the whole batch. Tolerance: weights within 1e-4 absolute after 4 AdamW steps at lr 1e-2 (Adam's
    normalised update amplifies the ~1e-7 difference of the all-reduced gradient's summation order),
    losses within 1e-5 relative."""
    out = tmp_path / "ddp.pt"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", str(HERE / "ddp_script.py"), str(out), str(grad_accum)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out, weights_only=False)
    assert two["world"] == 2
    state, history = ddp_script.run(grad_accum=grad_accum)
    for name, v in state.items():
        torch.testing.assert_close(two["state"][name], v, rtol=0, atol=1e-4, msg=name)
    assert [r["loss"] for r in two["history"]] == pytest.approx([r["loss"] for r in history], rel=1e-5)
    assert not torch.equal(two["state"]["lm_head.weight"], make_picollama(seed=0).lm_head.weight)  # it trained
