"""Merging: invariants (identical models, scale 0), hand-computed TIES and DARE cases,
SLERP geometry, the mergekit-shaped YAML round trip, lazy file merges, soups and the path."""

import pytest
import torch
from common import make_picollama, random_ids

from shrinklib.merge import (
    METHODS, MergeConfig, ModelSpec, drop_and_rescale, greedy_soup, load_config, loss_along_path, loss_barrier,
    merge_files, merge_state_dicts, merge_task_arithmetic, merge_ties, save_config, slerp, trim_magnitude,
    uniform_soup,
)
from shrinklib.merge.config import config_to_dict

PARAMS = {"linear": {}, "task_arithmetic": {}, "ties": {}, "dare_linear": {"seed": 3}, "dare_ties": {"seed": 3},
          "slerp": {"t": 0.3}}


def sd(seed):
    return {k: v.clone() for k, v in make_picollama(seed).state_dict().items()}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_merging_identical_models_is_the_identity(method):
    a = sd(0)
    n = METHODS[method].n_models or 3
    dens = [0.5] * n if method.startswith("dare") or method == "ties" else None
    out = merge_state_dicts(method, [sd(0) for _ in range(n)], densities=dens,
                            base=sd(0) if METHODS[method].needs_base else None, params=PARAMS[method])
    assert out.keys() == a.keys()
    for k in a:
        torch.testing.assert_close(out[k], a[k], rtol=1e-6, atol=1e-7)


def test_identical_finetunes_of_another_base_come_back_unchanged():
    base, ft = sd(0), sd(1)
    for method, kw in [("linear", {}), ("ties", {"densities": [1.0] * 3}), ("task_arithmetic", {"weights": [1 / 3] * 3})]:
        out = merge_state_dicts(method, [ft, ft, ft], base=base if method != "linear" else None, **kw)
        for k in ft:
            torch.testing.assert_close(out[k], ft[k], rtol=1e-5, atol=1e-6)


def test_task_arithmetic_scale_zero_is_the_base():
    base, a, b = sd(0), sd(1), sd(2)
    for method in ["task_arithmetic", "ties", "dare_linear", "dare_ties"]:
        out = merge_state_dicts(method, [a, b], densities=[0.5, 0.5], base=base, params={"lambda": 0.0})
        for k in base:
            torch.testing.assert_close(out[k], base[k], rtol=0, atol=0)


def test_task_arithmetic_hand_case():
    base = torch.tensor([1.0, 2.0])
    out = merge_task_arithmetic(base, [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0])], [1.0, 0.5], scale=2.0)
    # τ1 = (1, 0), τ2 = (0, 2); base + 2 · (τ1 + 0.5 τ2) = (3, 4)
    torch.testing.assert_close(out, torch.tensor([3.0, 4.0]))


def test_ties_hand_case():
    base = torch.ones(4)
    t1 = base + torch.tensor([1.0, -2.0, 3.0, 0.5])  # trimmed to (0, -2, 3, 0)
    t2 = base + torch.tensor([-3.0, 1.5, 1.0, 0.2])  # trimmed to (-3, 1.5, 0, 0)
    # elected signs (−, −, +, 0); disjoint mean (−3, −2, 3, 0)
    out = merge_ties(base, [t1, t2], density=0.5)
    torch.testing.assert_close(out, base + torch.tensor([-3.0, -2.0, 3.0, 0.0]))
    # with agreeing signs the disjoint mean averages: τ = (2, 4) and (4, 0) -> trimmed (0, 4), (4, 0)... keep all
    out = merge_ties(torch.zeros(2), [torch.tensor([2.0, 4.0]), torch.tensor([4.0, -1.0])], density=1.0)
    torch.testing.assert_close(out, torch.tensor([3.0, 4.0]))


def test_trim_keeps_exactly_density_entries():
    tau = torch.randn(10, 10, generator=torch.Generator().manual_seed(0))
    out = trim_magnitude(tau, 0.3)
    assert out.count_nonzero() == 30
    assert out.abs().max() == tau.abs().max() and out[out != 0].abs().min() >= tau.abs().flatten().sort().values[-30]
    tied = torch.tensor([1.0, -1.0, 1.0, 1.0, 0.5])  # four entries tie for the 2 places
    out = trim_magnitude(tied, 0.4)
    assert out.count_nonzero() == 2 and set(out[out != 0].abs().tolist()) == {1.0}


