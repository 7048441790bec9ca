"""A tiny data-parallel training run: `torchrun --standalone --nproc_per_node 2 tests/ddp_script.py OUT`.

Every process trains the same picollama on its half of each global batch; the main process
saves the final weights and the history to OUT (a torch file). Run as a plain script it is
the one-process reference with the same global batch.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import make_picollama, random_ids  # noqa: E402

from shrinklib.io import atomic_path  # noqa: E402
from shrinklib.train import TrainConfig, train  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ_LEN = 4, 4, 16


def next_batch(i: int) -> dict:
    ids = random_ids(GLOBAL_BATCH, SEQ_LEN, vocab=128, seed=100 + i)
    return {"input_ids": ids, "labels": ids}


def run(out: str | None = None, grad_accum: int = 1) -> tuple[dict, list[dict]]:
    """Train the fixture model; return (state_dict, history) and save them to `out` on the main process."""
    torch.set_num_threads(1)
    model = make_picollama(seed=0)
    config = TrainConfig(steps=STEPS, lr=1e-2, grad_accum=grad_accum, progress=False)
    history = train(model, next_batch, config=config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from accelerate import PartialState

    world = PartialState().num_processes  # the processes accelerate really trained with
    if out and PartialState().is_main_process:
        with atomic_path(out) as tmp:
            torch.save({"state": state, "history": history, "world": world}, tmp)
    return state, history


if __name__ == "__main__":
    run(sys.argv[1], grad_accum=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
