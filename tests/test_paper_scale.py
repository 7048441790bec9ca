"""The paper-scale path: notebooks 00, 02, 04, ... run on a tiny random Qwen3 and a local text
file through the suite's runner (see tests/paper_scale.py; the other half is in
test_paper_scale_more.py, so that two test workers share them)."""

import pytest
from paper_scale import make_elsewhere, notebooks, run_elsewhere


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory):
    return make_elsewhere(tmp_path_factory.mktemp("elsewhere"))


@pytest.mark.parametrize("name", notebooks(0))
def test_notebook_runs_on_another_model_and_corpus(name, elsewhere, tmp_path, monkeypatch):
    run_elsewhere(name, elsewhere, tmp_path, monkeypatch)
