"""Recipes: validated before any work starts, and run end to end on the embedded model."""

import json

import pytest
import torch

from shrinklib.__main__ import main
from shrinklib.recipe import RecipeError, load_recipe, parse_recipe

BAD = [
    ({"steps": [{"quantise": {"bits": 4}}]}, r"step 1: unknown step 'quantise'"),
    ({"steps": [{"gptq": {"bitz": 4}}]}, r"step 1 'gptq': unknown field 'bitz'"),
    ({"steps": [{"rtn": {"bits": "four"}}]}, r"step 1 'rtn': field 'bits' must be an integer"),
    ({"steps": [{"rtn": {"bits": 4}}, {"gptq": {"bits": 12}}]}, r"step 2 'gptq': bits must be in 2..8"),
    ({"steps": [{"prune": {"sparsity": 1.5}}]}, r"step 1 'prune': sparsity"),
    ({"steps": [{"gptq": {}}, {"distill": {"steps": 5}}]}, r"step 2 'distill' cannot follow step 1 'gptq'"),
    ({"steps": [{"rtn": {"group_size": 48}}, {"export_gguf": {"format": "Q4_1"}}]}, r"step 2 'export_gguf'.*group_size=48"),
    ({"steps": [{"gptq": {"bits": 8}}, {"export_gguf": {"format": "Q4_1"}}]}, r"step 2 'export_gguf'.*bits=8"),
    ({"steps": [{"export_gguf": {"format": "Q5_K"}}]}, r"step 1 'export_gguf': format must be one of"),
    ({"steps": []}, r"non-empty 'steps'"),
    ({"steps": [{"rtn": {}}], "calibraton": {}}, r"unknown top-level key"),
    ({"steps": [{"rtn": {}}], "calibration": {"n": 0}}, r"calibration: n ≥ 1"),
]


@pytest.mark.parametrize("recipe,message", BAD)
def test_bad_recipes_are_rejected_with_step_and_field(recipe, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)


def test_bad_recipe_fails_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import shrinklib.models

    monkeypatch.setattr(shrinklib.models, "load_model", lambda *a, **k: pytest.fail("model loaded for a bad recipe"))
    f = tmp_path / "bad.yaml"
    f.write_text("steps:\n  - minitron_depth: {n_drop: 2}\n  - gptq: {bits: 4, group_size: 64}\n  - distill: {steps: 3}\n")
    assert main(["compress", "smollm2-135m", "--recipe", str(f), "--out", str(tmp_path / "out")]) == 2
    assert "step 3 'distill' cannot follow step 2 'gptq'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_example_recipes_validate():
    from pathlib import Path

    import shrinklib

    files = sorted((Path(shrinklib.__file__).parent / "recipes").glob("*.yaml"))
    assert files
    for f in files:
        assert load_recipe(f).steps


