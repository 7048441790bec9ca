"""shrinklib: the small shared package behind the shrink suite's notebooks.

Plumbing lives in its own modules, written once:
    models    load a model and tokenizer by id (the embedded SmolLM2-135M by default)
    data      corpora and calibration samples
    tasks     small generated tasks with exact answers
    evaluate  perplexity, KL divergence to a base model, size, latency, peak memory
    arch      where a decoder's blocks and linears are (the one architecture adapter)
    calib     layer-by-layer calibration shared by the compression methods
    train     one training loop (accelerate)
    results   results JSON, figures and the reproduction report
"""

from .data import calibration_batch, load_corpus
from .evaluate import count_params, decode_latency, model_size_bytes, peak_memory, perplexity, time_fn
from .models import DEFAULT_MODEL, load_model
from .results import Results, new_figure, save_figure, show_table
from .seed import seed_everything
from .show import show
from .units import GiB, KiB, MiB

__all__ = [
    "DEFAULT_MODEL",
    "GiB",
    "KiB",
    "MiB",
    "Results",
    "calibration_batch",
    "count_params",
    "decode_latency",
    "load_corpus",
    "load_model",
    "model_size_bytes",
    "new_figure",
    "peak_memory",
    "perplexity",
    "save_figure",
    "seed_everything",
    "show",
    "show_table",
    "time_fn",
]