def test_dare_drop_and_rescale():
    tau = torch.randn(200, 200, generator=torch.Generator().manual_seed(0))
    out = drop_and_rescale(tau, 0.25, torch.Generator().manual_seed(1))
    kept = out != 0
    torch.testing.assert_close(out[kept], tau[kept] / 0.25)  # survivors rescaled by 1/(1 - p)
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    mean = torch.stack([drop_and_rescale(tau[:4, :4], 0.5, torch.Generator().manual_seed(s)) for s in range(4000)]).mean(0)
    torch.testing.assert_close(mean, tau[:4, :4], atol=0.1, rtol=0.1)  # unbiased: E[τ̃] = τ
    torch.testing.assert_close(drop_and_rescale(tau, 1.0), tau)


def test_dare_merge_hand_case_and_seed():
    base = torch.zeros(3)
    m = [torch.tensor([1.0, 2.0, 3.0])]
    # density 1: no drop, dare_linear is task arithmetic
    out = merge_state_dicts("dare_linear", [{"w": m[0]}], densities=[1.0], base={"w": base})["w"]
    torch.testing.assert_close(out, m[0])
    # density 0.5: every entry is 0 or 2τ; the seed fixes the masks
    a = merge_state_dicts("dare_linear", [{"w": torch.arange(1.0, 1001)}], densities=[0.5], base={"w": torch.zeros(1000)}, params={"seed": 1})["w"]
    b = merge_state_dicts("dare_linear", [{"w": torch.arange(1.0, 1001)}], densities=[0.5], base={"w": torch.zeros(1000)}, params={"seed": 1})["w"]
    c = merge_state_dicts("dare_linear", [{"w": torch.arange(1.0, 1001)}], densities=[0.5], base={"w": torch.zeros(1000)}, params={"seed": 2})["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert bool(((a == 0) | (a == 2 * torch.arange(1.0, 1001))).all())
    # dare_ties at density 1 (nothing dropped): τ1 = (2, −1), τ2 = (−1, −3); elected signs (+, −);
    # entry 0 keeps τ1's 2 only, entry 1 averages −1 and −3
    out = merge_state_dicts("dare_ties", [{"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([-1.0, -3.0])}],
                            densities=[1.0, 1.0], base={"w": torch.zeros(2)})["w"]
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0]))


def test_the_task_vector_methods_are_choices_of_one_merge():
    """TIES, DARE and task arithmetic are `merge_task_vectors` with a sparsification and a consensus
    choice; every combination works, and magnitude trim without consensus is checked by hand."""
    from shrinklib.merge import merge_task_vectors
    from shrinklib.merge.registry import tensor_seed

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    ts = [base + torch.randn(6, 5, generator=g) for _ in range(3)]
    choices = {"task_arithmetic": (None, None), "ties": ("magnitude", "sign"), "dare_linear": ("random", None),
               "dare_ties": ("random", "sign")}
    for method, (sparsify, consensus) in choices.items():
        out = merge_state_dicts(method, [{"w": t} for t in ts], [0.5, 1.0, 2.0], [0.4, 0.6, 0.8], {"w": base},
                                {"lambda": 0.7, "seed": 3})["w"]
        ref = merge_task_vectors(base, ts, [0.5, 1.0, 2.0], [0.4, 0.6, 0.8], 0.7, sparsify, consensus, tensor_seed(3, "w"))
        assert torch.equal(out, ref), method
    # magnitude trim, no consensus: τ1 = (4, −1, 0.5) → (4, 0, 0), τ2 = (−2, 3, 0) → (0, 3, 0)
    out = merge_task_vectors(torch.zeros(3), [torch.tensor([4.0, -1.0, 0.5]), torch.tensor([-2.0, 3.0, 0.0])],
                             [1.0, 0.5], density=1 / 3, sparsify="magnitude")
    torch.testing.assert_close(out, torch.tensor([4.0, 1.5, 0.0]))
    # DARE takes one density per model: each task vector keeps its own fraction
    big = torch.ones(20_000)
    out = merge_task_vectors(torch.zeros(20_000), [big, 2 * big], density=[0.2, 0.8], sparsify="random")
    kept1, kept2 = ((out == 5.0) | (out == 5.0 + 2.5)).float().mean(), ((out == 2.5) | (out == 7.5)).float().mean()
    assert abs(kept1.item() - 0.2) < 0.01 and abs(kept2.item() - 0.8) < 0.01
    with pytest.raises(ValueError, match="sparsify must be None or one of"):
        merge_task_vectors(base, ts, sparsify="topk")


