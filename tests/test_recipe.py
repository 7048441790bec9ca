"""Recipes: validated before any work starts, and run end to end on the embedded model."""

import json

import pytest

from shrinklib.__main__ import main
from shrinklib.recipe import RecipeError, load_recipe, parse_recipe

BAD = [
    ({"steps": [{"quantise": {"bits": 4}}]}, r"step 1: unknown step 'quantise'"),
    ({"steps": [{"gptq": {"bitz": 4}}]}, r"step 1 'gptq': unknown field 'bitz'"),
    ({"steps": [{"rtn": {"bits": "four"}}]}, r"step 1 'rtn': field 'bits' must be int"),
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
