"""The benchmark's bookkeeping (not its timings): streamed timing calls every copy of a layer in
turn, the copies are independent, rows carry streamed and hot columns, and the goals are read off
the rows correctly."""

import copy
import sys

import pytest
import torch

from shrinklib import bench, evaluate


def test_streamed_time_calls_each_copy_in_turn():
    calls = []
    kernels = [lambda x, i=i: calls.append(i) for i in range(3)]
    t = evaluate.streamed_time(kernels, None, min_time=0.0)
    assert calls[:6] == [0, 1, 2, 0, 1, 2] and len(calls) % 3 == 0 and t >= 0


def test_kernel_copies_have_their_own_weights():
    """Each method's deep copy computes the same function on its own memory."""
    W, x = torch.randn(40, 96), torch.randn(2, 96)
    for name in ("torch f32 F.linear", "torch int8 dynamic (fbgemm)", "ours lut2 (T-MAC)", "ours int4"):
        k = bench.METHODS[name](W)
        k2 = copy.deepcopy(k)
        assert torch.equal(k(x), k2(x)), name
        if name != "torch int8 dynamic (fbgemm)":  # its weight is an opaque packed object
            assert weight_ptr(k.args[0]) != weight_ptr(k2.args[0]), name


def weight_ptr(arg) -> int:
    """Address of a kernel's weight: a float tensor, or the codes of a packed weight."""
    return (arg if isinstance(arg, torch.Tensor) else arg.packed).data_ptr()


def test_last_level_cache_is_read_from_sysfs(monkeypatch, tmp_path):
    """The largest of the cache sizes sysfs lists, in bytes, whatever their units; the default
    only where none is listed."""
    for name, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "32M")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "size").write_text(size + "\n")
    real = evaluate.Path
    monkeypatch.setattr(evaluate, "Path", lambda p: tmp_path if "cpu0/cache" in str(p) else real(p))
    assert evaluate.last_level_cache_bytes(default=123) == 32 * 2**20
    for name in ("index0", "index2", "index3"):
        (tmp_path / name / "size").unlink()
        (tmp_path / name).rmdir()
    assert evaluate.last_level_cache_bytes(default=123) == 123


def test_bench_layers_rows(monkeypatch):
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 2**16)  # a few copies, not 128 MiB of them
    rows = bench.bench_layers([(40, 96)], (1, 3), ["torch f32 F.linear", "ours lut4 (T-MAC)"], min_time=0.0)
    assert [(r["batch"], r["method"]) for r in rows] == [(1, "torch f32 F.linear"), (1, "ours lut4 (T-MAC)"),
                                                         (3, "torch f32 F.linear"), (3, "ours lut4 (T-MAC)")]
    for r in rows:
        assert r["ms"] > 0 and r["ms (hot)"] > 0 and r["flops"] == 2 * r["batch"] * 40 * 96
        if r["method"] == "torch f32 F.linear":
            assert r["speedup"] == r["speedup (hot)"] == 1.0 and r["bytes"] == 40 * 96 * 4


def test_targets_read_off_the_rows():
    def row(method, ms, gbs=1.0, batch=1):
        return {"shape": "4096x4096", "batch": batch, "method": method, "ms": ms, "GB/s": gbs}

    rows = [row("torch f32 F.linear", 3.0), row("torch int8 dynamic (fbgemm)", 0.6), row("ours lut4 (T-MAC)", 0.5, 25.0),
            row("ours lut2 (T-MAC)", 0.31), row("torch f32 F.linear", 15.0, batch=16),
            row("torch int8 dynamic (fbgemm)", 1.8, batch=16), row("ours lut4 (T-MAC)", 3.2, batch=16),
            row("ours int4", 17.0, batch=16), row("ours w8a8", 1.5, batch=16)]
    models = [{"format": "float32", "decode tok/s (eager)": 20.0, "decode tok/s (compiled)": 50.0, "prefill tok/s": 500.0,
               "size MB": 538.0},
              {"format": "lut4", "decode tok/s (eager)": 60.0, "decode tok/s (compiled)": 130.0, "prefill tok/s": 440.0},
              {"format": "lut2", "decode tok/s (eager)": 70.0, "decode tok/s (compiled)": 120.0, "prefill tok/s": 480.0},
              {"format": "llama.cpp Q4_1 GGUF", "decode tok/s": 126.0, "prefill tok/s": 240.0}]
    goals = bench.targets(rows, models, 30e9)
    got = {g["target"]: (round(g["measured"], 3), g["met"]) for g in goals}
    assert {g["target"]: g["which"] for g in goals if "which" in g} == {  # the slowest and the fastest of ours
        "batch 16 (4096²): every format of ours >= float32": "ours int4",
        "batch 16 (4096²): best of ours >= fbgemm int8": "ours w8a8",
        "float32 decode >= 2x the eager transformers loop": "bandwidth ceiling 55.8 tok/s; compiled at 90% of it"}
    assert got == {
        "4-bit >= 5x float32 F.linear (4096², batch 1)": (6.0, True),
        "4-bit faster than every torch path (4096², batch 1)": (1.2, True),
        "4-bit reads weights at >= 70% of measured bandwidth": (0.833, True),
        "2-bit LUT <= 0.6x 4-bit LUT time": (0.62, False),
        "lut4 decode >= 1.0x llama.cpp Q4_1 GGUF": (1.032, True),
        "float32 decode >= 2x the eager transformers loop": (2.5, True),
        "lut2 decode faster than lut4": (0.923, False),
        "lut4 prefill >= 0.9x float32": (0.88, False),
        "lut4 prefill >= llama.cpp's": (1.833, True),
        "lut2 prefill >= 0.9x float32": (0.96, True),
        "lut2 prefill >= llama.cpp's": (2.0, True),
        "batch 16 (4096²): every format of ours >= float32": (0.882, False),
        "batch 16 (4096²): best of ours >= fbgemm int8": (1.2, True),
    }


