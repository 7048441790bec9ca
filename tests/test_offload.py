"""Layer-wise calibration from disk: same result as the in-memory path, a fraction of the memory."""

import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from shrinklib.calib import sequential
from shrinklib.offload import calibration_ids, gptq_block_step, load_packed, quantize_from_disk, save_random_checkpoint


def _config(layers=3, hidden=64, inter=128, vocab=256):
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def test_layerwise_from_disk_equals_in_memory_gptq(tmp_path):
    save_random_checkpoint(_config(), tmp_path / "m")
    ids = calibration_ids(256, 4, 32)
    quantize_from_disk(tmp_path / "m", tmp_path / "q", ids, bits=4, group_size=32, progress=False)
    packed = load_packed(tmp_path / "q")
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    sequential(whole, ids, gptq_block_step(4, 32), progress=False)
    x = calibration_ids(256, 2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(packed(x).logits, whole(x).logits, rtol=0, atol=1e-5)


def _peak(folder, mode):  # the calibration pass (Hessians of every linear), in a fresh process
    out = subprocess.run([sys.executable, "-m", "shrinklib.offload", "measure", "--folder", str(folder), "--mode", mode,
                          "--n", "2", "--seq-len", "32", "--method", "stats"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def test_layerwise_peak_memory_well_below_whole_model(tmp_path):
    cfg = _config(layers=8, hidden=512, inter=1408, vocab=512)  # ~100 MB of float32 blocks, 12.5 MB each
    save_random_checkpoint(cfg, tmp_path / "m")
    block_bytes = 4 * (2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 1408)
    whole, layerwise = _peak(tmp_path / "m", "whole"), _peak(tmp_path / "m", "layerwise")
    assert layerwise < whole - 4 * block_bytes, (layerwise, whole)
