"""Export to safetensors and GGUF, each checked by reloading and comparing logits."""

import json
import numpy as np
import pytest
import torch
from common import make_picollama, make_picoopt

from shrinklib.export import (TOLERANCE, ExportError, export_gguf, export_safetensors, load_gguf, permute_rope_rows,
                              q4_blocks)


@pytest.mark.parametrize("fmt", ["F32", "F16", "Q8_0"])
def test_gguf_float_formats_reload_within_tolerance(tmp_path, fmt):
    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    r = export_gguf(model, tmp_path / f"m.{fmt}.gguf", fmt=fmt)
    assert r.ok, r
    assert r.rel_logit_diff <= TOLERANCE[fmt]
    if fmt == "F32":
        assert r.exact and r.max_abs_logit_diff == 0.0


def test_gguf_refuses_q4_off_grid(tmp_path):
    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    for fmt in ("Q4_0", "Q4_1"):
        with pytest.raises(ExportError, match="not on the .* grid"):
            export_gguf(model, tmp_path / "m.gguf", fmt=fmt)
    assert not (tmp_path / "m.gguf").exists()  # nothing half-written


def test_gguf_refuses_other_architectures(tmp_path):
    from shrinklib.arch import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError, match="GGUF export is unsupported for opt because"):
        export_gguf(make_picoopt(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("fmt,symmetric,bits,group", [("Q4_1", False, 4, 32), ("Q4_1", False, 3, 64), ("Q4_0", True, 4, 64)])
def test_gguf_q4_from_quantized_codes(tmp_path, fmt, symmetric, bits, group):
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    quantize_(model, RTNConfig(bits=bits, group_size=group, symmetric=symmetric), progress=False)
    # F32 embedding: the only difference left is the float16 rounding of the block constants
    r = export_gguf(model, tmp_path / "m.gguf", fmt=fmt, embed_type="F32")
    assert r.ok and r.tensor_types[fmt] == 14, r
    assert r.rel_logit_diff < 2e-3  # float16 constants: ~2⁻¹¹ relative per weight


def test_q4_0_needs_a_symmetric_grid(tmp_path):
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    quantize_(model, RTNConfig(bits=4, group_size=32, symmetric=False), progress=False)
    with pytest.raises(ExportError, match="Q4_0"):
        export_gguf(model, tmp_path / "m.gguf", fmt="Q4_0")


def test_q4_blocks_match_gguf_dequantize():
    """Our nibble packing, read back by the gguf package's own dequantizer: w = d·q + m."""
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (3, 64), generator=g, dtype=torch.uint8)
    d = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.125, 4.0]])
    m = torch.tensor([[-1.0, 0.5], [0.0, -3.0], [2.0, 1.0]])
    back = quants.dequantize(q4_blocks(q, d, m), GGMLQuantizationType.Q4_1).reshape(3, 64)
    expect = d.repeat_interleave(32, 1) * q.float() + m.repeat_interleave(32, 1)
    np.testing.assert_array_equal(back, expect.numpy())
    back0 = quants.dequantize(q4_blocks(q, d, None), GGMLQuantizationType.Q4_0).reshape(3, 64)
    np.testing.assert_array_equal(back0, (d.repeat_interleave(32, 1) * (q.float() - 8)).numpy())


