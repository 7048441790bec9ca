"""Calibration from disk: the same GPTQ as `quantize_` in memory, a fraction of the memory."""

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from shrinklib.quant import GPTQConfig, load_quantized, quantize_, quantize_from_disk
from shrinklib.offload import calibration_ids, save_random_checkpoint


def _config(layers=3, hidden=64, inter=128, vocab=256, tie=False):
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie)


def test_quantize_from_disk_equals_quantize_in_memory(tmp_path):
    for tie in (False, True):
        save_random_checkpoint(_config(tie=tie), tmp_path / f"m{tie}")
        ids, config = calibration_ids(256, 4, 32), GPTQConfig(bits=4, group_size=32)
        quantize_from_disk(tmp_path / f"m{tie}", tmp_path / f"q{tie}", ids, config, progress=False)
        streamed = load_quantized(tmp_path / f"q{tie}")
        whole = AutoModelForCausalLM.from_pretrained(tmp_path / f"m{tie}").eval()
        quantize_(whole, config, ids, progress=False)
        x = calibration_ids(256, 2, 16, seed=1)
        with torch.no_grad():
            assert torch.equal(streamed(x).logits, whole(x).logits)


def _peak(folder, mode):  # the calibration pass (Hessians of every linear), in a fresh process
    code = (f"import json; from shrinklib.offload import measure; "
            f"print(json.dumps(measure({str(folder)!r}, {mode!r}, n=2, length=32)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def test_peak_memory_from_disk_well_below_whole_model(tmp_path):
    cfg = _config(layers=8, hidden=512, inter=1408, vocab=512)  # ~100 MB of float32 blocks, 12.5 MB each
    save_random_checkpoint(cfg, tmp_path / "m")
    block_bytes = 4 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1408)
    whole, from_disk = _peak(tmp_path / "m", "whole"), _peak(tmp_path / "m", "from_disk")
    assert from_disk < whole - 4 * block_bytes, (from_disk, whole)
