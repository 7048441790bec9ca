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
    ({"steps": [{"rtn": {"bits": 4}}, {"gptq": {"bits": 12}}]}, r"step 2 'gptq': GPTQConfig: bits must be an int in 2..8"),
    ({"steps": [{"prune": {"sparsity": 1.5}}]}, r"step 1 'prune': sparsity"),
    ({"steps": [{"gptq": {}}, {"distill": {"steps": 5}}]}, r"step 2 'distill' cannot follow step 1 'gptq' \(pack: true\)"),
    ({"steps": [{"smoothquant": {}}, {"rtn": {}}]}, r"step 2 'rtn' cannot follow step 1 'smoothquant' \(W8A8 layers\)"),
    ({"steps": [{"rtn": {"group_size": 48}}, {"export_gguf": {"fmt": "Q4_1"}}]}, r"step 2 'export_gguf'.*group_size=48"),
    ({"steps": [{"gptq": {"bits": 8}}, {"export_gguf": {"fmt": "Q4_1"}}]}, r"step 2 'export_gguf'.*bits=8"),
    ({"steps": [{"export_gguf": {"fmt": "Q5_K"}}]}, r"step 1 'export_gguf': unknown GGUF format 'Q5_K'"),
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
        "  - export_gguf: {fmt: Q4_1, tokenizer: false}\n  - export_safetensors: {name: packed, packed: true}\n"
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


def test_every_quantizer_and_pruner_config_is_a_step_with_the_librarys_own_fields():
    """One declaration: a step's fields are its library configs' fields, with their defaults."""
    from dataclasses import fields

    from shrinklib import prune, quant
    from shrinklib.recipe import STEPS

    for name, (config, _) in quant.METHODS.items():
        assert STEPS[name].configs[0] is config
        recipe = parse_recipe({"steps": [{name: {}}]})
        assert recipe.steps[0][1].parts[0] == config()
    assert STEPS["prune"].configs == (prune.PruneConfig,)
    gptq = parse_recipe({"steps": [{"gptq": {"damp": 0.05, "act_order": True, "backend": "lut"}}]}).steps[0][1]
    assert gptq.of(quant.GPTQConfig) == quant.GPTQConfig(damp=0.05, act_order=True) and gptq.backend == "lut"
    for method in prune.METHODS:
        p = parse_recipe({"steps": [{"prune": {"method": method, "per": "row", "percdamp": 0.05}}]}).steps[0][1]
        assert p.parts == (prune.PruneConfig(method, per="row", percdamp=0.05),)
    assert {f.name for f in fields(quant.GPTQConfig)} < set(parse_recipe({"steps": ["gptq"]}).steps[0][1].asdict())


@pytest.mark.parametrize("step,message", [
    ({"rtn": {"pack": "yes"}}, r"step 1 'rtn': field 'pack' must be true or false"),
    ({"gptq": {"backend": "gpu"}}, r"step 1 'gptq': backend must be one of \['reference'"),
    ({"rtn": {"fmt": "nf5"}}, r"step 1 'rtn': RTNConfig: unknown fmt 'nf5'"),
    ({"distill": {"hidden_weight": 0.5}}, r"step 1 'distill': hidden_weight needs projections"),
    ({"distill": {"divergence": "kl"}}, r"step 1 'distill': divergence must be one of"),
    ({"distill": {"steps": 0}}, r"step 1 'distill': steps and grad_accum must be ≥ 1"),
    ({"minitron_width": {"iterations": 0, "hidden": 64}}, r"step 1 'minitron_width': iterations must be ≥ 1"),
    ({"export_gguf": {"embed_type": "Q4_0"}}, r"step 1 'export_gguf': embed_type must be one of"),
    ({"evaluate": {"eval_tokens": 0}}, r"step 1 'evaluate': eval_tokens must be ≥ 2"),
])
def test_the_library_configs_check_the_step_fields(step, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"steps": [step]})


def test_an_export_is_one_registration(tmp_path):
    """A new export format: one `register_export` call makes it a validated, runnable step."""
    from pathlib import Path

    from common import make_picollama

    from shrinklib.export import ExportReport
    from shrinklib.recipe import STEPS, apply_recipe, register_export

    def export_npz(model, path: str | Path, tokenizer=None, dtype: str = "float32", check: bool = True) -> ExportReport:
        import numpy as np

        arrays = {k: v.detach().numpy().astype(dtype) for k, v in model.state_dict().items()}
        np.savez(path, **arrays)
        return ExportReport("npz", str(path), Path(path).stat().st_size, exact=dtype == "float32")

    register_export("export_npz", export_npz, ("dtype",), lambda p: f"{p.name}.npz")
    try:
        with pytest.raises(RecipeError, match=r"step 1 'export_npz': field 'dtype' must be a string, got 16"):
            parse_recipe({"steps": [{"export_npz": {"dtype": 16}}]})
        with pytest.raises(RecipeError, match=r"step 2 'export_npz' writes 'a.npz' in --out, as step 1 does"):
            parse_recipe({"steps": [{"export_npz": {"name": "a"}}, {"export_npz": {"name": "a"}}]})
        recipe = parse_recipe({"evaluation": {"eval_tokens": 0}, "steps": [{"export_npz": {"dtype": "float16"}}]})
        rows = apply_recipe(recipe, make_picollama(), None, out=tmp_path)
        assert rows[-1].notes.startswith("model.npz:") and (tmp_path / "model.npz").is_file()
    finally:
        STEPS.pop("export_npz")


