"""Model merging: combine the weights of models fine-tuned from one architecture.

One file per method (`linear`, `task_arithmetic`, `ties`, `dare`, `slerp`); the task-vector
methods are one function with sparsify and consensus choices (`task_vectors.merge_task_vectors`,
as mergekit's generalized task arithmetic); a registry with each paper's URL
(`registry.METHODS`), soups (`soup`), merges that read one tensor at a time from safetensors
files (`lazy`), mergekit-shaped YAML configurations (`config`) and the loss along the straight
path between two models (`lmc`).
"""

from .config import MergeConfig, ModelSpec, load_config, save_config
from .dare import drop_and_rescale, merge_dare
from .lazy import merge_files, merge_state_dicts
from .linear import merge_linear
from .lmc import interpolate_state_dicts, loss_along_path, loss_barrier
from .registry import METHODS, MergeMethod, merge_tensor
from .slerp import slerp
from .soup import greedy_soup, uniform_soup
from .task_arithmetic import merge_task_arithmetic
from .task_vectors import disjoint_mean, elect_sign, merge_task_vectors, task_vector, trim_magnitude
from .ties import merge_ties

__all__ = [
    "METHODS", "MergeConfig", "MergeMethod", "ModelSpec", "disjoint_mean", "drop_and_rescale", "elect_sign",
    "greedy_soup", "interpolate_state_dicts", "load_config", "loss_along_path", "loss_barrier", "merge_dare",
    "merge_files", "merge_linear", "merge_state_dicts", "merge_task_arithmetic", "merge_task_vectors", "merge_tensor", "merge_ties",
    "save_config", "slerp", "task_vector", "trim_magnitude", "uniform_soup",
]
