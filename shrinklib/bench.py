"""`python -m shrinklib.bench`: time the low-bit kernels beside torch's own paths, in one run.

Prints a markdown table (time, effective GB/s of weight bytes, speedup over float32
F.linear), this machine's roofline (measured read bandwidth, peak float32 GFLOP/s), whole-model
SmolLM2 decode tokens/s and 512-token prefill (with llama.cpp on the same GGUF beside them where
llama-cpp-python is installed), and saves `outputs/figures/03_bench_roofline.png`, `outputs/figures/03_bench_model.png` (the whole-model rows),
`outputs/bench/03_bench.json` (everything) and `outputs/bench/03_bench_model.csv` (the
whole-model rows: decode and prefill tokens/s and their ratios to float32 and llama.cpp). `--quick` runs the small default of notebook 03.

Every layer is timed twice. *Streamed* (the headline columns): copies of the layer, together twice
the last-level cache, are called in turn, so each weight comes from memory, as when a model whose
weights exceed the cache decodes and reads every layer's weight once per token. *Hot*: one weight
is called over and over and may sit in the cache (a 16 MiB int8 4096×4096 weight fits a 32 MiB
L3), which flatters the formats with more bytes per weight; those columns are printed beside.

Whole-model decode is timed two ways: the plain `transformers` loop (dynamic KV cache, one eager
forward per token) and `shrinklib.decode.Decoder` (static KV cache, compiled one-token step), whose
warm-up (tracing and compiling, once per format; inductor's cache keeps the code for later runs) is
printed beside its speed; "same tokens" says whether the two decodes chose the same greedy tokens.
They do for float and weight-only formats on the kernels (int, codebook); formats that round their
activations to int8 (LUT tables, W8A8) can turn the float rounding differences of the compiled graph
(inductor's fused norms and attention, ~1e-6 of the logits) into a different table code and, many
layers later, a different token.

Options: `--quick`, `--no-model` (layers only), `--no-layers` (whole model only), `--prefill N`
(prompt tokens of the prefill timing, default 512), `--repeats N` (whole-model timings, to show
their spread), `--no-compile`, `--threads N`, `--calibration` (also time GPTQ of the whole model on
32 × 512 calibration tokens, with its perplexity), `--help`.
"""

from __future__ import annotations

import copy
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels as K
from .evaluate import model_size_bytes, best_time, last_level_cache_bytes, peak_flops, read_bandwidth, streamed_time
from .io import atomic_write_text
from .kernels import modules as Mo
from .results import Results, markdown_table, new_figure, outputs_dir, save_figure, show_table

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in) of q/o, k/v, gate/up, down
LARGE_SHAPES = [(4096, 4096), (11008, 4096)]


@dataclass
class Kernel:
    """y = fn(x, *args) for one layer in one format; `copy.deepcopy` makes an independent copy of
    its weights (`args`), for timing with the weights streamed from memory."""

    fn: Callable
    args: tuple
    nbytes: int  # bytes of the weight and its scales

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x, *self.args)


def _codes(W, bits, g=64):
    return Mo.rtn_codes(W, bits, g)


def _ours(fmt: str | Callable[[nn.Linear], nn.Module]):
    """A layer of ours, as a model runs it (the module, with its switches between kernels by batch size)."""
    make_layer = Mo.FORMATS[fmt] if isinstance(fmt, str) else fmt

    def make(W):
        lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
        lin.weight.data = W
        layer = make_layer(lin)
        return Kernel(_call_module, (layer,), model_size_bytes(layer))
    return make


def _sparse24(lin: nn.Linear) -> nn.Module:
    keep = (torch.rand_like(lin.weight.reshape(-1, 4)).argsort(-1) < 2).reshape(lin.weight.shape)
    lin.weight.data = lin.weight.data * keep
    return Mo.Sparse24Linear.from_linear(lin, keep)


def _torch_f32(W):
    return Kernel(F.linear, (W,), W.numel() * 4)


def _call_module(x, module):
    return module(x)


def _torch_int8_dynamic(W):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
    return Kernel(_call_module, (q,), W.numel() + W.shape[0] * 8)


def _int4pack_mm(x, packed, scales_zeros, dtype):
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, 64, scales_zeros)