def test_recipe_end_to_end_on_the_embedded_model(tmp_path):
    """Depth-prune SmolLM2 to 3 blocks, RTN 4-bit g32, export GGUF Q4_1 and packed safetensors."""
    f = tmp_path / "r.yaml"
    f.write_text(
        "name: tiny\ncalibration: {n: 4, seq_len: 64}\nevaluation: {eval_tokens: 256}\nsteps:\n"
        "  - minitron_depth: {n_drop: 27, metric: cosine}\n  - rtn: {bits: 4, group_size: 32}\n"
        "  - export_gguf: {format: Q4_1, tokenizer: false}\n  - export_safetensors: {name: packed, packed: true}\n"
    )
    assert main(["compress", "smollm2-135m", "--recipe", str(f), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["step"] for r in rows] == ["input", "minitron_depth", "rtn", "export_gguf", "export_safetensors"]
    sizes = [r["size_bytes"] for r in rows]
    assert sizes[0] > sizes[1] > sizes[2]
    assert all(r["ppl"] is not None for r in rows)
    assert (tmp_path / "out" / "model.Q4_1.gguf").stat().st_size < sizes[2]
    assert (tmp_path / "out" / "packed" / "quantization.json").is_file()
    assert "reload max|Δlogit|" in rows[3]["notes"]


def test_results_points_reads_both_shapes_with_each_notebooks_baseline():
    from shrinklib.recipe import results_points

    files = [
        {"notebook": "02_x", "metrics": {"ppl": {"fp32": 10.0, "gptq/4bit": 12.0, "orphan": 9.0},
                                          "size_bytes": {"fp32": 400.0, "gptq/4bit": 100.0}}},
        {"notebook": "05_x", "metrics": {"ppl": {"original": 20.0, "pruned": 30.0}, "params": {"original": 100, "pruned": 80},
                                          "decode_s_per_token": {"pruned": 0.5}}},
        {"notebook": "00_x", "metrics": {"perplexity": 11.0, "size_bytes": 440.0}},
        {"notebook": "99_x", "metrics": {"ppl": [1, 2], "other": "text"}},
    ]
    got = {(p["notebook"], p["technique"]): p for p in results_points(files)}
    assert set(got) == {("02_x", "fp32"), ("02_x", "gptq/4bit"), ("05_x", "original"), ("05_x", "pruned"), ("00_x", "00_x")}
    assert got["02_x", "gptq/4bit"]["size_bytes"] == 100.0 and got["02_x", "gptq/4bit"]["baseline_ppl"] == 10.0
    assert got["05_x", "pruned"]["size_bytes"] == 320.0  # 80 float32 parameters
    assert got["05_x", "pruned"]["latency_s"] == 0.5 and got["05_x", "original"]["latency_s"] is None
    assert got["05_x", "pruned"]["baseline_ppl"] == 20.0 and got["00_x", "00_x"]["baseline_ppl"] == 11.0


# ----------------------------------------------------------------------------- everything is checked before any work


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny local model folders with SmolLM2's tokenizer: plain, hidden 30 (no 2:4, no Q4 blocks),
    a vocabulary smaller than the tokenizer, and one whose config says it is quantized."""
    import json as js

    from common import make_picollama

    from shrinklib.models import load_model

    tok = load_model()[1]
    root = tmp_path_factory.mktemp("models")
    specs = {"tiny": dict(vocab=len(tok)), "h30": dict(vocab=len(tok), hidden=30, heads=3, kv_heads=1),
             "smallvocab": dict(vocab=128), "gptq": dict(vocab=len(tok))}
    for name, kw in specs.items():
        model = make_picollama(**kw)
        model.config.max_position_embeddings = 1024
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    cfg = js.loads((root / "gptq" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (root / "gptq" / "config.json").write_text(js.dumps(cfg))
    return root


GOOD = "evaluation: {eval_tokens: 0}\nsteps:\n  - rtn: {bits: 4, group_size: 32}\n"
DRY_RUN_CASES = {  # case: (recipe, model, extra arguments, the one-line message)
    "unknown corpus": ("calibration: {corpus: pydocs}\nsteps:\n  - gptq: {}\n", "tiny", [],
                       "Unknown corpus 'pydocs' (did you mean 'pydoc'?): use one of ['c4', 'pydoc', 'wikitext2'] or a "
                       "path to a text file"),
    "missing corpus file": ("calibration: {corpus: /no/such/notes.txt}\nsteps:\n  - gptq: {}\n", "tiny", [],
                            "No text file at /no/such/notes.txt"),
    "eval_tokens -5": ("evaluation: {eval_tokens: -5}\nsteps:\n  - rtn: {}\n", "tiny", [],
                       "evaluation: eval_tokens must be 0 (off) or ≥ 2, got -5"),
    "seq_len 0": ("evaluation: {seq_len: 0}\nsteps:\n  - rtn: {}\n", "tiny", [],
                  "evaluation: seq_len must be ≥ 2 (a window predicts all but its first token), got 0"),
    "2:4 of input size 30": ("evaluation: {eval_tokens: 0}\nsteps:\n  - prune: {method: magnitude, n: 2, m: 4}\n", "h30",
                             [], "step 1 'prune': 2:4 pruning needs every linear's input size to be a multiple of 4, "
                                 "but this model has input size(s) [30]"),
    "Q4 blocks of input size 30": ("evaluation: {eval_tokens: 0}\nsteps:\n  - rtn: {bits: 4, group_size: 32}\n"
                                   "  - export_gguf: {format: Q4_1}\n", "h30", [],
                                   "step 2 'export_gguf': format Q4_1 (blocks of 32 inputs) needs every linear's input "
                                   "size to be a multiple of 32, but this model has input size(s) [30]"),
    "missing model folder": (GOOD, "./no/such/model", [], "No model folder at no/such/model"),
    "missing hub model": (GOOD, "no-such-org/no-such-model", [],
                          "Could not load model 'no-such-org/no-such-model'"),
    "device cuda without a GPU": (GOOD, "tiny", ["--device", "cuda" if not torch.cuda.is_available()
                                                 else f"cuda:{torch.cuda.device_count()}"], "device 'cuda"),
    "unknown device": (GOOD, "tiny", ["--device", "gpu"], "unknown device 'gpu'"),
    "--out is a file": (GOOD, "tiny", ["OUT=file"], "is a file or a link, not a folder; choose another path"),
    "--out holds the user's files": (GOOD, "tiny", ["OUT=folder"], "already exists and was not written by the suite "
                                                                   "(it holds checkpoints/, notes.txt)"),
    "export name absolute": ("steps:\n  - export_safetensors: {name: /abs/path}\n", "tiny", [],
                             "step 1 'export_safetensors': name must be a plain name inside the output folder"),
    "export name ..": ("steps:\n  - export_gguf: {name: ../x}\n", "tiny", [], "name must be a plain name"),
    "export name empty": ("steps:\n  - export_safetensors: {name: ''}\n", "tiny", [],
                          "name must be a non-empty file name, got ''"),
    "export name of the summary": ("steps:\n  - export_safetensors: {name: summary.json}\n", "tiny", [],
                                   "name 'summary.json' is the recipe's own summary.json"),
    "two exports, one path": ("steps:\n  - export_safetensors: {}\n  - rtn: {pack: false}\n  - export_safetensors: {}\n",
                              "tiny", [], "step 3 'export_safetensors' writes 'model' in --out, as step 1 does"),
    "a key given twice": ("steps:\n  - rtn: {bits: 4, bits: 3}\n", "tiny", [],
                          "recipe: key 'bits' is given twice in one mapping (lines 2 and 2)"),
    "already quantized": (GOOD, "gptq", [], "step 1 'rtn': this model is already quantized (quantization_config 'gptq'); "
                                           "quantize the float model it came from"),
    "seq_len beyond the context": ("calibration: {seq_len: 2048}\nsteps:\n  - gptq: {}\n", "tiny", [],
                                   "calibration: seq_len=2048 exceeds the model's context of 1024 tokens"),
    "tokenizer of another model": (GOOD, "smallvocab", [], "the model's tokenizer has 49,152 tokens but its vocabulary "
                                                           "only 128 rows"),
    "empty corpus file": ("calibration: {corpus: CORPUS=empty}\nsteps:\n  - gptq: {}\n", "tiny", [],
                          "is empty; give a text file of paragraphs"),
    "too-short corpus file": ("calibration: {corpus: CORPUS=short, seq_len: 128}\nsteps:\n  - gptq: {}\n", "tiny", [],
                              "split of corpus 'short'"),
    "n_drop ≥ layers": ("steps:\n  - minitron_depth: {n_drop: 2}\n", "tiny", [],
                        "step 1 'minitron_depth': n_drop=2 but the model has only 2 layers"),
}


@pytest.mark.parametrize("case", list(DRY_RUN_CASES))
def test_dry_run_catches_it_with_one_line_and_writes_nothing(case, models, tmp_path, capsys):
    recipe, model, extra, message = DRY_RUN_CASES[case]
    out = tmp_path / "out"
    if "OUT=file" in extra:
        out.write_text("a file of mine")
    if "OUT=folder" in extra:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "checkpoints").mkdir()
    extra = [a for a in extra if not a.startswith("OUT=")]
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "short.txt").write_text("\n\n".join(f"Paragraph {i} is short." for i in range(40)))
    recipe = recipe.replace("CORPUS=", str(tmp_path) + "/").replace("/empty", "/empty.txt").replace("/short", "/short.txt")
    (tmp_path / "r.yaml").write_text(recipe)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    model = str(models / model) if (models / model).is_dir() else model
    code = main(["compress", model, "--recipe", str(tmp_path / "r.yaml"), "--out", str(out), "--dry-run", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed


def test_dry_run_of_a_good_recipe_and_the_export_before_quantization_warning(models, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("evaluation: {eval_tokens: 64}\nsteps:\n  - export_safetensors: {name: fp32}\n"
                                     "  - gptq: {group_size: 32}\n  - evaluate: {eval_tokens: 64}\n")
    assert main(["compress", str(models / "tiny"), "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
                 "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert ("warning: step 1 'export_safetensors' exports the model before step 2 'gptq' quantizes it, and no later step "
            "exports the quantized model") in err
    assert not (tmp_path / "out").exists()


def test_a_failed_run_is_never_mistaken_for_a_finished_one(models, tmp_path, capsys, monkeypatch):
    """A step that fails after an export: one line, exit 2, --out untouched, the finished steps in <out>.failed."""
    import shrinklib.quant

    def broken(*args, **kwargs):
        raise RuntimeError("no space left\non device")

    (tmp_path / "r.yaml").write_text("evaluation: {eval_tokens: 0}\nsteps:\n  - export_safetensors: {name: fp32, check: false}\n"
                                     "  - rtn: {bits: 4, group_size: 32}\n  - export_safetensors: {name: q4}\n")
    args = ["compress", str(models / "tiny"), "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert main(args) == 0  # a finished run
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    monkeypatch.setattr(shrinklib.quant, "quantize_", broken)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: step 2 'rtn' failed: RuntimeError: no space left on device; the finished steps' outputs "
                       f"are in {tmp_path / 'out.failed'}")
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == first  # the finished run is intact
    failed = tmp_path / "out.failed"
    assert (failed / "FAILED.txt").read_text().startswith("StepFailed: step 2 'rtn' failed")
    assert (failed / "fp32" / "model.safetensors").is_file() and not (failed / "q4").exists()
    assert [r["step"] for r in json.loads((failed / "summary.json").read_text())] == ["input", "export_safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.failed", "r.yaml"]  # no temporaries
