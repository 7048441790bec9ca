import pytest

from shrinklib.params import PUBLISHED, active_params, build_on_meta, config_of, kv_cache_bytes, param_breakdown


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_counts_match_the_published_totals(name):
    pub = PUBLISHED[name]
    config = config_of(pub)
    parts = param_breakdown(build_on_meta(config))
    assert abs(sum(parts.values()) / pub.total - 1) < 0.01
    if pub.active:
        assert abs(active_params(parts, config) / pub.active - 1) < 0.01


def test_tinyllama_by_hand():
    d, f, L, V, kv = 2048, 5632, 22, 32000, 4 * 64
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    expected = 2 * V * d + L * per_layer + d
    parts = param_breakdown(build_on_meta(config_of(PUBLISHED["TinyLlama-1.1B"])))
    assert sum(parts.values()) == expected
    assert parts["mlp"] == L * 3 * d * f


def test_kv_cache_closed_form():
    cfg = config_of(PUBLISHED["Llama-3.1-8B"])
    assert kv_cache_bytes(cfg, tokens=8192) == 2**30  # 2 × 32 × 8 × 128 × 8192 × 2 bytes = 1 GiB


def test_dense_model_is_all_active():
    cfg = config_of(PUBLISHED["TinyLlama-1.1B"])
    parts = param_breakdown(build_on_meta(cfg))
    assert active_params(parts, cfg) == sum(parts.values())