def _torch_int4(dtype):
    def make(W):
        q, s, z = _codes(W, 4, 64)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        # torch's convention: W = (q - 8) * scale + zero
        sz = torch.stack([s, s * (8 - z)], -1).transpose(0, 1).contiguous().to(dtype)  # (G, N, 2)
        return Kernel(_int4pack_mm, (packed, sz, dtype), packed.numel() * packed.element_size() + s.numel() * 4)
    return make


METHODS = {
    "torch f32 F.linear": _torch_f32,
    "torch int8 dynamic (fbgemm)": _torch_int8_dynamic,
    "torch int4 (f32 input)": _torch_int4(torch.float32),
    "torch int4 (bf16 input)": _torch_int4(torch.bfloat16),
    "ours int8": _ours("int8"),
    "ours int4": _ours("int4"),
    "ours int3": _ours("int3"),
    "ours int2": _ours("int2"),
    "ours nf4": _ours("nf4"),
    "ours lut4 (T-MAC)": _ours("lut4"),
    "ours lut3 (T-MAC)": _ours(Mo.rtn_layer("lut", 3)),
    "ours lut2 (T-MAC)": _ours("lut2"),
    "ours lut1 (T-MAC)": _ours(Mo.rtn_layer("lut", 1)),
    "ours w8a8": _ours("w8a8"),
    "ours 2:4 sparse f32": _ours(_sparse24),
}