class CharTokenizer:
    """Characters as ids: enough to build a corpus for a tiny model (vocabulary 128)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": torch.tensor([[3 + ord(c) % 120 for c in text]])})()

    def __len__(self):
        return 128


def toy_corpus():
    from shrinklib.data import Corpus, Document

    text = " ".join(f"word{i}" for i in range(400))
    return Corpus("toy", {s: [Document("toy", s, text)] for s in ("calib", "train", "eval")})


def toy_recipe(*steps, eval_tokens=64):
    return parse_recipe({"calibration": {"corpus": "toy", "n": 4, "seq_len": 32, "seed": 1},
                         "evaluation": {"eval_tokens": eval_tokens, "seq_len": 32}, "steps": list(steps)})


def assert_same_logits(a, b):
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


def test_apply_recipe_in_memory_equals_the_library_calls():
    """prune → quantize as recipe steps on a model in memory gives what prune_ then quantize_ give."""
    import copy

    from common import make_picollama

    from shrinklib.data import calibration_batch
    from shrinklib.prune import PruneConfig, prune_
    from shrinklib.quant import RTNConfig, quantize_
    from shrinklib.recipe import apply_recipe

    model, tok, corpus = make_picollama(), CharTokenizer(), toy_corpus()
    expected = copy.deepcopy(model)
    rows = apply_recipe(toy_recipe({"prune": {"method": "wanda", "sparsity": 0.5}},
                                   {"rtn": {"bits": 4, "group_size": 16, "symmetric": True}}), model, tok, corpus=corpus)
    prune_(expected, PruneConfig("wanda", 0.5), calibration_batch(corpus, tok, 4, 32, seed=1), progress=False)
    quantize_(expected, RTNConfig(bits=4, group_size=16, symmetric=True), progress=False)
    assert_same_logits(model, expected)
    assert [r.step for r in rows] == ["input", "prune", "rtn"] and rows[0].size_bytes > rows[2].size_bytes
    assert all(r.ppl is not None for r in rows)


@pytest.mark.parametrize("step", ["llm_pruner", "slicegpt", "minitron_width", "minitron_depth", "distill"])
def test_the_structured_and_training_steps_equal_the_library_calls(step):
    import copy

    from common import make_picollama

    from shrinklib import minitron
    from shrinklib.data import WindowConfig, calibration_batch, window_batches
    from shrinklib.distill import KDConfig, kd_loss_fn
    from shrinklib.prune import LLMPrunerConfig, SliceGPTConfig, llm_prune_, slicegpt_
    from shrinklib.recipe import STEPS, apply_recipe
    from shrinklib.recipe_checks import ModelFacts
    from shrinklib.train import TrainConfig, train

    model, tok, corpus = make_picollama(hidden=64), CharTokenizer(), toy_corpus()
    expected, calib = copy.deepcopy(model), calibration_batch(corpus, tok, 4, 32, seed=1)
    facts = ModelFacts(copy.deepcopy(model))  # the input sizes the checks predict for what the step leaves
    fields = {"llm_pruner": {"ratio": 0.25}, "slicegpt": {"slicing": 0.25}, "minitron_width": {"intermediate": 32},
              "minitron_depth": {"n_drop": 1, "metric": "cosine"},
              "distill": {"steps": 3, "lr": 1e-3, "batch_size": 2, "seq_len": 16, "top_k": 8, "progress": False}}[step]
    recipe = toy_recipe({step: fields}, eval_tokens=0)
    STEPS[step].check_model(recipe.steps[0][1], facts)
    rows = apply_recipe(recipe, model, tok, corpus=corpus)
    if step == "llm_pruner":
        llm_prune_(expected, LLMPrunerConfig(0.25), calib)
    elif step == "slicegpt":
        slicegpt_(expected, SliceGPTConfig(0.25), calib)
    elif step == "minitron_width":
        minitron.prune_width_(expected, minitron.activation_importance(expected, calib), intermediate=32)
    elif step == "minitron_depth":
        minitron.prune_depth_(expected, 1, calib, "cosine")
    else:
        teacher = copy.deepcopy(expected)
        batch = window_batches(corpus.tokens(tok, "train"), WindowConfig(2, 16), 3)
        train(expected, batch, kd_loss_fn(teacher, KDConfig(top_k=8)), TrainConfig(steps=3, lr=1e-3, progress=False))
        expected.eval()
    assert_same_logits(model, expected)
    assert rows[-1].params < rows[0].params or step in ("distill", "slicegpt")
    assert facts.sizes == ModelFacts(model).sizes


def test_nothing_exports_a_sliced_model():
    with pytest.raises(RecipeError, match=r"step 2 'export_safetensors' cannot export what step 1 'slicegpt' leaves"):
        parse_recipe({"steps": [{"slicegpt": {}}, {"export_safetensors": {}}]})


def test_sizes_follow_structured_pruning_into_the_nm_check():
    """2:4 needs input sizes that are multiples of 4: the check sees the sizes LLM-Pruner leaves
    (64 MLP channels: 48 after removing 25%, 63 after 3%)."""
    from common import make_picollama

    from shrinklib.recipe_checks import check_model

    model = make_picollama(hidden=64, intermediate=64)
    check_model(toy_recipe({"llm_pruner": {"ratio": 0.25}}, {"prune": {"n": 2, "m": 4}}), model)  # 48 channels
    with pytest.raises(RecipeError, match=r"step 2 'prune': 2:4 pruning needs .* input size\(s\) \[63\]"):
        check_model(toy_recipe({"llm_pruner": {"ratio": 0.03}}, {"prune": {"n": 2, "m": 4}}), model)


def test_the_steps_ask_the_architecture_adapter_what_a_model_can_take():
    """The structured steps run on every architecture the adapter takes them for (OPT: its KV heads
    are its query heads, it has no num_key_value_heads); where an entry cannot take a step, the
    check says why before any work."""
    from common import make_picoopt

    from shrinklib.recipe_checks import check_model

    opt = make_picoopt()
    check_model(toy_recipe({"minitron_depth": {"n_drop": 1}}, {"minitron_width": {"intermediate": 32, "heads_per_group": 1}},
                           {"llm_pruner": {"ratio": 0.25}}, {"slicegpt": {"slicing": 0.25}}, {"awq": {}}), opt)
    with pytest.raises(RecipeError, match=r"step 1 'minitron_width': minitron_width is unsupported for opt because its "
                                          r"config derives the head width"):
        check_model(toy_recipe({"minitron_width": {"hidden": 16}}), opt)
    with pytest.raises(RecipeError, match=r"step 1 'export_gguf': export_gguf is unsupported for opt because"):
        check_model(toy_recipe({"export_gguf": {"name": "m"}}), opt)


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
                                   "  - export_gguf: {fmt: Q4_1}\n", "h30", [],
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


@pytest.mark.parametrize("step, config", [
    ({"mx": {"fmt": "nvfp4"}}, "MXConfig('nvfp4')"),
    ({"mx": {"fmt": "mxfp4", "method": "gptq"}}, "MXConfig('mxfp4', method='gptq')"),
    ({"hqq": {"bits": 3, "group_size": 16}}, "HQQConfig(bits=3, group_size=16)"),
    ({"gptaq": {"bits": 3, "group_size": 16}}, "GPTAQConfig(bits=3, group_size=16)"),
    ({"autoround": {"bits": 3, "group_size": 16, "steps": 2, "max_tokens": 32}},
     "AutoRoundConfig(bits=3, group_size=16, steps=2, max_tokens=32)"),
    ({"qat": {"bits": 2, "group_size": 16, "steps": 2}}, "QATConfig(bits=2, group_size=16, steps=2)"),
])
def test_number_format_and_rounding_steps_equal_the_library_calls(step, config):
    """MX/NVFP4 (rounded to nearest or by GPTQ), HQQ, GPTAQ, AutoRound and QAT are recipe steps; each gives
    what quantize_ gives (the same calibration batch for the methods that read one; none read for
    round-to-nearest MX and HQQ)."""
    import copy

    from common import make_picollama

    from shrinklib import quant
    from shrinklib.data import calibration_batch
    from shrinklib.recipe import STEPS, apply_recipe

    name = next(iter(step))
    model, tok, corpus = make_picollama(), CharTokenizer(), toy_corpus()
    expected = copy.deepcopy(model)
    apply_recipe(toy_recipe(step), model, tok, corpus=corpus)
    config = eval(config, vars(quant))
    calibration_free = isinstance(config, quant.HQQConfig) or (isinstance(config, quant.MXConfig) and config.method == "rtn")
    assert STEPS[name].reads(parse_recipe({"steps": [step]}).steps[0][1]) == (() if calibration_free else ("calib",))
    quant.quantize_(expected, config, None if calibration_free else calibration_batch(corpus, tok, 4, 32, seed=1),
                    progress=False)
    assert_same_logits(model, expected)
