import os
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach a hub; the embedded model and generated fixtures are all they use.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spinning threads stall on a loaded machine.
    Use it in a test module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