def test_rope_permutation_is_undone_by_transformers():
    """llama.cpp's q/k row order, undone by transformers' GGUF reader, gives the identity."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    for n_head in (1, 2, 4):
        W = torch.arange(8 * n_head * 3, dtype=torch.float32).reshape(8 * n_head, 3)
        stored = W[permute_rope_rows(W.shape[0], n_head)].numpy()
        back = LlamaTensorProcessor()._reverse_permute_weights(stored, n_head, n_head)
        np.testing.assert_array_equal(back, W.numpy())


def test_safetensors_dense_and_packed_reload_exactly(tmp_path):
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=False)
    dense = export_safetensors(model, tmp_path / "dense")
    packed = export_safetensors(model, tmp_path / "packed", packed=True)
    assert dense.ok and packed.ok and dense.max_abs_logit_diff == 0 == packed.max_abs_logit_diff
    assert packed.size_bytes < dense.size_bytes / 2
    export_safetensors(model, tmp_path / "dense")  # overwriting an existing export works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "packed"]  # no temporary folders left


def test_smollm2_q4_1_round_trip_is_exact(tmp_path):
    """The embedded SmolLM2 was shipped as Q4_1 (linears) + Q8_0 (embedding): its float32 weights
    sit on those grids, so exporting Q4_1 and reloading gives the same weights bit for bit.
    Two of its 30 blocks keep the test fast; the tokenizer goes through GGUF and back."""
    from shrinklib.minitron import drop_layers_
    from shrinklib.models import load_model

    model, tok = load_model()
    model = __import__("copy").deepcopy(model)
    drop_layers_(model, list(range(2, 30)))
    r = export_gguf(model, tmp_path / "smol.gguf", tokenizer=tok, fmt="Q4_1")
    assert r.exact and r.ok and r.tokenizer_ok and r.max_abs_logit_diff == 0.0, r
    assert r.tensor_types == {"Q8_0": 1, "Q4_1": 14, "F32": 5}
    reloaded = load_gguf(tmp_path / "smol.gguf").state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded[k]), k


# ----------------------------------------------------------------------------- a user's files are never destroyed


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "checkpoints").mkdir()
    (path / "checkpoints" / "step100.pt").write_bytes(b"\0" * 10)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_exports_refuse_a_folder_or_file_they_did_not_write(tmp_path):
    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    listing = _user_folder(tmp_path / "work")
    with pytest.raises(FileExistsError, match=r"export folder .*work already exists and was not written by the suite "
                                               r"\(it holds checkpoints/, notes.txt\).*overwrite=True"):
        export_safetensors(model, tmp_path / "work")
    (tmp_path / "model.gguf").write_text("not a model")
    with pytest.raises(FileExistsError, match=r"GGUF file .*model.gguf already exists and was not written by the suite"):
        export_gguf(model, tmp_path / "model.gguf", fmt="F32")
    with pytest.raises(FileExistsError, match="is a folder"):
        export_gguf(model, tmp_path / "work", fmt="F32")
    assert sorted(str(p.relative_to(tmp_path / "work")) for p in (tmp_path / "work").rglob("*")) == listing
    assert (tmp_path / "model.gguf").read_text() == "not a model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "work"]  # no temporaries left


def test_previous_exports_and_empty_folders_are_replaced_and_overwrite_is_explicit(tmp_path):
    from shrinklib.io import MARKER

    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    (tmp_path / "empty").mkdir()
    export_safetensors(model, tmp_path / "empty", check=False)
    assert (tmp_path / "empty" / MARKER).is_file()
    export_safetensors(model, tmp_path / "empty", check=False)  # its own export: replaced
    export_gguf(model, tmp_path / "m.gguf", fmt="F32", check=False)
    assert export_gguf(model, tmp_path / "m.gguf", fmt="F16").ok  # a GGUF it wrote carries the marker key
    _user_folder(tmp_path / "work")
    r = export_safetensors(model, tmp_path / "work", overwrite=True)
    assert r.ok and not (tmp_path / "work" / "notes.txt").exists()


def test_outputs_follow_the_umask(tmp_path):
    import os
    import stat

    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    old = os.umask(0o022)
    try:
        export_safetensors(model, tmp_path / "st", check=False)
        export_gguf(model, tmp_path / "m.gguf", fmt="F32", check=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "st").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "st" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o644


KILLED_EXPORT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from common import make_picollama
import gguf
from shrinklib.export import export_gguf, export_safetensors

kind, out = sys.argv[1], sys.argv[2]
model = make_picollama(hidden=64, intermediate=128, vocab=128)

def stall(*args, **kwargs):  # mid-export: the temporary is on disk, the rename has not happened
    print("writing", flush=True)
    time.sleep(600)

if kind == "gguf":
    gguf.GGUFWriter.close = stall
    export_gguf(model, os.path.join(out, "m.gguf"), fmt="F32")
else:
    class Tokenizer:
        save_pretrained = staticmethod(stall)
    export_safetensors(model, os.path.join(out, "st"), tokenizer=Tokenizer())
"""


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_a_killed_exports_temporaries_are_removed_by_the_next_export(tmp_path, kind):
    """SIGKILL in the middle of an export, then a second export into the same folder."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "out"
    listing = _user_folder(out / "mine")
    script = KILLED_EXPORT.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", script, kind, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert len(left) == 1 and f".tmp-" in left[0] and str(proc.pid) in left[0]  # what SIGKILL leaves behind
    model = make_picollama(hidden=64, intermediate=128, vocab=128)
    if kind == "gguf":
        export_gguf(model, out / "m.gguf", fmt="F32", check=False)
    else:
        export_safetensors(model, out / "st", check=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(["mine", "m.gguf" if kind == "gguf" else "st"])
    assert sorted(str(p.relative_to(out / "mine")) for p in (out / "mine").rglob("*")) == listing


def test_temporaries_of_live_processes_and_other_names_are_left_alone(tmp_path):
    import os

    from shrinklib.io import _temp_name, remove_stale_temporaries

    live = _temp_name(tmp_path / "a.gguf")  # this process: alive
    live.write_text("x")
    dead = tmp_path / live.name.replace(f"-{os.getpid()}-", "-999999999-")
    dead.mkdir()
    other = tmp_path / ".a.gguf.tmp-mine"  # not this naming
    other.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and other.exists() and not dead.exists()


def test_the_current_folder_is_never_an_export_target(tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    for target in (".", "..", str(tmp_path)):
        with pytest.raises(FileExistsError, match="is the current folder or holds it"):
            export_safetensors(make_picollama(), target, overwrite=True)
    assert (tmp_path / "here").is_dir()


def test_an_existing_file_is_never_replaced_by_an_export(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(FileExistsError, match="is a file or a link, not a folder"):
        export_safetensors(make_picollama(), notes)
    with pytest.raises(FileExistsError, match="is a file or a link, not a folder"):
        export_safetensors(make_picollama(), notes, overwrite=True)
    assert notes.read_text() == "mine"


def test_compressed_tensors_int8_per_channel_and_refusals(tmp_path):
    from shrinklib.export import export_compressed_tensors
    from shrinklib.quant import RTNConfig, quantize_

    model = make_picollama()
    quantize_(model, RTNConfig(bits=8, group_size=None, symmetric=True), progress=False)
    report = export_compressed_tensors(model, tmp_path / "int8")
    assert report.ok and report.max_abs_logit_diff == 0
    cfg = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    asym = make_picollama()
    quantize_(asym, RTNConfig(bits=4, group_size=16, symmetric=False), progress=False)
    with pytest.raises(ExportError, match="zero points are not integers"):
        export_compressed_tensors(asym, tmp_path / "asym")
    nf4 = make_picollama()
    quantize_(nf4, RTNConfig(group_size=16, fmt="nf4"), progress=False)
    with pytest.raises(ExportError, match="value table"):
        export_compressed_tensors(nf4, tmp_path / "nf4")
    with pytest.raises(ExportError, match="no quantized linears"):
        export_compressed_tensors(make_picollama(), tmp_path / "float")
    assert not any((tmp_path / n).exists() for n in ("asym", "nf4", "float"))