def bench_layers(shapes, batches=(1, 16), methods=None, min_time: float = 0.2, stream_bytes: int | None = None) -> list[dict]:
    """One row per (shape, batch, method): ms, GB/s of weight bytes and speedup over float32
    F.linear with the weight streamed from memory (copies of the layer, together `stream_bytes`,
    by default twice the last-level cache, called in turn, so each copy is evicted before its next
    call), and the same with one weight called over and over (hot). One method's copies are in
    memory at a time (twice a 480 MiB cache is 960 MiB per method)."""
    rows, stream_bytes = [], stream_bytes or 2 * last_level_cache_bytes()
    for N, Kf in shapes:
        W = torch.randn(N, Kf, generator=torch.Generator().manual_seed(0)) / Kf**0.5
        xs = {M: torch.randn(M, Kf) for M in batches}
        timed = {}  # (batch, method) -> (streamed s, hot s, weight bytes)
        for name in methods or METHODS:
            try:
                k = METHODS[name](W)
            except (RuntimeError, AttributeError, NotImplementedError) as e:  # a torch path this build lacks
                print(f"skipping {name}: {e}", file=sys.stderr)
                continue
            ks = [k] + [copy.deepcopy(k) for _ in range(max(1, -(-stream_bytes // k.nbytes)) - 1)]
            for M, x in xs.items():
                timed[M, name] = (streamed_time(ks, x, min_time), best_time(lambda: ks[0](x), min_time), k.nbytes)
            del ks, k
        for M in batches:
            base = None
            for name in [n for n in (methods or METHODS) if (M, n) in timed]:
                t, th, nbytes = timed[M, name]
                base = base or (t, th)
                rows.append({"shape": f"{N}x{Kf}", "batch": M, "method": name, "ms": 1e3 * t,
                             "GB/s": nbytes / t / 1e9, "speedup": base[0] / t, "ms (hot)": 1e3 * th,
                             "speedup (hot)": base[1] / th, "bytes": nbytes, "flops": 2 * M * N * Kf})
    return rows


@torch.no_grad()
def eager_decode(model: nn.Module, ids: Tensor, new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding the plain `transformers` way (dynamic KV cache, one eager forward per token):
    the tokens and the seconds of each one-token step."""
    out = model(ids, use_cache=True)
    past, nxt, tokens, ts = out.past_key_values, out.logits[:, -1:].argmax(-1), [], []
    tokens.append(int(nxt))
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        out = model(nxt, past_key_values=past, use_cache=True)
        ts.append(time.perf_counter() - t)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(int(nxt))
    return tokens, ts


@torch.no_grad()
def bench_model(formats=("float32", "int4", "lut4", "lut2"), new_tokens: int = 16, prefill_len: int = 512,
                model_id: str = "smollm2-135m", compile: bool = True) -> list[dict]:
    """Whole-model batch-1 decode tokens/s (plain `transformers` eager decoding, and `shrinklib.decode`'s
    static cache with a compiled step, its warm-up beside it) and prefill tokens/s, with every linear
    (and the head) on a format; the greedy tokens of both decodes must agree."""
    from .decode import Decoder
    from .models import load_model

    base, tok = load_model(model_id)
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    long = torch.randint(0, base.config.vocab_size, (1, prefill_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for fmt in formats:
        model = base if fmt == "float32" else Mo.replace_linears_(copy.deepcopy(base), fmt, lm_head=True)
        tokens, ts = eager_decode(model, ids, new_tokens)
        row = {"format": fmt, "decode tok/s (eager)": 1 / min(ts)}
        if compile:
            dec = Decoder(model, ids.shape[1] + new_tokens + 1)
            out = dec.generate(ids, new_tokens)
            row.update({"decode tok/s (compiled)": out.tokens_per_second, "warm-up s": dec.warmup_seconds,
                        "same tokens": out.tokens == tokens})
        prefill = best_time(lambda: model(long), min_time=0.0, max_repeats=5) if prefill_len else float("nan")
        row.update({"prefill tok/s": prefill_len / prefill, "size MB": model_size_bytes(model) / 1e6})
        rows.append(row)
    return rows


def bench_llama_cpp(new_tokens: int = 16, prefill_len: int = 512, gguf: str | Path | None = None) -> dict | None:
    """llama.cpp (through llama-cpp-python) on the embedded model's own GGUF, timed as `bench_model`
    times ours: batch-1 greedy decode (the fastest of `new_tokens` steps) and a prefill of the same
    random `prefill_len` tokens with logits for every position. None when llama-cpp-python is not
    installed: the row is optional, not part of the suite's requirements.
    """
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from .models import smollm2_gguf_path

    path = Path(gguf) if gguf else smollm2_gguf_path()
    llm = Llama(model_path=str(path), n_ctx=prefill_len + new_tokens + 64, n_batch=max(prefill_len, 32),
                n_ubatch=max(prefill_len, 32), n_threads=torch.get_num_threads(),
                n_threads_batch=torch.get_num_threads(), logits_all=True, verbose=False)
    llm.reset()
    llm.eval(llm.tokenize(b"def fibonacci(n):", add_bos=False))
    tokens, ts = [], []
    for _ in range(new_tokens):
        tokens.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        t = time.perf_counter()
        llm.eval(tokens[-1:])
        ts.append(time.perf_counter() - t)
    long = torch.randint(0, llm.n_vocab(), (prefill_len,), generator=torch.Generator().manual_seed(0)).tolist()

    def prefill():
        llm.reset()
        llm.eval(long)

    seconds = best_time(prefill, min_time=0.0, max_repeats=5) if prefill_len else float("nan")
    llm.close()
    quant = path.stem.rsplit(".", 1)[-1]
    return {"format": f"llama.cpp {quant} GGUF", "decode tok/s": 1 / min(ts), "prefill tok/s": prefill_len / seconds,
            "size MB": path.stat().st_size / 1e6, "tokens": tokens}


def targets(rows: list[dict], model_rows: list[dict], bandwidth: float) -> list[dict]:
    """The suite's speed goals, measured in this run on the streamed timings (weights from memory,
    as in decode): which are met."""
    def get(method, shape="4096x4096", batch=1):
        return next((r for r in rows if r["method"] == method and r["shape"] == shape and r["batch"] == batch), None)

    out = []
    f32, lut4, lut2, int4 = get("torch f32 F.linear"), get("ours lut4 (T-MAC)"), get("ours lut2 (T-MAC)"), get("ours int4")
    if f32 and lut4:
        best4 = min((r for r in (lut4, int4) if r), key=lambda r: r["ms"])
        torch_paths = [r for r in rows if r["shape"] == "4096x4096" and r["batch"] == 1 and r["method"].startswith("torch")]
        out += [
            {"target": "4-bit >= 5x float32 F.linear (4096², batch 1)", "measured": f32["ms"] / best4["ms"], "met": f32["ms"] / best4["ms"] >= 5},
            {"target": "4-bit faster than every torch path (4096², batch 1)", "measured": min(r["ms"] for r in torch_paths) / best4["ms"],
             "met": all(best4["ms"] < r["ms"] for r in torch_paths)},
            {"target": "4-bit reads weights at >= 70% of measured bandwidth", "measured": best4["GB/s"] * 1e9 / bandwidth,
             "met": best4["GB/s"] * 1e9 / bandwidth >= 0.7},
        ]
    if lut4 and lut2:
        out.append({"target": "2-bit LUT <= 0.6x 4-bit LUT time", "measured": lut2["ms"] / lut4["ms"], "met": lut2["ms"] / lut4["ms"] <= 0.6})
    out += model_targets(model_rows, bandwidth)
    if rows:
        b16 = [r for r in rows if r["shape"] == "4096x4096" and r["batch"] == 16]
        f32 = next((r for r in b16 if r["method"] == "torch f32 F.linear"), None)
        fbgemm = next((r for r in b16 if r["method"] == "torch int8 dynamic (fbgemm)"), None)
        ours = [r for r in b16 if r["method"].startswith("ours")]
        if f32 and ours:
            worst = max(ours, key=lambda r: r["ms"])
            out.append({"target": "batch 16 (4096²): every format of ours >= float32",  # a name that timings never change
                        "measured": f32["ms"] / worst["ms"], "met": worst["ms"] <= f32["ms"], "which": worst["method"]})
        if fbgemm and ours:
            best = min(ours, key=lambda r: r["ms"])
            out.append({"target": "batch 16 (4096²): best of ours >= fbgemm int8",
                        "measured": fbgemm["ms"] / best["ms"], "met": best["ms"] <= fbgemm["ms"], "which": best["method"]})
    return out


def add_ratios(model_rows: list[dict], llama: dict | None) -> None:
    """Each model row's decode and prefill speed over float32's (and llama.cpp's, where it ran), in place."""
    f32 = next((r for r in model_rows if r["format"] == "float32"), None)
    for row in model_rows:
        if f32 is not None:
            row["decode vs float32"] = decode_speed(row) / decode_speed(f32)
            row["prefill vs float32"] = row["prefill tok/s"] / f32["prefill tok/s"]
        if llama is not None:
            row["decode vs llama.cpp"] = decode_speed(row) / llama["decode tok/s"]
            row["prefill vs llama.cpp"] = row["prefill tok/s"] / llama["prefill tok/s"]


def write_csv(rows: list[dict], name: str) -> Path:
    """`outputs/bench/<name>.csv` (atomically): one line per row, the union of the rows' keys."""
    import csv
    import io

    keys = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, keys)
    writer.writeheader()
    writer.writerows(rows)
    path = outputs_dir() / "bench" / f"{name}.csv"
    atomic_write_text(path, text.getvalue())
    return path


def decode_speed(row: dict) -> float:
    """A model row's decode tokens/s: the faster of its eager and compiled decodes."""
    return max(v for k, v in row.items() if k.startswith("decode tok/s") and isinstance(v, float))


def model_targets(model_rows: list[dict], bandwidth: float | None = None) -> list[dict]:
    """The whole-model goals: LUT 4-bit decode at llama.cpp's speed, float32 decode twice the eager
    `transformers` loop, LUT 2-bit faster than 4-bit, prefill of every format >= 0.9x float32 and >= llama.cpp.
    With the measured `bandwidth` (bytes/s), the float32 goal also gives the decode speed at which
    reading the weights once per token takes all of it (the model's bytes over the bandwidth: the
    head is tied to the embedding and read whole, the embedding's one row is negligible)."""
    by = {r["format"]: r for r in model_rows}
    llama = next((r for r in model_rows if r["format"].startswith("llama.cpp")), None)
    out = []
    if "lut4" in by and llama:
        ratio = decode_speed(by["lut4"]) / llama["decode tok/s"]
        out.append({"target": f"lut4 decode >= 1.0x {llama['format']}", "measured": ratio, "met": ratio >= 1.0})
    f32 = by.get("float32")
    if f32 and "decode tok/s (compiled)" in f32:
        ratio = f32["decode tok/s (compiled)"] / f32["decode tok/s (eager)"]
        goal = {"target": "float32 decode >= 2x the eager transformers loop", "measured": ratio, "met": ratio >= 2.0}
        if bandwidth and f32.get("size MB"):
            ceiling = bandwidth / (f32["size MB"] * 1e6)
            goal["which"] = f"bandwidth ceiling {ceiling:.1f} tok/s; compiled at {f32['decode tok/s (compiled)'] / ceiling:.0%} of it"
        out.append(goal)
    if "lut4" in by and "lut2" in by:
        ratio = decode_speed(by["lut2"]) / decode_speed(by["lut4"])
        out.append({"target": "lut2 decode faster than lut4", "measured": ratio, "met": ratio > 1.0})
    for fmt, r in by.items():
        if f32 and fmt != "float32" and not fmt.startswith("llama.cpp"):
            ratio = r["prefill tok/s"] / f32["prefill tok/s"]
            out.append({"target": f"{fmt} prefill >= 0.9x float32", "measured": ratio, "met": ratio >= 0.9})
            if llama:
                ratio = r["prefill tok/s"] / llama["prefill tok/s"]
                out.append({"target": f"{fmt} prefill >= llama.cpp's", "measured": ratio, "met": ratio >= 1.0})
    return out


def roofline_figure(rows: list[dict], bandwidth: float, flops: float, name: str = "03_bench_roofline"):
    """Achieved GFLOP/s against arithmetic intensity (FLOPs per weight byte), with the roofline."""
    fig, ax = new_figure()
    ai = torch.logspace(-1.5, 3, 100)
    ax.loglog(ai, torch.minimum(ai * bandwidth, torch.tensor(flops)) / 1e9, "k-", lw=1,
              label="roofline: measured bandwidth, float32 GEMM peak")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for r in rows:
        mark = ("o" if r["batch"] == 1 else "s") if not r["method"].startswith("torch") else ("^" if r["batch"] == 1 else "v")
        ax.loglog(r["flops"] / r["bytes"], r["flops"] / (r["ms"] / 1e3) / 1e9, mark, color=colors[r["method"]], alpha=0.8, ms=5)
    for m in methods:  # one legend entry per method
        ax.plot([], [], "^" if m.startswith("torch") else "o", color=colors[m], label=m)
    ax.set_xlabel("FLOPs per weight byte (ours: circles batch 1, squares batch 16; torch: triangles up 1, down 16)")
    ax.set_ylabel("effective GFLOP/s (2·M·N·K / time)")
    ax.set_title("integer and lookup kernels are not bound by the float32 peak", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, name)


def model_figure(model_rows: list[dict], name: str = "03_bench_model"):
    """Whole-model tokens/s per format, side by side: decode (eager and compiled) and prefill, with
    llama.cpp's row where it ran (the first run of each format, as in the table)."""
    rows = [r for r in model_rows if r.get("run", 1) == 1]
    fig, (ax1, ax2) = new_figure(ncols=2)
    names = [r["format"] for r in rows]
    at = range(len(rows))
    for i, (key, label) in enumerate([("decode tok/s (eager)", "eager transformers loop"),
                                      ("decode tok/s (compiled)", "static cache, compiled step"),
                                      ("decode tok/s", "llama.cpp")]):
        ax1.bar([x + 0.27 * (i - 1) for x in at], [r.get(key, 0.0) for r in rows], 0.27, label=label, color=f"C{i}")
    ax1.set_ylabel("decode tokens/s (batch 1, fastest step)")
    ax2.bar(at, [r["prefill tok/s"] for r in rows], 0.6, color="C3")
    ax2.set_ylabel("prefill tokens/s")
    for ax in (ax1, ax2):
        ax.set_xticks(list(at), names, rotation=30, ha="right", fontsize=7)
    ax1.legend(fontsize=7)
    ax1.set_title("SmolLM2-135M, every linear and the head on the format", fontsize=9)
    return save_figure(fig, name)


def show_rows(rows: list[dict]) -> None:
    """A table: rendered in a notebook, Markdown in a terminal."""
    if "ipykernel" in sys.modules:
        show_table(rows)
    else:
        print(markdown_table(rows))


def bench_calibration(n: int = 32, seq_len: int = 512) -> dict:
    """Seconds to GPTQ the embedded model (4-bit g64) on n × seq_len calibration tokens, and the
    result's perplexity on the suite's evaluation tokens (so a faster loop is seen to give the same model)."""
    from .data import calibration_batch, load_corpus
    from .evaluate import perplexity
    from .models import load_model
    from .quant import GPTQConfig, quantize_

    model, tok = load_model("smollm2-135m")
    data = load_corpus("pydoc")
    calib = calibration_batch(data, tok, n=n, seq_len=seq_len, seed=0)
    seconds = quantize_(model, GPTQConfig(4, 64), calib, progress=False)
    ppl = perplexity(model, data.tokens(tok, "eval")).ppl
    return {"what": f"GPTQ 4-bit g64 of SmolLM2-135M, {n} × {seq_len} calibration tokens", "threads": torch.get_num_threads(),
            "seconds": seconds, "perplexity": ppl}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; `--quick` for the small default, `--no-model` to skip whole-model timing,
    `--threads N` to set torch's (and the kernels') thread count."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return {}
    quick = "--quick" in argv
    prefill_len = int(argv[argv.index("--prefill") + 1]) if "--prefill" in argv else 512
    if "--threads" in argv:
        torch.set_num_threads(int(argv[argv.index("--threads") + 1]))
    torch.manual_seed(0)
    print(f"SIMD path: {K.simd_path()}; torch threads: {torch.get_num_threads()}; CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    bw, fl = read_bandwidth(), peak_flops()
    print(f"roofline: read bandwidth {bw / 1e9:.1f} GB/s, peak float32 {fl / 1e9:.0f} GFLOP/s")
    shapes = SMOLLM2_SHAPES[2:3] + LARGE_SHAPES[:1] if quick else SMOLLM2_SHAPES + LARGE_SHAPES
    methods = None if not quick else ["torch f32 F.linear", "torch int8 dynamic (fbgemm)", "ours int4", "ours lut4 (T-MAC)", "ours lut2 (T-MAC)"]
    rows = [] if "--no-layers" in argv else bench_layers(shapes, methods=methods, min_time=0.1 if quick else 0.3)
    if rows:
        show_rows([{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k not in ("bytes", "flops")} for r in rows])
    repeats = int(argv[argv.index("--repeats") + 1]) if "--repeats" in argv else 1
    model_rows = []
    for r in range(0 if "--no-model" in argv else repeats):  # repeated to show the run-to-run spread
        rows_r = bench_model(new_tokens=8 if quick else 32, prefill_len=prefill_len, compile="--no-compile" not in argv)
        llama = bench_llama_cpp(new_tokens=8 if quick else 32, prefill_len=prefill_len)
        if llama is None and r == 0:
            print("llama.cpp: llama-cpp-python is not installed; `pip install llama-cpp-python` adds its row")
        elif llama is not None:
            rows_r.append({k: v for k, v in llama.items() if k != "tokens"})
        add_ratios(rows_r, llama)
        for row in rows_r:
            row["run"] = r + 1
        model_rows += rows_r
    if model_rows:
        show_rows([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in model_rows])
    calibration = [bench_calibration()] if "--calibration" in argv else []
    if calibration:
        show_rows([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in calibration])
    goals = targets(rows, model_rows, bw)
    show_rows([{**g, "measured": round(g["measured"], 2)} for g in goals])
    res = Results("03_bench", {"quick": quick, "simd": K.simd_path(), "threads": torch.get_num_threads()},
                  tolerances={"*": None})  # timings of this machine: never compared
    res.metrics.update({"bandwidth_GBps": bw / 1e9, "peak_GFLOPs": fl / 1e9, "layers": rows, "model": model_rows, "targets": goals,
                        "calibration": calibration})
    if not quick:  # in a folder of its own: outputs/results holds the notebooks' results, which the tests compare
        atomic_write_text(outputs_dir() / "bench" / "03_bench.json", json.dumps(res.to_dict(), indent=2) + "\n")
        if model_rows:
            write_csv(model_rows, "03_bench_model")
            model_figure(model_rows)
        if rows:
            roofline_figure(rows, bw, fl)
    return res.metrics


if __name__ == "__main__":
    main()