def test_slerp_geometry():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(0.0, v0, v1), v0)
    torch.testing.assert_close(slerp(1.0, v0, v1), v1)
    mid = slerp(0.5, v0, v1)  # on the unit circle at 45°, unlike the lerp (0.5, 0.5)
    torch.testing.assert_close(mid, torch.tensor([2**-0.5, 2**-0.5]))
    torch.testing.assert_close(slerp(0.25, v0, 3 * v0), 1.5 * v0)  # colinear: lerp


def test_yaml_round_trip_and_mergekit_shape():
    text = """
merge_method: ties
base_model: org/base
models:
  - model: org/math
    parameters:
      weight: 1.0
      density: 0.5
  - model: org/code
    parameters:
      weight: 0.5
      density: 0.3
parameters:
  normalize: true
  lambda: 1.0
dtype: bfloat16
tokenizer_source: base
"""
    c = load_config(text)
    assert c.merge_method == "ties" and c.base_model == "org/base" and c.dtype == "bfloat16"
    assert c.weights() == [1.0, 0.5] and c.densities() == [0.5, 0.3]
    again = load_config(save_config(c))
    assert config_to_dict(again) == config_to_dict(c)
    import yaml
    assert yaml.safe_load(save_config(c)) == yaml.safe_load(text)
    # slerp in mergekit's form lists the base among the models
    s = load_config("merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\nparameters:\n  t: 0.5\n")
    assert [m.model for m in s.inputs()] == ["b"]


@pytest.mark.parametrize("bad, msg", [
    ("merge_method: nope\nmodels:\n  - model: a\n", "Unknown merge_method"),
    ("merge_method: ties\nmodels:\n  - model: a\n", "needs base_model"),
    ("merge_method: linear\nslices: []\n", "slices"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [0, 1]\n", "gradients"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      density: 1.5\n", "density"),
])
def test_config_errors_are_clear(bad, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(bad)


def test_lazy_file_merge_equals_in_memory(tmp_path):
    paths = []
    for s in range(3):
        make_picollama(s).save_pretrained(tmp_path / f"m{s}")
        paths.append(str(tmp_path / f"m{s}"))
    cfg = MergeConfig("ties", [ModelSpec(paths[1], 1.0, 0.5), ModelSpec(paths[2], 0.5, 0.5)], paths[0], {"lambda": 0.8})
    (tmp_path / "merge.yaml").write_text(save_config(cfg))
    out = merge_files(load_config(tmp_path / "merge.yaml"), tmp_path / "out", max_shard_bytes=20_000, progress=False)
    assert (out / "model.safetensors.index.json").is_file()  # small shards: several files
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = merge_state_dicts("ties", [sd(1), sd(2)], [1.0, 0.5], [0.5, 0.5], base=sd(0), params={"lambda": 0.8})
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, ref[k])


def test_soups():
    sds = [{"w": torch.tensor([float(i)])} for i in range(4)]
    torch.testing.assert_close(uniform_soup(sds)["w"], torch.tensor([1.5]))
    # score prefers w close to 1: ingredient 3 must be rejected
    soup, kept = greedy_soup(sds, lambda s: -abs(s["w"].item() - 1.0))
    assert kept[0] == 1 and 3 not in kept


