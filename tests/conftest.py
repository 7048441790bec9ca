import os
import sys
from pathlib import Path

# Tests never reach a hub; the embedded model and generated fixtures are all they use.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