def test_model_figure_draws_every_format(tmp_path, monkeypatch):
    """The whole-model figure: one group of bars per format (llama.cpp's row has one decode column,
    ours two), repeated runs drawn once."""
    monkeypatch.setenv("SHRINKLIB_OUTPUTS", str(tmp_path))
    models = [{"format": "float32", "decode tok/s (eager)": 20.0, "decode tok/s (compiled)": 50.0, "prefill tok/s": 500.0, "run": 1},
              {"format": "lut4", "decode tok/s (eager)": 60.0, "prefill tok/s": 440.0, "run": 1},
              {"format": "lut4", "decode tok/s (eager)": 61.0, "prefill tok/s": 450.0, "run": 2},
              {"format": "llama.cpp Q4_1 GGUF", "decode tok/s": 126.0, "prefill tok/s": 240.0, "run": 1}]
    path = bench.model_figure(models)
    assert path == tmp_path / "figures" / "03_bench_model.png" and path.stat().st_size > 0
    import matplotlib.pyplot as plt

    ax1, ax2 = plt.gcf().axes
    assert [t.get_text() for t in ax2.get_xticklabels()] == ["float32", "lut4", "llama.cpp Q4_1 GGUF"]
    assert [b.get_height() for b in ax2.patches] == [500.0, 440.0, 240.0]
    assert len(ax1.patches) == 9  # three bars (eager, compiled, llama.cpp) per format, empty where absent
    plt.close("all")


def test_bench_writes_to_its_own_folder(tmp_path, monkeypatch):
    """`make bench` writes outputs/bench/, never outputs/results/ (the notebooks' results, which
    `make test` compares file by file): a benchmark run then a test run must both pass."""
    monkeypatch.setenv("SHRINKLIB_OUTPUTS", str(tmp_path))
    metrics = bench.main(["--no-layers", "--no-model"])
    assert metrics["layers"] == [] and metrics["model"] == [] and metrics["bandwidth_GBps"] > 0
    assert (tmp_path / "bench" / "03_bench.json").is_file() and not (tmp_path / "results").exists()


def test_llama_cpp_row_is_absent_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    assert bench.bench_llama_cpp() is None


def test_llama_cpp_runs_the_embedded_gguf():
    """Where llama-cpp-python is installed: its row runs the same GGUF that our float32 model is
    dequantized from, so its first greedy token is ours. Only the first is compared: llama.cpp
    rounds activations to 8 bits for the Q4_1 dot products, which moved this prompt's logits by up
    to 0.76 (of a largest logit near 31), against a top-2 margin of 4.0 at the first step but
    0.31 at the second."""
    pytest.importorskip("llama_cpp")
    from shrinklib import load_model

    row = bench.bench_llama_cpp(new_tokens=4, prefill_len=32)
    model, tok = load_model("smollm2-135m")
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    first = model(ids).logits[0, -1].argmax().item()
    assert row["tokens"][0] == first and len(row["tokens"]) == 4
    assert row["decode tok/s"] > 0 and row["prefill tok/s"] > 0 and row["format"] == "llama.cpp Q4_1 GGUF"