def test_loss_along_path():
    model = make_picollama(0)
    a, b = sd(0), sd(1)
    ids = random_ids()
    loss = lambda m: m(ids, labels=ids).loss.item()  # noqa: E731
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = loss_along_path(model, a, b, loss, [0.0, 0.5, 1.0])
    assert losses[0] == pytest.approx(loss(make_picollama(0)))
    assert losses[2] == pytest.approx(loss(make_picollama(1)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
    assert loss_barrier([0, 0.5, 1], [1.0, 1.5, 2.0]) == 0.0
    assert loss_barrier([0, 0.5, 1], [1.0, 3.0, 1.0]) == 2.0


# ----------------------------------------------------------------------------- merges that cannot be right are refused


@pytest.mark.parametrize("method, kw, message", [
    ("linear", {"weights": [1.0, -1.0]}, r"weights \[1.0, -1.0\] sum to 0, and a normalized merge divides by their sum"),
    ("linear", {"weights": [float("nan"), 1.0]}, "weights must be finite numbers"),
    ("linear", {"weights": [1.0]}, "1 weights for 2 models; give exactly one per model"),
    ("task_arithmetic", {"weights": [1.0]}, "1 weights for 2 models"),
    ("ties", {"weights": [1.0, 1.0, 1.0]}, "3 weights for 2 models"),
    ("dare_linear", {"densities": [0.5]}, "1 densities for 2 models"),
])
def test_bad_weights_are_refused(method, kw, message):
    base = sd(0) if METHODS[method].needs_base else None
    with pytest.raises(ValueError, match=message):
        merge_state_dicts(method, [sd(1), sd(2)], base=base, **kw)


def test_each_method_function_refuses_a_short_weight_list():
    """The per-tensor functions no longer drop models silently (zip)."""
    from shrinklib.merge import merge_dare, merge_linear

    base, ts = torch.zeros(3), [torch.ones(3), 2 * torch.ones(3)]
    for fn in (lambda: merge_task_arithmetic(base, ts, [1.0]), lambda: merge_ties(base, ts, [1.0]),
               lambda: merge_dare(base, ts, [1.0]), lambda: merge_linear(ts, [1.0])):
        with pytest.raises(ValueError, match="1 weights for 2 models"):
            fn()


def test_different_vocabularies_name_the_tensor_and_both_shapes():
    small = {k: v.clone() for k, v in make_picollama(1, vocab=64).state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor 'model.embed_tokens.weight': model 1 has shape \(64, 32\), "
                                         r"the base \(128, 32\); merging needs models of one architecture"):
        merge_state_dicts("task_arithmetic", [sd(1), small], base=sd(0))
    with pytest.raises(ValueError, match="model 1 has no tensor 'model.layers.1"):
        merge_state_dicts("linear", [sd(1), {k: v for k, v in sd(2).items() if ".layers.1." not in k}])


def test_non_finite_results_are_never_written(tmp_path):
    paths = []
    for s in range(2):
        m = make_picollama(s)
        if s == 1:
            m.model.norm.weight.data[0] = float("inf")
        m.save_pretrained(tmp_path / f"m{s}")
        paths.append(str(tmp_path / f"m{s}"))
    with pytest.raises(ValueError, match=r"merged tensor 'model.norm.weight' has 1 non-finite value\(s\)"):
        merge_files(MergeConfig("linear", [ModelSpec(p) for p in paths]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1"]


@pytest.mark.parametrize("bad, msg", [
    ("merge_method: linear\nmodels:\n  - model: a\ndtype: fp16\n", "unknown dtype 'fp16'; use one of float32, float16, bfloat16"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: -1}\n",
     "sum to 0"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: '0.5'}\n", "weight must be a number"),
    ("merge_method: dare_ties\nbase_model: b\nmodels:\n  - model: a\nparameters: {rescale: false}\n",
     "unknown merge parameter 'rescale'"),
    ("merge_method: linear\nparameters: {normalize: 'no'}\nmodels:\n  - model: a\n", "normalize must be true or false"),
    ("merge_method: linear\nmodels:\n  - model: a\nmodels:\n  - model: b\n", "key 'models' is given twice"),
])
def test_merge_configs_check_dtype_weights_and_parameters(bad, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(bad)


def test_merge_output_folder_of_the_user_is_kept(tmp_path):
    for s in range(2):
        make_picollama(s).save_pretrained(tmp_path / f"m{s}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    cfg = MergeConfig("linear", [ModelSpec(str(tmp_path / "m0")), ModelSpec(str(tmp_path / "m1"))])
    with pytest.raises(FileExistsError, match="merge output folder .*out already exists and was not written by the suite"):
        merge_files(cfg, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    merge_files(cfg, tmp_path / "merged", progress=False)
    merge_files(cfg, tmp_path / "merged", progress=False)  # its own output: replaced
